"""The evaluation suite and its gradient-masking checks, on tiny offline digits models.

Each masking check is shown to fire on a model built to mask gradients in one specific way, and not to
fire on a plain model. The models wrap the plain MLP of the conftest.py fixtures (trained once per session).
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from torch import nn

import trained_models
from masked_models import GradientOnlyOnTheDataGrid, RandomlyGatedGradient, RoundedInput
from topkconv.attacks.masking import CHECKS, masking_checks
from topkconv.config import AttackConfig
from topkconv.evaluate import evaluate, write_results
from topkconv.layers import TopKLinear, bpda_enabled

N = 200

# Fast full suite: AutoAttack reduced to APGD-CE with 20 iterations, Square to 300 queries, the
# zeroth-order attack to 10 steps of 50 noise pairs, the indicators to 100 examples and 20 draws.
FULL = AttackConfig(suite="full", eps=16, eps_curve=[0, 8, 16, 32, 64], n_examples=N, batch_size=128, seed=0,
                    budgets={"pgd": {"step_size": 2.5, "steps": 16}, "eot_pgd": {"samples": 4},
                             "autoattack": {"iterations": 20, "attacks": ["apgd-ce"]}, "square": {"queries": 300},
                             "zeroth_order": {"steps": 10, "step_size": 4.0, "samples": [[0, 50]]}},
                    indicators={"examples": 100, "draws": 20, "steps": 30})


# ---------------------------------------------------------------- models that mask gradients on purpose

class MaskedTopKLinear(TopKLinear):
    """A routing layer whose own backward is zero, while its BPDA (dense) backward is intact."""

    def forward(self, x):
        out = super().forward(x)
        return out if bpda_enabled() else out.detach() + 0 * out


def masked_routing_model(base):
    first = MaskedTopKLinear(64, 64, k=64)  # k = fan-in: exactly the dense layer in the forward pass
    first.load_state_dict(base[1].state_dict())
    return nn.Sequential(nn.Flatten(), first, nn.ReLU(), base[3]).eval()


MASKING_MODELS = {
    "pgd_beats_fgsm": GradientOnlyOnTheDataGrid,
    "falls_to_chance": RoundedInput,
    "blackbox_not_stronger": RoundedInput,
    "steps_restarts_converged": RandomlyGatedGradient,
    "bpda_not_stronger": masked_routing_model,
}


@pytest.fixture(scope="module")
def full_result(mlp, surrogate, digits_test):
    """The full suite on the plain MLP ("plain") or on one of MASKING_MODELS, each run once per module."""
    cache = {}

    def run(name: str) -> dict:
        if name not in cache:
            model = mlp if name == "plain" else MASKING_MODELS[name](mlp)
            cache[name] = evaluate(model, *digits_test, FULL, surrogate=surrogate, progress=False)
        return cache[name]

    return run


# ---------------------------------------------------------------- the checks fire, and only when they should

@pytest.mark.parametrize("check", CHECKS)
def test_masking_check_fires_on_a_model_built_to_mask_gradients(check, full_result):
    result = full_result(check)
    verdict = result["masking_checks"][check]
    assert verdict["verdict"] == "flag", verdict
    assert verdict["value"] > verdict["threshold"] or check == "falls_to_chance", verdict
    assert result["indicators"][check] == verdict          # the five checks are indicators too
    # a model that masks gradients also fails the binarization test of its PGD: "attack too weak" overrides
    assert result["verdict"]["verdict"] in ("masking suspected", "masking shown", "attack too weak"), result["verdict"]


def test_no_masking_check_fires_on_a_plain_model(full_result):
    checks = full_result("plain")["masking_checks"]
    assert {name: c["verdict"] for name, c in checks.items()} == {
        "pgd_beats_fgsm": "pass", "falls_to_chance": "pass", "blackbox_not_stronger": "pass",
        "steps_restarts_converged": "pass", "bpda_not_stronger": "n/a"}, checks
    assert full_result("plain")["verdict"]["text"] == "no masking indicated", full_result("plain")["indicators"]


def test_a_plain_model_under_an_unconverged_pgd_gets_attack_not_converged_not_masking(mlp, digits_test):
    """PGD-16 with steps of eps/16 reaches the eps-ball's surface only on its last step: doubling its steps
    still removes accuracy on the plain MLP. That is the attack's fault, so the line says so, not "masking"."""
    budgets = dict(FULL.budgets, pgd={"step_size": FULL.eps / 16, "steps": 16})
    result = evaluate(mlp, *digits_test, dataclasses.replace(FULL, eps_curve=[], budgets=budgets), progress=False)
    flagged = sorted(name for name, found in result["indicators"].items() if found["verdict"] == "flag")
    assert "steps_restarts_converged" in flagged, result["indicators"]["steps_restarts_converged"]
    assert result["verdict"]["verdict"] == "attack not converged", (result["verdict"], flagged)
    assert result["verdict"]["text"] == (f"attack not converged: robust accuracy is an upper bound "
                                         f"({', '.join(flagged)})")   # measured: both convergence flags


def test_bpda_check_passes_on_a_plain_routing_model(mlp, digits_test):
    first = TopKLinear(64, 64, k=64)
    base = mlp
    first.load_state_dict(base[1].state_dict())
    model = nn.Sequential(nn.Flatten(), first, nn.ReLU(), base[3]).eval()
    x, y = digits_test
    cfg = dataclasses.replace(FULL, suite="full", eps_curve=[], n_examples=100)
    result = evaluate(model, x, y, cfg, progress=False)
    check = result["masking_checks"]["bpda_not_stronger"]
    assert check["verdict"] == "pass", check
    # silent success and incomplete optimisation read the stand-ins' own loss traces too
    assert {"bpda_dense", "bpda_soft"} <= set(result["indicators"]["incomplete_optimisation"]["per_attack"])


@pytest.mark.parametrize("acc, name, verdict", [
    ({"fgsm": 0.40, "pgd": 0.30}, "pgd_beats_fgsm", "pass"),
    ({"fgsm": 0.40, "pgd": 0.405}, "pgd_beats_fgsm", "pass"),      # within the 1-point tolerance
    ({"fgsm": 0.40, "pgd": 0.41}, "pgd_beats_fgsm", "pass"),       # exactly at it, despite float rounding
    ({"fgsm": 0.40, "pgd": 0.45}, "pgd_beats_fgsm", "flag"),
    ({"pgd": 0.30, "square": 0.35, "transfer": 0.5}, "blackbox_not_stronger", "pass"),
    ({"pgd": 0.30, "square": 0.20}, "blackbox_not_stronger", "flag"),
    ({"pgd": 0.30, "transfer": 0.10}, "blackbox_not_stronger", "flag"),
    ({"pgd": 0.30}, "blackbox_not_stronger", "n/a"),
    ({"pgd": 0.30, "pgd_2x_steps": 0.295, "pgd_2x_restarts": 0.30}, "steps_restarts_converged", "pass"),
    ({"pgd": 0.21, "pgd_2x_steps": 0.21, "pgd_2x_restarts": 0.22}, "steps_restarts_converged", "pass"),
    ({"pgd": 0.30, "pgd_2x_steps": 0.25, "pgd_2x_restarts": 0.30}, "steps_restarts_converged", "flag"),
    ({"pgd": 0.30, "pgd_2x_steps": 0.30, "pgd_2x_restarts": 0.27}, "steps_restarts_converged", "flag"),
    ({"pgd": 0.30, "bpda_dense": 0.31}, "bpda_not_stronger", "pass"),
    ({"pgd": 0.30, "bpda_dense": 0.10}, "bpda_not_stronger", "flag"),
    ({"pgd": 0.30, "bpda_dense": 0.40, "bpda_soft": 0.10}, "bpda_not_stronger", "flag"),   # the stronger counts
    ({"pgd": 0.30, "pgd_random": 0.35, "pgd_2x_steps": 0.35, "pgd_2x_restarts": 0.35},
     "steps_restarts_converged", "pass"),   # the doubled random-start runs are compared with that start
])
def test_check_verdicts_from_numbers(acc, name, verdict):
    checks = masking_checks(acc, n=1000, num_classes=10, routing=True)
    assert checks[name]["verdict"] == verdict, checks[name]


@pytest.mark.parametrize("curve, verdict", [
    ([(0, 0.9), (8, 0.5), (64, 0.0)], "pass"),
    ([(0, 0.9), (8, 0.5), (64, 0.14)], "pass"),     # chance (0.1) + 5 points
    ([(0, 0.9), (8, 0.5), (64, 0.40)], "flag"),      # stays well above chance
    ([(0, 0.9), (8, 0.3), (16, 0.6), (64, 0.0)], "flag"),  # rises with eps
    ([], "n/a"),
])
def test_falls_to_chance_from_numbers(curve, verdict):
    points = [{"eps": e, "accuracy": a} for e, a in curve]
    assert masking_checks({}, n=1000, num_classes=10, curve=points)["falls_to_chance"]["verdict"] == verdict


@pytest.mark.parametrize("acc, verdict", [
    # BPDA ran on the white-box survivors only: its row is "white-box and BPDA"; 0.30 -> 0.20 is autoattack's
    ({"pgd": 0.30, "whitebox": 0.20, "bpda_dense": 0.20, "bpda_soft": 0.195}, "pass"),
    ({"pgd": 0.30, "whitebox": 0.20, "bpda_soft": 0.10}, "flag"),
], ids=["nothing-beyond-the-white-box-attacks", "broke-ten-points-more"])
def test_a_cascaded_bpda_is_judged_against_the_white_box_worst_case(acc, verdict):
    checks = masking_checks(acc, n=1000, num_classes=10, routing=True, bpda_reference="whitebox")
    assert checks["bpda_not_stronger"]["verdict"] == verdict, checks["bpda_not_stronger"]


def _outcomes(n: int, **broken: list) -> dict:
    """Per-example robust masks over n examples: every attack named breaks exactly the listed examples."""
    masks = {}
    for name, indices in broken.items():
        mask = torch.ones(n, dtype=torch.bool)
        mask[list(indices)] = False
        masks[name] = mask
    return masks


def _accuracies(outcomes: dict) -> dict:
    return {name: mask.float().mean().item() for name, mask in outcomes.items()}


@pytest.mark.parametrize("broken, name, verdict", [
    # 100 examples: the quick baseline at 24/255 (random-start PGD keeps 3, doubled steps 1): noise
    ({"pgd_random": range(97), "pgd_2x_steps": range(99), "pgd_2x_restarts": range(97)},
     "steps_restarts_converged", "pass"),
    # ... at 8/255 (19 broken, 30 with doubled steps, the 19 among them): an attack that had not converged
    ({"pgd_random": range(19), "pgd_2x_steps": range(30), "pgd_2x_restarts": range(19)},
     "steps_restarts_converged", "flag"),
    # a 3-point gap made of 10 examples one way and 7 the other is no evidence either
    ({"pgd_random": range(0, 20), "pgd_2x_steps": list(range(7, 20)) + list(range(20, 30)),
      "pgd_2x_restarts": range(0, 20)}, "steps_restarts_converged", "pass"),
    ({"pgd": range(10), "fgsm": range(7)}, "pgd_beats_fgsm", "pass"),
    ({"pgd": range(10), "square": range(12)}, "blackbox_not_stronger", "pass"),
    ({"pgd": range(10), "square": range(20)}, "blackbox_not_stronger", "flag"),
    ({"pgd": range(10), "bpda_soft": range(12)}, "bpda_not_stronger", "pass"),
    ({"pgd": range(10), "bpda_soft": range(16)}, "bpda_not_stronger", "flag"),
], ids=["2-examples-noise", "11-examples-not-converged", "10-vs-7-disagree", "fgsm-3-weaker",
        "square-2-more", "square-10-more", "bpda-2-more", "bpda-6-more"])
def test_a_gap_between_two_attacks_counts_only_when_the_sign_test_finds_it(broken, name, verdict):
    outcomes = _outcomes(100, **broken)
    acc = _accuracies(outcomes)
    check = masking_checks(acc, n=100, num_classes=10, routing=True, outcomes=outcomes)[name]
    assert check["verdict"] == verdict, check
    # every one of these gaps is beyond the 1-example tolerance, so without the outcomes each would flag
    if name != "pgd_beats_fgsm":
        assert masking_checks(acc, n=100, num_classes=10, routing=True)[name]["verdict"] == "flag"


def test_the_paired_test_counts_the_examples_the_attacks_disagree_on():
    from topkconv.attacks.masking import paired_test

    outcomes = _outcomes(50, pgd=range(0, 10), square=range(5, 18))
    test = paired_test(outcomes, "pgd", "square")
    assert test["broken_only_by"] == {"square": 8, "pgd": 5}
    assert test["p_value"] == pytest.approx(0.2905, abs=1e-4)   # P(Binomial(13, 1/2) >= 8)
    assert paired_test(outcomes, "pgd", "missing") is None


def test_bpda_check_is_not_applicable_without_routing_layers():
    check = masking_checks({"pgd": 0.3, "bpda_dense": 0.1}, n=1000, num_classes=10, routing=False)
    assert check["bpda_not_stronger"]["verdict"] == "n/a"


# ---------------------------------------------------------------- the result: per attack, worst case, files

def test_full_result_reports_every_attack_and_the_per_example_worst_case(full_result):
    result = full_result("plain")
    attacks = result["attacks"]
    assert {"fgsm", "pgd", "pgd_zero", "pgd_random", "autoattack", "square", "transfer", "zeroth_order",
            "pgd_2x_steps", "pgd_2x_restarts"} <= set(attacks)
    assert not {"eot_pgd", "bpda_dense", "bpda_soft"} & set(attacks)   # plain, deterministic model
    for name, entry in attacks.items():
        assert set(entry) == {"accuracy", "params", "n", "seconds"} and entry["n"] == N
        assert 0 <= entry["accuracy"] <= result["clean"]
    at_eps = [attacks[name]["accuracy"] for name in result["worst_case"]["attacks"]]
    assert result["worst_case"]["accuracy"] <= min(at_eps)
    # per example, not per attack: with several attacks breaking different examples, strictly below
    assert result["worst_case"]["accuracy"] < min(at_eps) or len(set(at_eps)) == 1
    assert [p["eps"] for p in result["eps_curve"]] == [0, 8, 16, 32, 64]
    assert result["eps_curve"][0]["accuracy"] == result["clean"]
    assert result["eps_curve"][2]["accuracy"] == attacks["pgd"]["accuracy"]
    assert result["model"] == {"stochastic": False, "routing": False, "num_classes": 10, "adaptive_attacks": []}
    # every eps with attacks has its own worst case, over every attack run at it
    assert [w["eps"] for w in result["worst_cases"]] == [8, 16, 32, 64]
    assert result["worst_case"] == result["worst_cases"][1]
    assert set(result["worst_case"]["attacks"]) == {name for name, a in attacks.items()
                                                    if a["params"]["eps"] == 16 and "worst_of" not in a["params"]}
    assert result["config"]["suite"] == "full" and result["seed"] == 0 and result["n_examples"] == N


def test_full_suite_on_a_stochastic_model_uses_eot_and_autoattack_rand(digits_test, sap_mlp):
    x, y = digits_test
    result = evaluate(sap_mlp, x, y, dataclasses.replace(FULL, eps_curve=[0, 64], n_examples=100),
                      progress=False)
    assert result["model"]["stochastic"] is True
    assert result["attacks"]["autoattack"]["params"]["version"] == "rand"
    assert result["attacks"]["eot_pgd"]["params"]["eot_samples"] == FULL.budget("eot_pgd").samples
    assert [p["attack"] for p in result["eps_curve"]] == ["clean", "eot_pgd", "eot_pgd@64"]
    assert result["masking_checks"]["blackbox_not_stronger"]["whitebox"] == "eot_pgd"


class NoisyLogits(nn.Module):
    """Randomised in eval mode without any SAP layer: detected by running it twice."""

    def __init__(self, base):
        super().__init__()
        self.base = base

    def forward(self, x):
        return self.base(x) + 0.01 * torch.randn(x.shape[0], 10)


@pytest.mark.parametrize("wrap, expected", [(lambda m: m, False), (NoisyLogits, True)], ids=["plain", "noisy"])
def test_randomness_is_detected_by_behaviour_too(wrap, expected, mlp, digits_test):
    from topkconv.evaluate import model_traits

    traits = model_traits(wrap(mlp), digits_test[0][:8])
    assert traits.stochastic is expected and ("eot_pgd" in traits.adaptive) is expected


def test_paper_suite_is_fgsm_and_pgd_at_each_eps(mlp, digits_test):
    x, y = digits_test
    cfg = AttackConfig(suite="paper", eps=8, extra_eps=[16], n_examples=100)
    result = evaluate(mlp, x, y, cfg, progress=False)
    assert set(result["attacks"]) == {"fgsm", "pgd_zero", "pgd_random", "pgd", "fgsm@16", "pgd_zero@16",
                                      "pgd_random@16", "pgd@16"}
    assert result["attacks"]["pgd_zero"]["params"] == {"eps": 8, "step_size": 0.75, "steps": 16, "restarts": 1,
                                                       "start": "zero"}
    assert result["attacks"]["pgd_random"]["params"]["start"] == "random"
    assert result["attacks"]["pgd"]["params"] == {"eps": 8, "worst_of": ["pgd_zero", "pgd_random"]}
    assert result["attacks"]["pgd@16"]["accuracy"] < result["attacks"]["pgd"]["accuracy"] < result["clean"]
    # "pgd" is the per-example worst of the two starts: at most either
    for suffix in ("", "@16"):
        both = [result["attacks"][f"pgd_{start}{suffix}"]["accuracy"] for start in ("zero", "random")]
        assert result["attacks"][f"pgd{suffix}"]["accuracy"] <= min(both)
    assert result["worst_case"]["attacks"] == ["fgsm", "pgd_zero", "pgd_random"]
    assert [(w["eps"], w["attacks"]) for w in result["worst_cases"]] == [
        (8, ["fgsm", "pgd_zero", "pgd_random"]), (16, ["fgsm@16", "pgd_zero@16", "pgd_random@16"])]
    assert result["masking_checks"]["pgd_beats_fgsm"]["verdict"] == "pass"
    assert result["masking_checks"]["falls_to_chance"]["verdict"] == "n/a"
    assert result["eps_curve"] == []


def test_a_log_gets_a_line_per_attack_and_a_switched_off_progress_prints_nothing(mlp, digits_test, capsys):
    x, y = digits_test
    cfg = AttackConfig(suite="paper", eps=8, n_examples=20, eps_curve=[])
    evaluate(mlp, x, y, cfg, progress=True)  # stderr is captured: not a terminal, so lines, not a bar
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(" (")[0] for line in lines] == [
        "evaluate: clean", "evaluate: fgsm", "evaluate: pgd_zero", "evaluate: pgd_random"]
    assert lines[-1].startswith("evaluate: pgd_random (4/4), ") and lines[-1].endswith(" s")
    evaluate(mlp, x, y, cfg, progress=False)
    assert capsys.readouterr().err == ""


def test_evaluate_leaves_the_model_in_its_mode(mlp, digits_test):
    model = mlp.train()
    x, y = digits_test
    try:
        evaluate(model, x, y, dataclasses.replace(FULL, suite="paper", n_examples=20), progress=False)
        assert all(m.training for m in model.modules())
    finally:
        model.eval()


def test_evaluation_is_reproducible_and_independent_of_the_chunking_order(mlp, digits_test, monkeypatch):
    import topkconv.evaluate.run as evaluate_module

    x, y = digits_test
    cfg = dataclasses.replace(FULL, suite="paper", extra_eps=[32], n_examples=150, batch_size=50)
    strip = lambda r: {k: v["accuracy"] for k, v in r["attacks"].items()}  # noqa: E731
    first = evaluate(mlp, x, y, cfg, progress=False)
    assert strip(evaluate(mlp, x, y, cfg, progress=False)) == strip(first)
    # the chunks attacked in the reverse order: every random draw is seeded per chunk, so nothing moves
    visited = []

    def reversed_order(n_chunks, rank, world):
        visited.append(list(reversed(range(rank, n_chunks, world))))
        return visited[-1]

    monkeypatch.setattr(evaluate_module, "chunk_order", reversed_order)
    assert strip(evaluate(mlp, x, y, cfg, progress=False)) == strip(first)
    assert visited == [[2, 1, 0]]
    monkeypatch.undo()
    # other chunks (batch 37) over the examples in another order: the attacks without random draws count
    # the same examples (a float rounding may move one), the random-start ones stay within sampling noise
    order = torch.randperm(150, generator=torch.Generator().manual_seed(1))
    other = strip(evaluate(mlp, x[:150][order], y[:150][order], dataclasses.replace(cfg, batch_size=37),
                           progress=False))
    for name, accuracy in strip(first).items():
        slack = 1 / 150 if name.startswith(("fgsm", "pgd_zero")) else 0.05
        assert abs(other[name] - accuracy) <= slack + 1e-9, (name, other[name], accuracy)


def test_results_and_plot_are_written(tmp_path, full_result):
    result = full_result("plain")
    out = tmp_path / "run" / "eval.json"
    write_results(result, out)
    assert json.loads(out.read_text())["attacks"]["pgd"]["accuracy"] == result["attacks"]["pgd"]["accuracy"]
    png = (tmp_path / "run" / "acc-vs-eps.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in out.parent.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("change, match", [
    (dict(suite="huge"), "suite"),
    (dict(eps=300.0), "0-255"),
    (dict(batch_size=0), "batch_size"),
])
def test_bad_configs_raise_clear_errors(change, match, mlp, digits_test):
    x, y = digits_test
    with pytest.raises(ValueError, match=match):
        evaluate(mlp, x, y, dataclasses.replace(FULL, **change), progress=False)


# ---------------------------------------------------------------- checkpoint + CLI (pipeline code) integration

def _tiny_checkpoint(folder, defense="dynamic_k"):
    from topkconv.checkpoint import save_checkpoint
    from topkconv.config import DataConfig, defense_config, ModelConfig, RunSpec
    from topkconv.models import build_model

    torch.manual_seed(0)
    model_cfg = ModelConfig(arch="vgg-small", num_classes=10, in_channels=1, image_size=32, hidden=16, width=0.125,
                            mean=[0.3], std=[0.3],
                            defense=defense_config(kind=defense, **({"fc_k": [0.5, 0.5]} if defense != "standard" else {})))
    spec = RunSpec(name=f"tiny-{defense}", data=DataConfig(name="digits", augment=False), model=model_cfg)
    save_checkpoint(folder, build_model(model_cfg).eval(), spec)
    return folder


def test_cli_evaluate_writes_eval_json_and_plot_for_a_checkpoint(tmp_path, capsys):
    from topkconv.cli import main

    run = _tiny_checkpoint(tmp_path / "run")
    baseline = _tiny_checkpoint(tmp_path / "baseline", defense="standard")
    code = main(["evaluate", str(run), "--suite", "full", "--surrogate", str(baseline), "--n", "24",
                 "--eps", "8", "--steps", "3", "--eps-curve", "0", "8", "64", "--apgd-iters", "3",
                 "--square-queries", "10", "--autoattack-attacks", "apgd-ce", "--batch-size", "16",
                 "--zo-steps", "2", "--zo-samples", "0:4", "--indicator-examples", "8", "--indicator-draws", "4",
                 "--indicator-steps", "3", "--no-progress"])
    assert code == 0
    result = json.loads((run / "eval.json").read_text())
    assert (run / "acc-vs-eps.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["evaluate", str(run), "--n", "8", "--out", str(run / "eval-paper.json"), "--no-progress"]) == 0
    assert (run / "eval-paper-acc-vs-eps.png").is_file()   # the full suite's plot is kept
    assert result["n_examples"] == 24 and result["config"]["eps"] == 8
    assert result["config"]["budgets"]["pgd"]["steps"] == 3
    assert {"fgsm", "pgd", "autoattack", "square", "transfer", "zeroth_order", "bpda_dense",
            "bpda_soft"} <= set(result["attacks"])
    assert result["model"]["routing"] is True
    assert set(result["masking_checks"]) == set(CHECKS) and set(CHECKS) < set(result["indicators"])
    assert result["verdict"]["text"]
    assert result["run"]["name"] == "tiny-dynamic_k" and "env" in result
    assert result["verdict"]["text"] in capsys.readouterr().out and (run / "eval.md").is_file()
    curves = json.loads((run / "strength-curves.json").read_text())   # part of --suite full without --curves N
    assert curves["n"] == 20 and curves["eps"] == 8 and curves["run"]["name"] == "tiny-dynamic_k"
    assert {"steps", "restarts", "eps", "zeroth_order"} == set(curves["curves"])


def test_cli_evaluate_names_a_missing_checkpoint(tmp_path, capsys):
    from topkconv.cli import main

    assert main(["evaluate", str(tmp_path / "nowhere"), "--no-progress"]) == 2
    assert "nowhere" in capsys.readouterr().err


# ---------------------------------------------------------------- sharding across processes

SHARD_MODELS = ("mlp", "sap")   # deterministic, and stochastic (SAP draws seeded per chunk)


def _sharded_worker(rank, world, init_file, out_dir, cfg_dict):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        x, y = trained_models.eval_data()
        for name in SHARD_MODELS:
            result = evaluate(_named_model(name), x, y, AttackConfig(**cfg_dict), progress=False)
            (out_dir / f"{name}-rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def _named_model(name):
    # the worker processes run outside pytest's fixtures, so they build the (cached) models themselves
    return {"mlp": trained_models.trained_mlp, "sap": trained_models.trained_sap}[name]()


def test_two_processes_give_the_numbers_of_one(tmp_path, digits_test):
    import torch.multiprocessing as mp

    # 3 chunks of 50: rank 0 attacks chunks 0 and 2, rank 1 chunk 1
    cfg = dataclasses.replace(FULL.with_budget("eot_pgd", samples=2), suite="paper", extra_eps=[32], n_examples=150,
                              batch_size=50)
    mp.spawn(_sharded_worker, args=(2, tmp_path / "init", tmp_path, dataclasses.asdict(cfg)), nprocs=2, join=True)
    x, y = digits_test
    for name in SHARD_MODELS:
        single = evaluate(_named_model(name), x, y, cfg, progress=False)
        for rank in range(2):
            sharded = json.loads((tmp_path / f"{name}-rank{rank}.json").read_text())
            assert sharded["timings"]["world_size"] == 2
            assert sharded["clean"] == single["clean"]
            assert {k: v["accuracy"] for k, v in sharded["attacks"].items()} == \
                {k: v["accuracy"] for k, v in single["attacks"].items()}
            assert sharded["worst_case"]["accuracy"] == single["worst_case"]["accuracy"]
