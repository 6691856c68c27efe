"""The routing-aware audit end to end: both PGD starts in the worst case, soft against dense BPDA, and
`topkconv evaluate --model MODULE:FACTORY --weights FILE.safetensors` on a model from the user's own code."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from safetensors.torch import save_file

from masked_models import GradientOnlyOnTheDataGrid
from topkconv.attacks import accuracy, pgd
from topkconv.config import AttackConfig, DataConfig
from topkconv.data import load_data
from topkconv.evaluate import ModelTraits, evaluate, plan_attacks
from topkconv.layers import dense_gradients, soft_gradients

EPS = 16 / 255


def test_zero_start_pgd_is_the_stronger_start_here_and_counts_in_the_worst_case(mlp, digits_test):
    # The gradient exists only at images on the data's 1/16 grid: a zero start begins there and gets one
    # true step (here a full-eps one), a random start never sees a gradient.
    model = GradientOnlyOnTheDataGrid(mlp)
    cfg = AttackConfig(suite="paper", eps=16, n_examples=150, budgets={"pgd": {"step_size": 16, "steps": 4}})
    result = evaluate(model, *digits_test, cfg, progress=False)
    attacks = result["attacks"]
    assert attacks["pgd_zero"]["accuracy"] < attacks["pgd_random"]["accuracy"] - 0.2, attacks
    assert attacks["pgd"]["accuracy"] == attacks["pgd_zero"]["accuracy"]   # the random start adds nothing here
    assert "pgd_zero" in result["worst_case"]["attacks"]
    assert result["worst_case"]["accuracy"] <= attacks["pgd_zero"]["accuracy"]


def test_soft_bpda_is_at_least_as_strong_as_dense_bpda_on_an_exact_k_routing_model(routing_mlp, digits_test):
    x, y = digits_test
    generator = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    with dense_gradients():
        dense = accuracy(routing_mlp, pgd(routing_mlp, x, y, EPS, EPS / 8, 20, start="zero", generator=generator()), y)
    with soft_gradients():
        soft = accuracy(routing_mlp, pgd(routing_mlp, x, y, EPS, EPS / 8, 20, start="zero", generator=generator()), y)
    assert soft <= dense + 1 / len(y), (soft, dense)
    assert soft < accuracy(routing_mlp, x, y) - 0.1


def test_full_suite_runs_both_bpda_stand_ins_on_a_routing_model(routing_mlp, digits_test):
    cfg = AttackConfig(suite="full", eps=16, eps_curve=[0, 64], n_examples=40,
                       budgets={"pgd": {"step_size": 2.5}, "autoattack": {"iterations": 5, "attacks": ["apgd-ce"]},
                                "square": {"queries": 20}, "zeroth_order": {"steps": 3, "samples": [[0, 10]]}},
                       indicators={"examples": 20, "draws": 5, "steps": 5})
    result = evaluate(routing_mlp, *digits_test, cfg, progress=False)
    assert {"bpda_dense", "bpda_soft", "zeroth_order"} <= set(result["worst_case"]["attacks"])
    assert result["attacks"]["bpda_soft"]["params"]["tau"] == "per layer from the score spread"
    assert result["indicators"]["selection_flip_rate"]["per_layer"].keys() == {"1"}
    assert result["verdict"]["text"].startswith(("no masking", "masking suspected", "masking shown"))


def test_an_attack_limited_to_the_first_examples_is_judged_on_them(digits_test, cnn):
    from masked_models import RoundedInput

    model = RoundedInput(cnn)   # PGD cannot move it; the zeroth-order attack can
    cfg = AttackConfig(suite="full", eps=24, eps_curve=[], n_examples=120, batch_size=50,
                       budgets={"pgd": {"step_size": 3, "steps": 8}, "square": {"queries": 5},
                                "autoattack": {"iterations": 2, "attacks": ["apgd-ce"]},
                                "zeroth_order": {"steps": 12, "step_size": 3, "samples": [[0, 40]], "examples": 60}},
                       indicators={"examples": 20, "draws": 5, "steps": 5})
    result = evaluate(model, *digits_test, cfg, progress=False)
    zo = result["attacks"]["zeroth_order"]
    assert zo["n_attacked"] == 60 and zo["params"]["examples"] == 60
    outcomes = result["per_example"]
    assert outcomes["zeroth_order"][60:] == outcomes["clean"][60:]      # the others were not attacked
    assert zo["accuracy_on_attacked"] < outcomes["pgd"][:60].count("1") / 60 - 0.2
    assert result["verdict"]["verdict"] == "masking shown" and result["verdict"]["attack"] == "zeroth_order"


def test_a_cascaded_attack_runs_on_the_white_box_survivors_only(digits_test, cnn):
    from masked_models import RoundedInput

    model = RoundedInput(cnn)   # PGD cannot move it; the zeroth-order attack can
    cfg = AttackConfig(suite="full", eps=24, eps_curve=[], n_examples=80, batch_size=50,
                       budgets={"pgd": {"step_size": 3, "steps": 8}, "square": {"queries": 5},
                                "autoattack": {"iterations": 2, "attacks": ["apgd-ce"]},
                                "zeroth_order": {"steps": 12, "step_size": 3, "samples": [[0, 40]]}},
                       indicators={"examples": 20, "draws": 5, "steps": 5}, cascade_attacks=["square", "zeroth_order"])
    result = evaluate(model, *digits_test, cfg, progress=False)
    outcomes, attacks = result["per_example"], result["attacks"]
    whitebox = outcomes["whitebox"]
    assert attacks["whitebox"]["params"]["worst_of"] == ["pgd_zero", "pgd_random", "autoattack", "pgd_2x_steps",
                                                         "pgd_2x_restarts"]
    for name in ("square", "zeroth_order"):
        cascade = attacks[name]["params"]["cascade"]
        assert cascade["n_attacked"] == whitebox.count("1")
        row = outcomes[name]
        assert all(w == "1" for r, w in zip(row, whitebox) if r == "1"), "a cascaded row counts a broken example"
        assert cascade["broke"] == whitebox.count("1") - row.count("1")
    assert attacks["zeroth_order"]["params"]["cascade"]["broke"] > 0.2 * len(whitebox)
    worst = outcomes["worst_case"]
    assert worst == "".join("1" if all(outcomes[a][i] == "1" for a in result["worst_case"]["attacks"]) and
                            outcomes["clean"][i] == "1" else "0" for i in range(len(worst)))
    assert result["verdict"]["verdict"] == "white-box misses found"   # a cascaded row's sign test is one-sided
    broke = attacks["zeroth_order"]["params"]["cascade"]["broke"]
    assert result["verdict"]["text"].startswith(f"found {broke} examples the white-box attacks missed (p = ")


def test_autoattack_cascaded_runs_on_the_survivors_of_the_other_white_box_attacks(digits_test, cnn):
    # The verdict presets run AutoAttack at its reference budget on the other white-box attacks' survivors only:
    # it leaves the cascade's base (the "whitebox" row), attacks exactly that row's survivors, can only add
    # breaks, and enters the worst case.
    cfg = AttackConfig(suite="full", eps=16, eps_curve=[], n_examples=80, batch_size=50,
                       budgets={"pgd": {"step_size": 2, "steps": 2}, "square": {"queries": 5},
                                "autoattack": {"iterations": 5, "attacks": ["apgd-ce", "apgd-t"]}},
                       indicators={"examples": 10, "draws": 2, "steps": 2}, cascade_attacks=["autoattack", "square"])
    result = evaluate(cnn, *digits_test, cfg, progress=False)
    outcomes, attacks = result["per_example"], result["attacks"]
    whitebox = outcomes["whitebox"]
    assert attacks["whitebox"]["params"]["worst_of"] == ["pgd_zero", "pgd_random", "pgd_2x_steps", "pgd_2x_restarts"]
    cascade = attacks["autoattack"]["params"]["cascade"]
    assert cascade["after"] == attacks["whitebox"]["params"]["worst_of"]
    assert cascade["n_attacked"] == whitebox.count("1") > 0
    row = outcomes["autoattack"]
    assert all(w == "1" for r, w in zip(row, whitebox) if r == "1"), "a cascaded row counts a broken example"
    assert cascade["broke"] > 0   # two-step PGD leaves what 5-iteration APGD-CE and APGD-T still break
    assert "autoattack" in result["worst_case"]["attacks"]
    assert outcomes["worst_case"].count("1") <= row.count("1")


def test_cascade_attacks_names_what_it_accepts():
    with pytest.raises(ValueError, match="cascade_attacks.*pgd_zero"):
        plan_attacks(nn.Linear(2, 2), AttackConfig(suite="full", cascade_attacks=["pgd_zero"]),
                     ModelTraits(False, False, ()))


# ---------------------------------------------------------------- evaluate any model from the CLI

FACTORY_SOURCE = '''
from torch import nn


def build():
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1, stride=2),
                         nn.ReLU(), nn.Flatten(), nn.Linear(16 * 4 * 4, 10))


def wider():
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
'''


@pytest.fixture
def user_code(tmp_path, cnn, monkeypatch):
    """A user's module ``usermodels`` (importable, and as a file) and the trained CNN's weights for it."""
    (tmp_path / "usermodels.py").write_text(FACTORY_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    weights = tmp_path / "cnn.safetensors"
    save_file({k: v.contiguous() for k, v in cnn.state_dict().items()}, str(weights))
    return tmp_path, weights


SMALL = ["--dataset", "digits", "--image-size", "8", "--n", "40", "--no-progress"]


@pytest.mark.parametrize("factory", ["usermodels:build", "{dir}/usermodels.py:build"], ids=["module", "file"])
def test_cli_evaluates_a_model_from_user_code_and_safetensors_weights(factory, user_code, cnn):
    from topkconv.cli import main

    folder, weights = user_code
    out = folder / "out" / "eval.json"
    code = main(["evaluate", "--model", factory.format(dir=folder), "--weights", str(weights), "--out", str(out)]
                + SMALL)
    assert code == 0
    result = json.loads(out.read_text())
    x, y = load_data(DataConfig(name="digits", image_size=8, augment=False)).test_tensors(limit=40)
    assert result["clean"] == accuracy(cnn, x, y) > 0.5   # the trained weights were loaded, not fresh ones
    assert result["run"]["weights"] == str(weights)
    assert (folder / "out" / "eval.md").read_text().splitlines()[2].startswith("**Verdict: ")


def test_cli_draws_strength_curves_for_a_model_from_user_code(user_code):
    from topkconv.cli import main

    folder, weights = user_code
    out = folder / "out" / "eval.json"
    assert main(["evaluate", "--model", "usermodels:build", "--weights", str(weights), "--out", str(out),
                 "--curves", "4", "--eps", "32"] + SMALL) == 0
    curves = json.loads((folder / "out" / "strength-curves.json").read_text())
    assert curves["n"] == 4 and curves["eps"] == 32 and curves["run"]["factory"] == "usermodels:build"
    assert curves["curves"]["eps"]["points"][-1]["accuracy"] == 0   # unbounded: the attack must win
    assert (folder / "out" / "strength-curves.png").is_file()


@pytest.mark.parametrize("args, named", [
    (["--model", "nowhere_pkg.models:build"], "nowhere_pkg.models"),
    (["--model", "usermodels:missing"], "missing"),
    (["--model", "usermodels"], "usermodels"),
    (["--model", "usermodels:wider"], "cnn.safetensors"),            # weights that do not fit the model
    (["--model", "usermodels:build", "--weights", "{dir}/model.pt"], "model.pt"),   # never a pickle
    (["--model", "usermodels:build", "--weights", "{dir}/absent.safetensors"], "absent.safetensors"),
], ids=["unimportable-module", "missing-factory", "no-factory-named", "weights-do-not-fit", "pickle-refused",
        "missing-weights"])
def test_cli_errors_name_the_factory_or_the_file(args, named, user_code, capsys):
    from topkconv.cli import main

    folder, weights = user_code
    (folder / "model.pt").write_bytes(b"not read")
    argv = ["evaluate", *[a.format(dir=folder) for a in args]]
    if "--weights" not in argv:
        argv += ["--weights", str(weights)]
    assert main(argv + ["--out", str(folder / "eval.json")] + SMALL) == 2
    err = capsys.readouterr().err
    assert named in err and "Traceback" not in err, err
    assert not (folder / "eval.json").exists()
