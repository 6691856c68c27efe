"""An evaluation of a checkpoint folder, or of a model from the user's code, and the files it writes:
``eval.json``, its Markdown and its accuracy-vs-eps plot (each atomically)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

from ..checkpoint import EVAL_FILE, PLOT_FILE, beside
from ..config import AttackConfig, attack_config_with
from .pipeline import evaluate


def plot_path(out: Path) -> Path:
    """acc-vs-eps.png beside eval.json; ``<stem>-acc-vs-eps.png`` beside any other name, so two suites
    written to one folder keep their own plots."""
    return beside(out, PLOT_FILE)


def write_results(result: dict, out: Path, title: str = "") -> None:
    """``out`` (eval.json), its Markdown (the same name with ``.md``: the verdict line first, then every
    attack and indicator) and its accuracy-vs-eps plot (:func:`plot_path`), each atomically."""
    from ..figures import plot_accuracy_vs_eps
    from ..io import atomic_write_bytes, atomic_write_json, atomic_write_text
    from ..report import render_evaluation

    out = Path(out)
    atomic_write_json(out, result)
    atomic_write_text(out.with_suffix(".md"), render_evaluation(result, title))
    atomic_write_bytes(plot_path(out), plot_accuracy_vs_eps(result, title))


def _evaluate_and_write(ctx, model, load_xy, cfg: AttackConfig, surrogate_dir, run: dict, out, title: str,
                        progress: bool) -> dict:
    """The shared tail of both entry points: attack, record the source, write on the main process."""
    from .. import distributed
    from ..checkpoint import load_checkpoint
    from ..io import environment_info

    x, y = load_xy(cfg.n_examples)
    surrogate = load_checkpoint(surrogate_dir)[0].to(ctx.device) if surrogate_dir is not None else None
    result = evaluate(model, x, y, cfg, surrogate=surrogate, progress=progress)
    result["run"] = dict(run, surrogate=str(surrogate_dir) if surrogate_dir is not None else None)
    result["env"] = environment_info()
    if ctx.is_main and out is not None:
        write_results(result, Path(out), title=f"{title} ({cfg.suite} suite, n = {result['n_examples']})")
    distributed.barrier(ctx)
    return result


def evaluate_run(run_dir, suite: str = "paper", surrogate_dir=None, n_examples: Optional[int] = None,
                 eps: Optional[float] = None, out=None, overrides: Optional[dict] = None,
                 device: str = "auto", progress: bool = True, allow_unfinished: bool = False) -> dict:
    """Evaluate the checkpoint in ``run_dir``; write ``eval.json`` (or ``out``) and ``acc-vs-eps.png`` beside it.

    ``allow_unfinished`` evaluates the last finished epoch of a run that stopped early.

    The attack settings are the run's ``spec.attack`` with ``suite``, ``n_examples``, ``eps`` and any
    ``overrides`` (an ``[attack]`` table: ``{"pgd": {"steps": 3}}``, ``{"indicators": {...}}``, ``seed`` ...)
    applied. Under ``torchrun`` the ranks share the work and rank 0 writes the files.
    """
    from .. import distributed
    from ..checkpoint import load_checkpoint
    from ..data import load_data

    ctx = distributed.setup(device)
    try:
        model, spec = load_checkpoint(run_dir, allow_unfinished=allow_unfinished)
        changes = dict(overrides or {}, suite=suite, **({"n_examples": n_examples} if n_examples is not None else {}),
                       **({"eps": float(eps)} if eps is not None else {}))
        cfg = attack_config_with(spec.attack, changes)
        run = {"dir": str(Path(run_dir)), "name": spec.name, "hash": spec.hash()}
        out = Path(out) if out is not None else _run_folder(run_dir) / EVAL_FILE
        return _evaluate_and_write(ctx, model.to(ctx.device), lambda limit: load_data(spec.data).test_tensors(
            limit=limit), cfg, surrogate_dir, run, out, spec.name, progress)
    finally:
        distributed.teardown(ctx)


def evaluate_user_model(factory: str, weights, data, cfg: AttackConfig, out=None, surrogate_dir=None,
                        device: str = "auto", progress: bool = True) -> dict:
    """Evaluate a model from the user's own code: ``factory`` (``"package.module:factory"`` or
    ``"file.py:factory"``) builds it, ``weights`` (a safetensors file, never a pickle) fills it, and it is
    attacked on the test split of ``data`` (a :class:`~topkconv.config.DataConfig`) with ``cfg``; the result
    goes to ``out`` (eval.json and its plot) when given. The model takes images in [0, 1] (normalisation
    inside) at ``data.image_size``."""
    from .. import distributed
    from ..data import load_data
    from ..user_model import build_user_model

    ctx = distributed.setup(device)
    try:
        model = build_user_model(factory, weights).to(ctx.device)
        run = {"factory": factory, "weights": str(weights), "data": dataclasses.asdict(data)}
        return _evaluate_and_write(ctx, model, lambda limit: load_data(data).test_tensors(limit=limit), cfg,
                                   surrogate_dir, run, out, factory, progress)
    finally:
        distributed.teardown(ctx)


def _run_folder(path) -> Path:
    path = Path(path)
    return path.parent if path.suffix == ".safetensors" else path
