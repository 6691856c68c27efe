"""A test-time-only defence (SAP) is given to its trained standard twin instead of being trained again: the
derived run holds the weights that training it would have written, and ``reproduce`` trains the twin once."""

import dataclasses

import pytest
import torch

from topkconv.checkpoint import load_checkpoint
from topkconv.config import spec_from_dict
from topkconv.errors import UserError
from topkconv.layers import StochasticActivationPruning
from topkconv.reproduce import Study, Workspace, load_table_spec
from topkconv.test_time import derive_run, standard_twin
from topkconv.train import fit

BASE = {"data": {"name": "digits", "image_size": 16, "limit_train": 48, "limit_test": 16},
        "model": {"arch": "vgg-small", "width": 0.125, "hidden": 16},
        "train": {"epochs": 1, "batch_size": 24, "warmup_epochs": 0, "seed": 5}}
SAP = {"kind": "sap", "sap_frac": 0.5}


def spec_with(defense: dict, seed: int = 5):
    return spec_from_dict({**BASE, "name": f"tiny-{defense['kind']}", "model": {**BASE["model"], "defense": defense},
                           "train": {**BASE["train"], "seed": seed}})


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The standard twin and SAP, each trained by the trainer, at one seed."""
    root = tmp_path_factory.mktemp("test_time")
    for name, defense in (("standard", {"kind": "standard"}), ("sap", SAP)):
        fit(spec_with(defense), root / name, progress=False)
    return root


def test_the_derived_run_holds_the_weights_that_training_it_writes(trained, tmp_path):
    derive_run(trained / "standard", spec_with(SAP), tmp_path / "derived")
    derived, spec = load_checkpoint(tmp_path / "derived")
    trained_sap, _ = load_checkpoint(trained / "sap")
    assert spec.model.defense.kind == "sap" and spec.model.defense.sap_frac == 0.5
    assert any(isinstance(m, StochasticActivationPruning) for m in derived.modules())
    weights, expected = derived.state_dict(), trained_sap.state_dict()
    assert weights.keys() == expected.keys()
    assert all(torch.equal(weights[name], expected[name]) for name in weights)


def test_a_source_that_is_not_the_twin_is_refused_naming_it(trained, tmp_path):
    with pytest.raises(ValueError, match=rf"{trained / 'standard'}: not the standard twin"):
        derive_run(trained / "standard", spec_with(SAP, seed=6), tmp_path / "other-seed")
    with pytest.raises(ValueError, match="acts in training too"):
        derive_run(trained / "standard", spec_with({"kind": "dropout"}), tmp_path / "dropout")


def test_a_finished_run_is_kept_unless_forced(trained, tmp_path):
    out = tmp_path / "derived"
    derive_run(trained / "standard", spec_with(SAP), out)
    with pytest.raises(UserError, match="already holds a finished run"):
        derive_run(trained / "standard", spec_with(SAP), out)
    derive_run(trained / "standard", spec_with(SAP), out, force=True)
    assert load_checkpoint(out)[1].model.defense.kind == "sap"


TABLE = """
table = "table1"
preset = "quick"
title = "tiny"
seeds = 2
[base.data]
name = "digits"
[base.model]
arch = "vgg-small"
[[columns]]
label = "Baseline"
[[columns]]
label = "SAP"
[columns.spec.model.defense]
kind = "sap"
"""


@pytest.mark.parametrize("with_baseline", [True, False], ids=["beside-its-baseline", "alone"])
def test_reproduce_trains_the_twin_once_and_derives_sap_from_it(with_baseline, tmp_path):
    text = TABLE if with_baseline else TABLE.replace('[[columns]]\nlabel = "Baseline"\n', "")
    (tmp_path / "tiny.toml").write_text(text, encoding="utf-8")
    study = Study(load_table_spec(tmp_path / "tiny.toml"))
    workspace = Workspace(tmp_path / "out")
    jobs, _ = workspace.plan([study], evaluations=False)
    for seed in range(2):
        sap = study.run_spec("SAP", seed)
        twin = workspace.run_dir(standard_twin(sap)).name
        if with_baseline:
            assert twin == workspace.run_dir(study.run_spec("Baseline", seed)).name
        derive = [job for job in jobs if job.key == workspace.run_dir(sap).name]
        assert [(job.step, job.needs, job.source_dir) for job in derive] == [
            ("derive", (twin,), str(workspace.runs / twin))]
    assert sorted(job.step for job in jobs) == ["derive"] * 2 + ["train"] * 2
    assert dataclasses.asdict(standard_twin(study.run_spec("SAP")).model.defense) == {"kind": "standard"}
