"""Every entry of the attack registry, tested by the same properties, and a new attack added in one place.

The properties (torchattacks / foolbox conventions): the adversarial images stay in the eps-ball and in
[0, 1], the model's train/eval flags are restored, the output follows the model's device, and a seeded run is
repeatable. They run over ``topkconv.attacks.REGISTRY``, so an attack registered later is tested too.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch

from topkconv.attacks import REGISTRY, WHITEBOX, Attack, PlanContext, Planned, Role, register
from topkconv.attacks.common import attack_mode, model_device, seeded
from topkconv.attacks.registry import budget_field, unregister
from topkconv.config import AttackConfig, from_dict
from topkconv.evaluate import ModelTraits

EPS = 16.0   # 0-255 units
# Small budgets so that every entry runs in a second or two on the digits models.
QUICK = AttackConfig(eps=EPS, budgets={"pgd": {"steps": 4, "step_size": 4.0}, "eot_pgd": {"samples": 2},
                                       "autoattack": {"iterations": 2, "attacks": ["apgd-ce"]},
                                       "square": {"queries": 10},
                                       "zeroth_order": {"steps": 2, "samples": [[0, 4]]}})


def _run(name, model, surrogate, x, y, seed=0):
    traits = ModelTraits(stochastic=False, routing=True, adaptive=tuple(REGISTRY))
    planned = REGISTRY[name].make(PlanContext(model, QUICK, traits, surrogate), EPS)
    with seeded(model, seed) as generator:
        return planned.run(x, y, generator, seed)


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_every_registered_attack_stays_in_the_ball_and_the_box_and_restores_the_mode(name, routing_mlp, surrogate,
                                                                                    digits_test):
    x, y = digits_test[0][:24], digits_test[1][:24]
    routing_mlp.train(True)
    routing_mlp[1].train(False)   # a mixed state must survive too
    before = [module.training for module in routing_mlp.modules()]
    try:
        x_adv = _run(name, routing_mlp, surrogate, x, y)
        after = [module.training for module in routing_mlp.modules()]
    finally:
        routing_mlp.eval()
    assert after == before and False in before and True in before, name
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype
    assert x_adv.device == model_device(routing_mlp)
    assert (x_adv - x).abs().max() <= EPS / 255 + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_every_registered_attack_repeats_under_the_same_seed(name, routing_mlp, surrogate, digits_test):
    x, y = digits_test[0][:16], digits_test[1][:16]
    first = _run(name, routing_mlp, surrogate, x, y, seed=3)
    assert torch.equal(_run(name, routing_mlp, surrogate, x, y, seed=3), first), name


def test_every_entry_declares_what_the_checks_read():
    for name, entry in REGISTRY.items():
        assert isinstance(entry.role, Role) and entry.suite in ("paper", "full"), name
        assert entry.variant_of is None or entry.variant_of in REGISTRY, name
        assert all(row == WHITEBOX or row in REGISTRY or any(e.row == row for e in REGISTRY.values())
                   for row in entry.must_not_beat), name
    # the paper's protocol is the paper suite, and the strong attacks run on the survivors when asked
    assert {n for n, e in REGISTRY.items() if e.suite == "paper"} == {"fgsm", "pgd_zero", "pgd_random", "eot_pgd"}
    assert {n for n, e in REGISTRY.items() if e.cascadable} >= {"square", "zeroth_order", "bpda_dense"}


def test_a_defence_naming_an_unregistered_adaptive_attack_is_an_error_naming_it(monkeypatch, mlp, digits_test):
    from topkconv import defenses
    from topkconv.evaluate import model_traits

    monkeypatch.setattr(defenses, "adaptive_attacks", lambda model: ("bpda_magic",))
    with pytest.raises(ValueError, match="adaptive attack 'bpda_magic'.*bpda_dense"):
        model_traits(mlp, digits_test[0][:4])


def test_an_unknown_key_of_an_attack_budget_is_an_error_naming_it():
    with pytest.raises(ValueError, match=r"attack\.pgd\.stepz"):
        from_dict(AttackConfig, {"pgd": {"stepz": 3}}, "attack")
    with pytest.raises(ValueError, match=r"attack\.'pgdd'"):
        AttackConfig(budgets={"pgdd": {}})
    # the flat keys of earlier spec files and run.json still read, into their sub-table
    old = from_dict(AttackConfig, {"pgd_steps": 3, "zo_samples": [[0, 4]], "indicator_draws": 7}, "attack")
    assert old.budget("pgd").steps == 3 and old.budget("zeroth_order").samples == [[0, 4]]
    assert old.indicators.draws == 7


def test_the_zeroth_order_reference_budget_counts_antithetic_pairs():
    from topkconv.attacks.zeroth_order import SCHEDULES, sample_schedule

    # Tramer et al.'s notebook: 100 / 1,000 / 20,000 samples per step = 50 / 500 / 10,000 pairs (x +- sigma u)
    assert sample_schedule(AttackConfig().budget("zeroth_order").samples) == [(0, 50), (20, 500), (40, 10000)]
    assert sample_schedule("reference-2x") == [(0, 100), (20, 1000), (40, 20000)]
    assert SCHEDULES["reference-2x"] == [[start, 2 * pairs] for start, pairs in SCHEDULES["reference"]]


# ---------------------------------------------------------------- a new attack: one registration, nothing else

@dataclass
class ToyBudget:
    scale: float = budget_field(default=1.0, help="the toy's step, a multiple of eps")


def _toy_plan(ctx: PlanContext, eps: float) -> Planned:
    """Steps every pixel by eps against the sign of (pixel - 0.5): a crude gradient-free attack."""
    scale = ctx.budget("toy_noise").scale

    def run(x, y, generator, seed):
        with attack_mode(ctx.model) as device:
            x = x.to(device)
            return (x - scale * eps / 255 * torch.sign(x - 0.5)).clamp(x - eps / 255, x + eps / 255).clamp(0, 1)

    return Planned({"eps": eps, "scale": scale}, run)


@pytest.fixture()
def toy_attack():
    register(Attack("toy_noise", _toy_plan, Role.GRADIENT_FREE, config=ToyBudget, must_not_beat=(WHITEBOX,),
                    description="a toy for the registry's test"))
    try:
        yield REGISTRY["toy_noise"]
    finally:
        unregister("toy_noise")


def test_a_registered_toy_attack_runs_through_topkconv_evaluate(toy_attack, tmp_path, capsys):
    from test_evaluate import _tiny_checkpoint
    from topkconv.cli import main

    run = _tiny_checkpoint(tmp_path / "run", defense="standard")
    code = main(["evaluate", str(run), "--suite", "full", "--n", "16", "--steps", "2", "--eps-curve", "0", "64",
                 "--apgd-iters", "2", "--autoattack-attacks", "apgd-ce", "--square-queries", "5", "--zo-steps", "0",
                 "--indicator-examples", "4", "--indicator-draws", "2", "--indicator-steps", "2",
                 "--toy-noise-scale", "0.5", "--no-progress", "--device", "cpu", "--curves", "0"])
    assert code == 0, capsys.readouterr().err
    assert not (run / "strength-curves.json").exists()   # --curves 0: the full suite without its curves
    result = json.loads((run / "eval.json").read_text())
    toy = result["attacks"]["toy_noise"]
    assert toy["params"] == {"eps": 8.0, "scale": 0.5} and 0 <= toy["accuracy"] <= result["clean"]
    assert "toy_noise" in result["worst_case"]["attacks"]             # counted in the per-example worst case
    assert "toy_noise" in result["masking_checks"]["blackbox_not_stronger"]   # judged by its role
    assert result["config"]["budgets"]["toy_noise"] == {"scale": 0.5}
    assert "--toy-noise-scale" in _evaluate_help(capsys)


def _evaluate_help(capsys) -> str:
    from topkconv.cli import main

    with pytest.raises(SystemExit):
        main(["evaluate", "--help"])
    return capsys.readouterr().out
