"""The evaluation suite and its gradient-masking checks, on tiny offline digits models.

Each masking check is shown to fire on a model built to mask gradients in one specific way, and not to
fire on a plain model. The models wrap the plain MLP of test_attacks.py (trained once per session).
"""

from __future__ import annotations

import dataclasses
import functools
import json

import pytest
import torch
from torch import nn

from test_attacks import eval_data, trained_mlp, trained_surrogate  # noqa: F401 (fixtures)
from topkconv.attacks.masking import CHECKS, masking_checks
from topkconv.config import AttackConfig
from topkconv.evaluate import evaluate, write_results
from topkconv.layers import TopKLinear, bpda_enabled

N = 200

# Fast full suite: AutoAttack reduced to APGD-CE with 20 iterations and Square to 300 queries.
FULL = AttackConfig(suite="full", eps=16, pgd_step_size=2.5, pgd_steps=16, eot_samples=4,
                    eps_curve=[0, 8, 16, 32, 64], apgd_iters=20, square_queries=300,
                    autoattack_attacks=["apgd-ce"], n_examples=N, batch_size=128, seed=0)


# ---------------------------------------------------------------- models that mask gradients on purpose

class _Gate(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by a per-example 0/1 ``keep`` mask."""

    @staticmethod
    def forward(ctx, x, keep):
        ctx.save_for_backward(keep)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        (keep,) = ctx.saved_tensors
        return grad * keep.view(-1, *([1] * (grad.dim() - 1))).to(grad.dtype), None


class RoundedInput(nn.Module):
    """Rounds its input to 16 grey levels: the gradient is zero everywhere (shattered gradients)."""

    def __init__(self, base):
        super().__init__()
        self.base = base

    def forward(self, x):
        return self.base(torch.round(x * 16) / 16)


class GradientOnlyOnTheDataGrid(nn.Module):
    """True gradient at images on the digits' 1/16 grid (clean ones), zero anywhere else: one FGSM
    step from the clean image works, PGD from a random start is stuck."""

    def __init__(self, base):
        super().__init__()
        self.base = base

    def forward(self, x):
        on_grid = ((x * 16 - torch.round(x * 16)).abs() < 1e-4).flatten(1).all(1)
        return self.base(_Gate.apply(x, on_grid))


class RandomlyGatedGradient(nn.Module):
    """Deterministic forward; the gradient reaches an example only with probability 0.1 per step, so
    PGD's result keeps moving with more steps or restarts."""

    def __init__(self, base, p=0.1):
        super().__init__()
        self.base, self.p = base, p
        self.generator = torch.Generator().manual_seed(0)

    def forward(self, x):
        keep = torch.rand(x.shape[0], generator=self.generator) < self.p
        return self.base(_Gate.apply(x, keep))


class MaskedTopKLinear(TopKLinear):
    """A routing layer whose own backward is zero, while its BPDA (dense) backward is intact."""

    def forward(self, x):
        out = super().forward(x)
        return out if bpda_enabled() else out.detach() + 0 * out


def masked_routing_model():
    base = trained_mlp()
    first = MaskedTopKLinear(64, 64, k=64)  # k = fan-in: exactly the dense layer in the forward pass
    first.load_state_dict(base[1].state_dict())
    return nn.Sequential(nn.Flatten(), first, nn.ReLU(), base[3]).eval()


MASKING_MODELS = {
    "pgd_beats_fgsm": lambda: GradientOnlyOnTheDataGrid(trained_mlp()),
    "falls_to_chance": lambda: RoundedInput(trained_mlp()),
    "blackbox_not_stronger": lambda: RoundedInput(trained_mlp()),
    "steps_restarts_converged": lambda: RandomlyGatedGradient(trained_mlp()),
    "bpda_not_stronger": masked_routing_model,
}


@functools.lru_cache(maxsize=None)
def full_result(name: str) -> dict:
    x, y = eval_data()
    model = trained_mlp() if name == "plain" else MASKING_MODELS[name]()
    return evaluate(model, x, y, FULL, surrogate=trained_surrogate(), progress=False)


# ---------------------------------------------------------------- the checks fire, and only when they should

@pytest.mark.parametrize("check", CHECKS)
def test_masking_check_fires_on_a_model_built_to_mask_gradients(check):
    result = full_result(check)
    verdict = result["masking_checks"][check]
    assert verdict["verdict"] == "flag", verdict


def test_no_masking_check_fires_on_a_plain_model():
    checks = full_result("plain")["masking_checks"]
    assert {name: c["verdict"] for name, c in checks.items()} == {
        "pgd_beats_fgsm": "pass", "falls_to_chance": "pass", "blackbox_not_stronger": "pass",
        "steps_restarts_converged": "pass", "bpda_not_stronger": "n/a"}, checks


def test_bpda_check_passes_on_a_plain_routing_model():
    first = TopKLinear(64, 64, k=64)
    base = trained_mlp()
    first.load_state_dict(base[1].state_dict())
    model = nn.Sequential(nn.Flatten(), first, nn.ReLU(), base[3]).eval()
    x, y = eval_data()
    cfg = dataclasses.replace(FULL, suite="full", eps_curve=[], n_examples=100)
    check = evaluate(model, x, y, cfg, progress=False)["masking_checks"]["bpda_not_stronger"]
    assert check["verdict"] == "pass", check


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
    ({"pgd": 0.30, "bpda_pgd": 0.31}, "bpda_not_stronger", "pass"),
    ({"pgd": 0.30, "bpda_pgd": 0.10}, "bpda_not_stronger", "flag"),
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


def test_bpda_check_is_not_applicable_without_routing_layers():
    check = masking_checks({"pgd": 0.3, "bpda_pgd": 0.1}, n=1000, num_classes=10, routing=False)
    assert check["bpda_not_stronger"]["verdict"] == "n/a"


# ---------------------------------------------------------------- the result: per attack, worst case, files

def test_full_result_reports_every_attack_and_the_per_example_worst_case():
    result = full_result("plain")
    attacks = result["attacks"]
    assert {"fgsm", "pgd", "autoattack", "square", "transfer", "pgd_2x_steps", "pgd_2x_restarts"} <= set(attacks)
    assert "eot_pgd" not in attacks and "bpda_pgd" not in attacks   # plain, deterministic model
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
    assert result["model"] == {"stochastic": False, "routing": False, "num_classes": 10}
    assert result["config"]["suite"] == "full" and result["seed"] == 0 and result["n"] == N


def test_full_suite_on_a_stochastic_model_uses_eot_and_autoattack_rand():
    from test_attacks import trained_sap

    x, y = eval_data()
    result = evaluate(trained_sap(), x, y, dataclasses.replace(FULL, eps_curve=[0, 64], n_examples=100),
                      progress=False)
    assert result["model"]["stochastic"] is True
    assert result["attacks"]["autoattack"]["params"]["version"] == "rand"
    assert result["attacks"]["eot_pgd"]["params"]["eot_samples"] == FULL.eot_samples
    assert [p["attack"] for p in result["eps_curve"]] == ["clean", "eot_pgd", "eot_pgd@64"]
    assert result["masking_checks"]["blackbox_not_stronger"]["whitebox"] == "eot_pgd"


class NoisyLogits(nn.Module):
    """Randomised in eval mode without any SAP layer: detected by running it twice."""

    def __init__(self, base):
        super().__init__()
        self.base = base

    def forward(self, x):
        return self.base(x) + 0.01 * torch.randn(x.shape[0], 10)


@pytest.mark.parametrize("make, expected", [
    (lambda: trained_mlp(), False),
    (lambda: NoisyLogits(trained_mlp()), True),
])
def test_randomness_is_detected_by_behaviour_too(make, expected):
    from topkconv.attacks import is_stochastic

    assert is_stochastic(make(), eval_data()[0][:8]) is expected


def test_paper_suite_is_fgsm_and_pgd_at_each_eps():
    x, y = eval_data()
    cfg = AttackConfig(suite="paper", eps=8, extra_eps=[16], n_examples=100)
    result = evaluate(trained_mlp(), x, y, cfg, progress=False)
    assert set(result["attacks"]) == {"fgsm", "pgd", "fgsm@16", "pgd@16"}
    assert result["attacks"]["pgd"]["params"] == {"eps": 8, "step_size": 0.75, "steps": 16, "restarts": 1,
                                                  "random_start": True}
    assert result["attacks"]["pgd@16"]["accuracy"] < result["attacks"]["pgd"]["accuracy"] < result["clean"]
    assert result["worst_case"]["attacks"] == ["fgsm", "pgd"]
    assert result["masking_checks"]["pgd_beats_fgsm"]["verdict"] == "pass"
    assert result["masking_checks"]["falls_to_chance"]["verdict"] == "n/a"
    assert result["eps_curve"] == []


def test_evaluate_leaves_the_model_in_its_mode():
    model = trained_mlp().train()
    x, y = eval_data()
    try:
        evaluate(model, x, y, dataclasses.replace(FULL, suite="paper", n_examples=20), progress=False)
        assert all(m.training for m in model.modules())
    finally:
        model.eval()


def test_evaluation_is_reproducible_and_independent_of_the_chunking_order():
    x, y = eval_data()
    cfg = dataclasses.replace(FULL, suite="paper", extra_eps=[32], n_examples=150, batch_size=50)
    first = evaluate(trained_mlp(), x, y, cfg, progress=False)
    second = evaluate(trained_mlp(), x, y, cfg, progress=False)
    strip = lambda r: {k: v["accuracy"] for k, v in r["attacks"].items()}  # noqa: E731
    assert strip(first) == strip(second)


def test_results_and_plot_are_written(tmp_path):
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
def test_bad_configs_raise_clear_errors(change, match):
    x, y = eval_data()
    with pytest.raises(ValueError, match=match):
        evaluate(trained_mlp(), x, y, dataclasses.replace(FULL, **change), progress=False)


# ---------------------------------------------------------------- checkpoint + CLI (pipeline code) integration

def _tiny_checkpoint(folder, defense="dynamic_k"):
    from topkconv.checkpoint import save_checkpoint
    from topkconv.config import DataConfig, DefenseConfig, ModelConfig, RunSpec
    from topkconv.models import build_model

    torch.manual_seed(0)
    model_cfg = ModelConfig(arch="vgg-small", num_classes=10, in_channels=1, image_size=32, hidden=16, width=0.125,
                            mean=[0.3], std=[0.3], defense=DefenseConfig(kind=defense, fc_k=[0.5, 0.5]))
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
                 "--no-progress"])
    assert code == 0
    result = json.loads((run / "eval.json").read_text())
    assert (run / "acc-vs-eps.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["evaluate", str(run), "--n", "8", "--out", str(run / "eval-paper.json"), "--no-progress"]) == 0
    assert (run / "eval-paper-acc-vs-eps.png").is_file()   # the full suite's plot is kept
    assert result["n"] == 24 and result["config"]["eps"] == 8 and result["config"]["pgd_steps"] == 3
    assert {"fgsm", "pgd", "autoattack", "square", "transfer", "bpda_pgd"} <= set(result["attacks"])
    assert result["model"]["routing"] is True
    assert set(result["masking_checks"]) == set(CHECKS)
    assert result["run"]["name"] == "tiny-dynamic_k" and "env" in result
    assert "worst case" in capsys.readouterr().out


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
        x, y = eval_data()
        for name in SHARD_MODELS:
            result = evaluate(_named_model(name), x, y, AttackConfig(**cfg_dict), progress=False)
            (out_dir / f"{name}-rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def _named_model(name):
    from test_attacks import trained_sap

    return {"mlp": trained_mlp, "sap": trained_sap}[name]()


def test_two_processes_give_the_numbers_of_one(tmp_path):
    import torch.multiprocessing as mp

    # 3 chunks of 50: rank 0 attacks chunks 0 and 2, rank 1 chunk 1
    cfg = dataclasses.replace(FULL, suite="paper", extra_eps=[32], eot_samples=2, n_examples=150, batch_size=50)
    mp.spawn(_sharded_worker, args=(2, tmp_path / "init", tmp_path, dataclasses.asdict(cfg)), nprocs=2, join=True)
    x, y = eval_data()
    for name in SHARD_MODELS:
        single = evaluate(_named_model(name), x, y, cfg, progress=False)
        for rank in range(2):
            sharded = json.loads((tmp_path / f"{name}-rank{rank}.json").read_text())
            assert sharded["timings"]["world_size"] == 2
            assert sharded["clean"] == single["clean"]
            assert {k: v["accuracy"] for k, v in sharded["attacks"].items()} == \
                {k: v["accuracy"] for k, v in single["attacks"].items()}
            assert sharded["worst_case"]["accuracy"] == single["worst_case"]["accuracy"]
