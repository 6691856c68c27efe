"""A test-time-only defence (SAP) given to a trained standard model, without training it again.

Such a defence acts only in eval mode: its layers pass activations through unchanged while training and
draw no random numbers, so a run trained with it holds exactly the weights of its *standard twin* (the same
spec with ``model.defense.kind = "standard"``) trained with the same seed (checked: digits, 1 epoch,
``topkconv train --defense sap`` and ``--defense standard`` at one seed write bit-identical weights). This
is also how Dhillon et al. apply SAP: to a network trained as usual. ``reproduce`` therefore trains the twin
once (shared with a Baseline column of the same spec) and derives the defended run from it here.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from torch import nn

from .config import RunSpec, defense_config


def is_test_time_only(spec: RunSpec) -> bool:
    from . import defenses

    return defenses.get(spec.model.defense.kind).test_time_only


def standard_twin(spec: RunSpec) -> RunSpec:
    """``spec`` with no defence: the run whose trained weights a test-time-only defence reuses unchanged."""
    model = dataclasses.replace(spec.model, defense=defense_config("standard"))
    return dataclasses.replace(spec, model=model)


def derive_run(source, spec: RunSpec, out_dir, force: bool = False) -> nn.Module:
    """Write into ``out_dir`` the run of ``spec`` (a test-time-only defence) made from ``source``, the trained
    run of its standard twin: the twin's weights, unchanged, in the defended model. Returns that model (eval).

    Errors name the folder: a defence that trains (it needs its own training), or a source that is not the
    twin (another spec, hence other weights). The run is written as every run is: weights, then ``run.json``.
    """
    from . import distributed
    from .checkpoint import load_checkpoint, output_folder, read_run_json, replace_run, save_checkpoint
    from .models import build_model

    if not is_test_time_only(spec):
        raise ValueError(f"spec {spec.name!r}: defense {spec.model.defense.kind!r} acts in training too, so its run "
                         f"must be trained, not derived from a standard run")
    source_dir = Path(source)
    twin_hash = standard_twin(spec).hash()
    if read_run_json(source_dir).get("hash") != twin_hash:  # before its weights are read
        raise ValueError(f"{source_dir}: not the standard twin of spec {spec.name!r} (a run of spec hash "
                         f"{twin_hash} was expected): its weights would not be the ones {spec.name!r} trains")
    source_model, source_spec = load_checkpoint(source_dir)  # errors name the missing or broken file
    resolved = dataclasses.replace(spec, model=dataclasses.replace(source_spec.model, defense=spec.model.defense))
    model = build_model(resolved.model)
    model.load_state_dict(source_model.state_dict())  # strict: the defence adds no parameter or buffer
    if distributed.context().is_main:
        work_dir, replacing = output_folder(Path(out_dir), force, True, "derive")
        derived = {"source": {"run_dir": str(source_dir), "hash": twin_hash},
                   "why": "test-time-only defence: the standard twin's weights, unchanged"}
        save_checkpoint(work_dir, model, resolved, extra={"derived": derived}, requested_hash=spec.hash())
        if replacing:
            replace_run(Path(out_dir), work_dir)
    return model.eval()
