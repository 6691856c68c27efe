"""Pintor et al.'s transfer failure on a routing model's own stand-in models (surrogate_transfer_failure): the
stand-in model is what its name says, the attack on it runs to the end, and the indicator reads the numbers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from topkconv.attacks.bpda import plan_on_stand_in, stand_in_model
from topkconv.attacks.pgd import pgd
from topkconv.attacks.indicators import surrogate_transfer_failure, verdict
from topkconv.attacks.registry import PlanContext
from topkconv.config import AttackConfig
from topkconv.evaluate.measure import stand_in_transfer

EPS = 16.0   # 0-255 units
CFG = AttackConfig(suite="full", eps=EPS)


def _dense_twin(routing_mlp):
    """The routing MLP with its TopKLinear as the nn.Linear of the same weights: its dense stand-in by hand."""
    routed = routing_mlp[1]
    layer = nn.Linear(routed.in_features, routed.out_features)
    layer.load_state_dict(routed.state_dict())
    return nn.Sequential(routing_mlp[0], layer, routing_mlp[2], routing_mlp[3]).eval()


def test_the_dense_stand_in_model_is_the_dense_network_and_the_block_restores_the_model(routing_mlp, digits_test):
    x = digits_test[0][:32]
    ctx = PlanContext(routing_mlp, CFG)
    with torch.no_grad():
        exact = routing_mlp(x)
        with stand_in_model(ctx, "bpda_dense"):
            dense = routing_mlp(x)
        with stand_in_model(PlanContext(routing_mlp, CFG.with_budget("bpda_soft", tau=1e-6)), "bpda_soft"):
            soft_tight = routing_mlp(x)
        assert torch.allclose(dense, _dense_twin(routing_mlp)(x), atol=1e-5)
        assert not torch.allclose(dense, exact, atol=1e-3)          # k = 16 of 64: the two differ
        assert torch.allclose(soft_tight, exact, atol=1e-4)         # a near-zero temperature is the top-k itself
        assert torch.equal(routing_mlp(x), exact)                   # outside the block: the model again
    with pytest.raises(ValueError, match="bpda_dense"):
        with stand_in_model(ctx, "pgd"):
            pass


def test_the_stand_in_attack_takes_every_step_within_eps(routing_mlp, digits_test):
    """Its points go on past the first adversarial one: the last iterate's margin is deeper than PGD's stop."""
    x, y = digits_test[0][:50], digits_test[1][:50]
    planned = plan_on_stand_in(PlanContext(routing_mlp, CFG), "bpda_dense", EPS)
    x_adv = planned.run(x, y, None, 0)
    assert (x_adv - x).abs().max() <= EPS / 255 + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    twin = _dense_twin(routing_mlp)
    with torch.no_grad():
        fooled = twin(x_adv).argmax(1) != y
    assert fooled.float().mean() > 0.2, "the attack on the dense stand-in should fool it on some examples"
    # a single step of the same size moves less: the budget is spent to the end
    one_step = pgd(twin, x, y, EPS / 255, planned.params["step_size"] / 255, 1, start="zero", keep="last")
    with torch.no_grad():
        assert (twin(one_step).argmax(1) != y).sum() < fooled.sum()


def test_no_stand_in_or_no_success_is_not_applicable(cnn, routing_mlp, digits_test):
    x, y = digits_test[0][:20], digits_test[1][:20]
    assert stand_in_transfer(cnn, x, y, CFG)["verdict"] == "n/a"                 # no routing layer
    ctx = PlanContext(routing_mlp, CFG)
    clean = {"bpda_dense": (lambda: stand_in_model(ctx, "bpda_dense"), x)}       # the clean point fools nothing
    result = surrogate_transfer_failure(routing_mlp, clean, x, y, EPS / 255)
    assert result["verdict"] == "n/a" and result["per_stand_in"]["bpda_dense"]["successes"] == 0


def test_a_point_beyond_eps_does_not_count(routing_mlp, digits_test):
    x, y = digits_test[0][:50], digits_test[1][:50]
    ctx = PlanContext(routing_mlp, CFG)
    x_adv = plan_on_stand_in(ctx, "bpda_dense", EPS).run(x, y, None, 0)
    within = {"bpda_dense": (lambda: stand_in_model(ctx, "bpda_dense"), x_adv)}
    counted = surrogate_transfer_failure(routing_mlp, within, x, y, EPS / 255)["per_stand_in"]["bpda_dense"]
    smaller = surrogate_transfer_failure(routing_mlp, within, x, y, EPS / 2 / 255)
    assert counted["successes"] > 0 and smaller["verdict"] == "n/a"


def test_the_best_stand_in_decides_and_every_one_is_reported(routing_mlp, digits_test):
    """On the Dynamic-k MLP the dense stand-in's points mostly fail on the model (k = 16 of 64 differs from the
    dense layer by construction), the soft one's carry over: the soft one decides, and the model passes."""
    x, y = digits_test[0][:100], digits_test[1][:100]
    result = stand_in_transfer(routing_mlp, x, y, CFG, torch.Generator().manual_seed(0))
    shares = {name: found["failing_share"] for name, found in result["per_stand_in"].items()}
    assert result["verdict"] == "pass" and result["stand_in"] == "bpda_soft", result
    assert shares["bpda_dense"] > result["threshold"] > shares["bpda_soft"] == result["value"], result


def test_a_flag_makes_the_verdict_masking_suspected():
    found = verdict({"pgd": 0.5, "fgsm": 0.6}, {"surrogate_transfer_failure": {"verdict": "flag"}}, ["pgd"], n=1000)
    assert found["text"] == "masking suspected (indicators surrogate_transfer_failure)"


@pytest.mark.parametrize("layer_type", ["TopKConv2d", "TopKNeuronConv2d"])
def test_a_routing_convolution_computes_its_stand_ins_forward_and_backward(layer_type):
    """Dense: the nn.Conv2d of the same weights; soft at k = all channels: the same (every gate is 1)."""
    import topkconv.layers as layers
    from topkconv.layers.bpda import stand_in_values

    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, padding=1).double()
    routed = getattr(layers, layer_type).from_dense(conv, k=2)
    full = getattr(layers, layer_type).from_dense(conv, k=1.0)
    x = torch.rand(3, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    with layers.dense_gradients(), stand_in_values():
        dense = routed(x)
        (grad,) = torch.autograd.grad(dense.sum(), x)
    reference = conv(x)
    assert torch.allclose(dense, reference) and torch.allclose(grad, torch.autograd.grad(reference.sum(), x)[0])
    with torch.no_grad():
        exact = routed(x)
        with layers.soft_gradients(), stand_in_values():
            soft, soft_full = routed(x), full(x)
        with stand_in_values():   # the exact mode: the routed layer itself
            assert torch.equal(routed(x), exact)
    assert torch.allclose(soft_full, reference) and not torch.allclose(soft, exact)
    assert not torch.allclose(exact, reference)


def test_the_full_suite_reports_it_and_a_flag_reaches_the_verdict(routing_mlp, digits_test):
    import json

    from topkconv.evaluate import evaluate

    cfg = AttackConfig(suite="full", eps=16, eps_curve=[0], n_examples=60,
                       budgets={"pgd": {"step_size": 2.5}, "autoattack": {"iterations": 5, "attacks": ["apgd-ce"]},
                                "square": {"queries": 20}, "zeroth_order": {"steps": 3, "samples": [[0, 10]]},
                                "bpda_soft": {"tau": 10.0}},   # a loose soft stand-in: no stand-in predicts the model
                       indicators={"examples": 60, "draws": 5, "steps": 5, "binarization_examples": 0})
    result = json.loads(json.dumps(evaluate(routing_mlp, *digits_test, cfg, progress=False)))
    found = result["indicators"]["surrogate_transfer_failure"]
    assert set(found["per_stand_in"]) == {"bpda_dense", "bpda_soft"} and found["threshold"] == 0.5
    assert found["verdict"] == "flag", found
    assert "surrogate_transfer_failure" in result["verdict"]["flags"], result["verdict"]
