"""Checkpoints: ``model.safetensors`` (the weights) plus ``run.json`` (the spec and how the run was made).

``run.json`` holds ``spec`` (the full RunSpec the model is rebuilt from: the model fields that the data
decides, such as channels and mean/std, are filled in), ``hash`` (the hash of the spec as requested,
which names the run folder), ``env`` (:func:`topkconv.io.environment_info`) and ``extra`` (whatever the
caller adds: the trainer's summary, pruning's sparsity).

Nothing here unpickles: weights are safetensors and everything else is JSON. ``run.json`` is written
after the weights, so its presence marks a complete checkpoint.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from torch import nn

from .config import RunSpec, spec_from_dict
from .io import atomic_save_safetensors, atomic_write_json, environment_info, read_json

MODEL_FILE = "model.safetensors"
RUN_FILE = "run.json"
STATE_FILE = "train_state.json"   # the trainer's per-epoch commit record (see topkconv.train)
FORMAT_VERSION = 1


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside a DistributedDataParallel (or DataParallel) wrapper."""
    return getattr(model, "module", model)


def save_checkpoint(run_dir, model: nn.Module, spec: RunSpec, extra: Optional[dict] = None,
                    requested_hash: Optional[str] = None) -> Path:
    """Write ``run_dir/model.safetensors`` and then ``run_dir/run.json``, each atomically; returns run_dir.

    ``requested_hash`` is the hash of the spec before the data filled in the model fields (the trainer
    passes it); by default it is ``spec.hash()``.
    """
    run_dir = Path(run_dir)
    atomic_save_safetensors(run_dir / MODEL_FILE, unwrap(model).state_dict())
    record = {
        "format_version": FORMAT_VERSION,
        "spec": spec.to_dict(),
        "hash": requested_hash or spec.hash(),
        "resolved_hash": spec.hash(),
        "env": environment_info(),
        "extra": extra or {},
    }
    atomic_write_json(run_dir / RUN_FILE, record)
    return run_dir


def read_run_json(path, allow_unfinished: bool = False) -> dict:
    """``run.json`` of a run dir (or of the folder holding a given ``model.safetensors``).

    With ``allow_unfinished``, a run that was stopped (killed, or a non-finite loss) before writing
    ``run.json`` yields its training-state record instead, whose ``spec`` matches its last saved weights.
    """
    run_dir = _run_dir(path)
    run_file = run_dir / RUN_FILE
    state_file = run_dir / STATE_FILE
    if not run_file.is_file() and state_file.is_file():
        if not allow_unfinished:
            raise FileNotFoundError(f"{run_file} not found: the run in {run_dir} is unfinished; continue it with "
                                    f"`topkconv train --resume --out {run_dir}` (or pass allow_unfinished=True)")
        run_file = state_file
    record = read_json(run_file, f"run record (is {run_dir} a training run?)")
    if not isinstance(record, dict) or "spec" not in record:
        raise ValueError(f"{run_file}: expected a JSON object with a 'spec' key")
    return record


def load_checkpoint(path, device: str = "cpu", allow_unfinished: bool = False) -> tuple[nn.Module, RunSpec]:
    """Rebuild the model from ``run.json`` and load ``model.safetensors``; returns ``(model in eval mode, spec)``.

    ``path`` is a run dir or its ``model.safetensors``. Errors name the file. ``allow_unfinished`` loads
    the last finished epoch of a run that stopped early (see :func:`read_run_json`).
    """
    from safetensors.torch import load_file

    from .models import build_model

    run_dir = _run_dir(path)
    record = read_run_json(run_dir, allow_unfinished)
    run_file = run_dir / (RUN_FILE if (run_dir / RUN_FILE).is_file() else STATE_FILE)
    try:
        spec = spec_from_dict(record["spec"])
    except ValueError as err:
        raise ValueError(f"{run_file}: {err}") from None
    weights_file = run_dir / MODEL_FILE
    if not weights_file.is_file():
        raise FileNotFoundError(f"{weights_file} not found")
    try:
        state = load_file(weights_file, device=str(device))
    except Exception as err:  # safetensors raises its own error types for a torn or foreign file
        raise ValueError(f"{weights_file}: cannot read safetensors ({type(err).__name__}: {err})") from None
    model = build_model(spec.model)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(f"{weights_file}: weights do not fit the model described by {run_file}: {err}") from None
    return model.to(device).eval(), spec


def _run_dir(path) -> Path:
    path = Path(os.fspath(path))
    if path.is_dir():
        return path
    if path.name == MODEL_FILE or path.suffix == ".safetensors":
        return path.parent
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path} (expected a run folder or its {MODEL_FILE})")
    raise ValueError(f"{path}: expected a run folder or its {MODEL_FILE}")
