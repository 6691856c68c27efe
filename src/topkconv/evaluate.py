"""Robustness evaluation of one model: the paper's protocol, stronger attacks and gradient-masking checks.

:func:`evaluate` runs a suite of attacks on ``(x, y)`` and returns the content of ``eval.json``;
:func:`evaluate_run` does it for a checkpoint folder and writes ``eval.json`` and ``acc-vs-eps.png``.

Suites (eps and step sizes in 0-255 units in the config and in the output, fractions of 1 in the attacks):

* ``paper``: clean, FGSM and PGD-16 (step 0.75) at ``eps`` (and at each of ``extra_eps``); for a
  stochastic model (e.g. SAP) also EOT-PGD, the same PGD with the gradient averaged over
  ``eot_samples`` draws of the randomness.
* ``full``: the paper suite plus AutoAttack (``standard``, or ``rand`` for stochastic models), Square,
  transfer from a surrogate (if one is given), BPDA-PGD (models with
  top-k routing layers), PGD with doubled steps and doubled restarts, an accuracy-vs-eps curve, and
  the five gradient-masking checks of :mod:`topkconv.attacks.masking`.

Per-example bookkeeping: an example is robust under an attack when it is classified correctly both clean
and attacked; ``worst_case`` counts the examples that survive *every* attack at ``eps``.

Sharding: the examples are cut into fixed chunks of ``cfg.batch_size``; under ``torchrun`` rank r attacks
chunks r, r + world, ... and the per-example masks are gathered with ``all_gather_object``. Every random
draw of an attack on a chunk (random starts, SAP's draws, AutoAttack's seed) is seeded from
``(cfg.seed, chunk, attack)``, so the numbers do not depend on the number of processes.
"""

from __future__ import annotations

import dataclasses
import io
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from .attacks import autoattack, correct, fgsm, has_routing, is_stochastic, pgd, square, transfer
from .attacks.common import attack_mode, model_device, seeded
from .attacks.masking import masking_checks
from .config import AttackConfig
from .layers import dense_gradients

SUITES = ("paper", "full")
EVAL_FILE = "eval.json"
PLOT_FILE = "acc-vs-eps.png"


@dataclass
class PlannedAttack:
    name: str
    eps: float                     # 0-255 units
    params: dict                   # as reported, 0-255 units
    run: Callable[..., torch.Tensor]  # (x, y, generator, seed) -> x_adv
    worst_case: bool = True        # counts towards the per-example worst case (attacks at cfg.eps)


def _fmt(eps: float) -> str:
    return f"{eps:g}"


def _pgd_attack(name, model, eps, step, steps, restarts=1, eot=1, bpda=False, worst_case=True) -> PlannedAttack:
    def run(x, y, generator, seed):
        with dense_gradients(bpda):
            return pgd(model, x, y, eps / 255, step / 255, steps, restarts=restarts, eot_samples=eot,
                       generator=generator)

    params = {"eps": eps, "step_size": step, "steps": steps, "restarts": restarts, "random_start": True}
    if eot > 1:
        params["eot_samples"] = eot
    if bpda:
        params["bpda"] = "dense gradients through every top-k layer"
    return PlannedAttack(name, eps, params, run, worst_case)


def _fgsm_attack(name, model, eps, worst_case=True) -> PlannedAttack:
    return PlannedAttack(name, eps, {"eps": eps}, lambda x, y, g, s: fgsm(model, x, y, eps / 255), worst_case)


def plan_attacks(model: nn.Module, cfg: AttackConfig, stochastic: bool, routing: bool,
                 surrogate: Optional[nn.Module] = None) -> tuple[list[PlannedAttack], list[tuple[float, str]]]:
    """The attacks of ``cfg.suite`` for this model, and the eps curve as ``[(eps, attack name)]``."""
    if cfg.suite not in SUITES:
        raise ValueError(f"suite: expected one of {SUITES}, got {cfg.suite!r}")
    if not 0 <= cfg.eps <= 255 or any(not 0 <= e <= 255 for e in list(cfg.extra_eps) + list(cfg.eps_curve)):
        raise ValueError(f"eps, extra_eps and eps_curve are in 0-255 units, got {cfg.eps}, {cfg.extra_eps}, "
                         f"{cfg.eps_curve}")
    eps, step, steps = cfg.eps, cfg.pgd_step_size, cfg.pgd_steps
    ratio = step / eps if eps > 0 else 0.0   # other radii keep the paper's step/eps ratio
    plan = [_fgsm_attack("fgsm", model, eps), _pgd_attack("pgd", model, eps, step, steps, cfg.restarts)]
    if stochastic:  # without EOT a randomised defence looks stronger than it is (Athalye et al. 2018)
        plan.append(_pgd_attack("eot_pgd", model, eps, step, steps, cfg.restarts, eot=cfg.eot_samples))
    for extra in cfg.extra_eps:
        if extra != eps:
            plan.append(_fgsm_attack(f"fgsm@{_fmt(extra)}", model, extra, worst_case=False))
            plan.append(_pgd_attack(f"pgd@{_fmt(extra)}", model, extra, ratio * extra, steps, cfg.restarts,
                                    worst_case=False))
            if stochastic:
                plan.append(_pgd_attack(f"eot_pgd@{_fmt(extra)}", model, extra, ratio * extra, steps,
                                        cfg.restarts, eot=cfg.eot_samples, worst_case=False))
    curve: list[tuple[float, str]] = []
    if cfg.suite == "full":
        whitebox = "eot_pgd" if stochastic else "pgd"
        version = "rand" if stochastic else "standard"
        subset = list(cfg.autoattack_attacks) or None
        plan.append(PlannedAttack(
            "autoattack", eps, {"eps": eps, "version": version, "attacks": subset,
                                "n_iter": cfg.apgd_iters, "square_queries": cfg.square_queries},
            lambda x, y, g, s: autoattack(model, x, y, eps / 255, version=version, attacks=subset,
                                          n_iter=cfg.apgd_iters, square_queries=cfg.square_queries,
                                          seed=s, batch_size=cfg.batch_size)))
        plan.append(PlannedAttack(
            "square", eps, {"eps": eps, "n_queries": cfg.square_queries},
            lambda x, y, g, s: square(model, x, y, eps / 255, n_queries=cfg.square_queries, seed=s)))
        if surrogate is not None:
            plan.append(PlannedAttack(
                "transfer", eps, {"eps": eps, "step_size": step, "steps": steps, "surrogate": "pgd"},
                lambda x, y, g, s: transfer(surrogate, model, x, y, eps / 255, step / 255, steps, generator=g)))
        if routing:
            plan.append(_pgd_attack("bpda_pgd", model, eps, step, steps, cfg.restarts, bpda=True))
        plan.append(_pgd_attack("pgd_2x_steps", model, eps, step, 2 * steps, cfg.restarts))
        plan.append(_pgd_attack("pgd_2x_restarts", model, eps, step, steps, 2 * cfg.restarts))
        eot = cfg.eot_samples if stochastic else 1
        names = {a.name for a in plan}
        for point in sorted(set(cfg.eps_curve) | {eps}):
            if point == 0:
                curve.append((0.0, "clean"))
            elif point == eps:
                curve.append((point, whitebox))
            else:
                name = f"{whitebox}@{_fmt(point)}"
                if name not in names:
                    plan.append(_pgd_attack(name, model, point, ratio * point, steps, cfg.restarts, eot=eot,
                                            worst_case=False))
                curve.append((point, name))
    return plan, curve


def _seed(base: int, chunk: int, name: str) -> int:
    return zlib.crc32(f"{base}/{chunk}/{name}".encode()) & 0x7FFFFFFF


def _world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_gather(obj) -> list:
    import torch.distributed as dist

    rank, world = _world()
    if world == 1:
        return [obj]
    gathered = [None] * world
    dist.all_gather_object(gathered, obj)
    return gathered


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: AttackConfig,
             surrogate: Optional[nn.Module] = None, progress: bool = True) -> dict:
    """Run ``cfg.suite`` on ``(x, y)`` (images in [0, 1]) and return the eval.json content.

    The first ``cfg.n_examples`` examples are used when it is set. Under an initialised
    ``torch.distributed`` group every rank must call this with the same arguments; all get the result.
    """
    if cfg.n_examples is not None:
        x, y = x[:cfg.n_examples], y[:cfg.n_examples]
    if x.shape[0] == 0:
        raise ValueError("evaluate: no examples to attack (x is empty)")
    if cfg.batch_size < 1:
        raise ValueError(f"batch_size: expected >= 1, got {cfg.batch_size}")
    started = time.perf_counter()
    device = model_device(model)
    with torch.no_grad(), attack_mode(model):
        num_classes = model(x[:1].to(device)).shape[1]
    stochastic = is_stochastic(model, x[:8])
    routing = has_routing(model)
    plan, curve = plan_attacks(model, cfg, stochastic, routing, surrogate)

    n = x.shape[0]
    chunks = list(range(0, n, cfg.batch_size))
    rank, world = _world()
    mine = list(range(rank, len(chunks), world))
    seconds = {attack.name: 0.0 for attack in plan}
    seconds["clean"] = 0.0
    masks: dict[int, dict[str, torch.Tensor]] = {}
    from tqdm import tqdm

    bar = tqdm(total=len(mine) * (len(plan) + 1), desc="evaluate", unit="attack",
               disable=not progress or rank != 0 or not sys.stderr.isatty())
    for index in mine:
        xs = x[chunks[index]:chunks[index] + cfg.batch_size].to(device)
        ys = y[chunks[index]:chunks[index] + cfg.batch_size].to(device)
        tic = time.perf_counter()
        with seeded(model, _seed(cfg.seed, index, "clean")):
            clean = correct(model, xs, ys)
        _sync(device)
        seconds["clean"] += time.perf_counter() - tic
        result = {"clean": clean.cpu()}
        bar.update()
        for attack in plan:
            bar.set_postfix_str(attack.name)
            tic = time.perf_counter()
            seed = _seed(cfg.seed, index, attack.name)
            with seeded(model, seed) as generator:
                x_adv = attack.run(xs, ys, generator, seed)
                robust = correct(model, x_adv, ys) & clean
            _sync(device)
            seconds[attack.name] += time.perf_counter() - tic
            result[attack.name] = robust.cpu()
            bar.update()
        masks[index] = result
    bar.close()

    for part in _all_gather({"masks": masks, "seconds": seconds}):
        masks.update(part["masks"])
        for name, value in part["seconds"].items():  # ranks run side by side: the slowest sets the time
            seconds[name] = max(seconds[name], value)
    merged = {name: torch.cat([masks[i][name] for i in range(len(chunks))])
              for name in ["clean"] + [a.name for a in plan]}
    acc = {name: mask.sum().item() / n for name, mask in merged.items()}  # exact counts, in double

    attacks = {a.name: {"accuracy": acc[a.name], "params": a.params, "n": n, "seconds": seconds[a.name]}
               for a in plan}
    worst_names = [a.name for a in plan if a.worst_case]
    worst = merged["clean"].clone()
    for name in worst_names:
        worst &= merged[name]
    eps_curve = [{"eps": eps, "accuracy": acc[name], "attack": name} for eps, name in curve]
    whitebox = "eot_pgd" if stochastic else "pgd"
    checks = masking_checks(acc, n, num_classes, eps_curve, routing=routing, whitebox=whitebox)
    if cfg.suite == "paper":
        # Only check 1 has its numbers in the paper suite; say so rather than leave the others blank.
        for name, check in checks.items():
            if check["verdict"] == "n/a" and name != "bpda_not_stronger":
                check["reason"] = "not run in the paper suite; use --suite full"
    return {
        "units": "eps and step sizes in 0-255 units; accuracies are fractions of n",
        "suite": cfg.suite,
        "n": n,
        "n_examples": n,
        "seed": cfg.seed,
        "clean": acc["clean"],
        "attacks": attacks,
        "worst_case": {"accuracy": worst.sum().item() / n, "attacks": worst_names, "eps": cfg.eps,
                       "n": n},
        "masking_checks": checks,
        "eps_curve": eps_curve,
        "model": {"stochastic": stochastic, "routing": routing, "num_classes": num_classes},
        "config": dataclasses.asdict(cfg),
        "timings": {"total_seconds": time.perf_counter() - started, "clean_seconds": seconds["clean"],
                    "world_size": world, "device": str(device)},
    }


def plot_accuracy_vs_eps(result: dict, title: str = "") -> bytes:
    """PNG bytes: accuracy against eps (the curve, or the PGD points of the paper suite), with chance."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [(p["eps"], p["accuracy"]) for p in result["eps_curve"]]
    label = "white-box PGD" + (" (EOT)" if result["model"]["stochastic"] else "")
    if not points:
        points = [(0.0, result["clean"])] + sorted(
            (a["params"]["eps"], a["accuracy"]) for name, a in result["attacks"].items()
            if name == "pgd" or name.startswith("pgd@"))
        label = "PGD"
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
    ax.plot([p[0] for p in points], [p[1] for p in points], "o-", label=label)
    eps = result["worst_case"]["eps"]
    for name in ("fgsm", "autoattack", "square", "transfer", "bpda_pgd"):
        if name in result["attacks"]:
            ax.plot([eps], [result["attacks"][name]["accuracy"]], "x", label=name)
    ax.plot([eps], [result["worst_case"]["accuracy"]], "k*", label="worst case")
    ax.axhline(1.0 / result["model"]["num_classes"], color="grey", ls="--", lw=1, label="chance")
    ax.set_xlabel("eps (0-255 units)")
    ax.set_ylabel("accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(title or f"accuracy vs eps (n = {result['n']})", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def plot_path(out: Path) -> Path:
    """acc-vs-eps.png beside eval.json; ``<stem>-acc-vs-eps.png`` beside any other name, so two suites
    written to one folder keep their own plots."""
    out = Path(out)
    return out.parent / (PLOT_FILE if out.name == EVAL_FILE else f"{out.stem}-{PLOT_FILE}")


def write_results(result: dict, out: Path, title: str = "") -> None:
    """``out`` (eval.json) and its accuracy-vs-eps plot beside it (:func:`plot_path`), both atomically."""
    from .io import atomic_write_bytes, atomic_write_json

    atomic_write_json(out, result)
    atomic_write_bytes(plot_path(out), plot_accuracy_vs_eps(result, title))


def evaluate_run(run_dir, suite: str = "paper", surrogate_dir=None, n_examples: Optional[int] = None,
                 eps: Optional[float] = None, out=None, overrides: Optional[dict] = None,
                 device: str = "auto", progress: bool = True) -> dict:
    """Evaluate the checkpoint in ``run_dir``; write ``eval.json`` (or ``out``) and ``acc-vs-eps.png`` beside it.

    The attack settings are the run's ``spec.attack`` with ``suite``, ``n_examples``, ``eps`` and any
    ``overrides`` (AttackConfig field names) applied. Under ``torchrun`` the ranks share the work and rank 0
    writes the files.
    """
    from . import distributed
    from .checkpoint import load_checkpoint
    from .data import load_data
    from .io import environment_info

    ctx = distributed.setup(device)
    try:
        model, spec = load_checkpoint(run_dir)
        model.to(ctx.device)
        changes = dict(overrides or {}, suite=suite)
        if n_examples is not None:
            changes["n_examples"] = n_examples
        if eps is not None:
            changes["eps"] = float(eps)
        unknown = set(changes) - {f.name for f in dataclasses.fields(AttackConfig)}
        if unknown:
            raise ValueError(f"overrides: unknown AttackConfig fields {sorted(unknown)}")
        cfg = dataclasses.replace(spec.attack, **changes)
        x, y = load_data(spec.data).test_tensors(limit=cfg.n_examples)
        surrogate = None
        if surrogate_dir is not None:
            surrogate = load_checkpoint(surrogate_dir)[0].to(ctx.device)
        result = evaluate(model, x, y, cfg, surrogate=surrogate, progress=progress)
        result["run"] = {"dir": str(Path(run_dir)), "name": spec.name, "hash": spec.hash(),
                         "surrogate": str(surrogate_dir) if surrogate_dir is not None else None}
        result["env"] = environment_info()
        if ctx.is_main:
            path = Path(out) if out is not None else _run_folder(run_dir) / EVAL_FILE
            write_results(result, path, title=f"{spec.name} ({cfg.suite} suite, n = {result['n']})")
        distributed.barrier(ctx)
        return result
    finally:
        distributed.teardown(ctx)


def _run_folder(path) -> Path:
    path = Path(path)
    return path.parent if path.suffix == ".safetensors" else path
