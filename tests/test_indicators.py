"""Each masking indicator fires on a model (or an attack) built to trigger it, and stays quiet on a plain CNN
trained in the tests; and the one-line verdict follows from the numbers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import adversarial_models
from masked_models import RoundedInput, StochasticInputDropout, ZeroedTopKActivation
from topkconv.attacks import pgd, square
from topkconv.attacks.indicators import (gradient_agreement, incomplete_optimisation, randomness, run_traced,
                                         selection_flip_rate, silent_success, square_beats_whitebox,
                                         baseline_transfer, reported_attack_traces, unavailable_gradients,
                                         unconstrained_failure, unstable_predictions, verdict,
                                         zero_gradient_at_start)
from topkconv.attacks.transfer import transfer
from topkconv.config import AttackConfig
from topkconv.evaluate.measure import stand_in_transfer
from topkconv.layers import TopKLinear

EPS = 16 / 255
N = 100


def _gen():
    return torch.Generator().manual_seed(0)


def _traced_pgd(model, steps):
    return lambda x, y, trace: pgd(model, x, y, EPS, 2.5 * EPS / steps, steps, start="zero", loss="margin",
                                   trace=trace)


def _last_restart_only(model):
    """A buggy two-restart attack: it returns the second restart's point (one step from a random start),
    not the best of the two, so examples the first restart fooled are lost."""
    def attack(x, y, trace):
        pgd(model, x, y, EPS, 2.5 * EPS / 30, 30, start="zero", loss="margin", trace=trace)
        return pgd(model, x, y, EPS, EPS / 8, 1, start="random", loss="margin", generator=_gen(), trace=trace)
    return attack


def _robust(model, x, y, x_adv):
    with torch.no_grad():
        return (model(x).argmax(1) == y) & (model(x_adv).argmax(1) == y)


def _baseline_transfer(model, mlp, x, y):
    """Transfer from the plain MLP against 30 steps of white-box PGD on the model, on the same examples."""
    x_adv = transfer(mlp, model, x, y, EPS, 2.5 * EPS / 16, 16, generator=_gen())
    x_whitebox = pgd(model, x, y, EPS, 2.5 * EPS / 30, 30, start="zero", loss="margin")
    return baseline_transfer(model, mlp, x, y, x_adv, x_whitebox)


def _stand_in_transfer(model, x, y, tau=None):
    """Pintor's transfer failure on the model's stand-in models at EPS (the soft one at temperature ``tau``)."""
    cfg = AttackConfig(suite="full", eps=EPS * 255).with_budget("bpda_soft", tau=tau)
    return stand_in_transfer(model, x, y, cfg, _gen())


def _square_vs_pgd(model, x, y):
    outcomes = {"pgd": _robust(model, x, y, pgd(model, x, y, EPS, EPS / 8, 20, start="zero")),
                "square": _robust(model, x, y, square(model, x, y, EPS, n_queries=300, seed=0))}
    acc = {name: mask.double().mean().item() for name, mask in outcomes.items()}
    return square_beats_whitebox(acc, ["pgd"], x.shape[0], outcomes=outcomes)


def _all_selected_routing(mlp):
    """The MLP's hidden layer as a TopKLinear with k = fan-in: it routes every input, so nothing flips."""
    layer = TopKLinear(64, 64, k=64)
    layer.load_state_dict(mlp[1].state_dict())
    return nn.Sequential(nn.Flatten(), layer, nn.ReLU(), mlp[3]).eval()


# name: (fires(models, x, y), quiet(models, x, y)); ``models`` holds the fixtures cnn, mlp and routing_mlp.
CASES = {
    "unavailable_gradients": (lambda m, x, y: unavailable_gradients(RoundedInput(m["cnn"]), x, y),
                              lambda m, x, y: unavailable_gradients(m["cnn"], x, y)),
    "unstable_predictions": (
        lambda m, x, y: unstable_predictions(StochasticInputDropout(m["cnn"]), x, y, draws=20, generator=_gen()),
        lambda m, x, y: unstable_predictions(m["cnn"], x, y, draws=20, generator=_gen())),
    "silent_success": (lambda m, x, y: silent_success(run_traced(m["cnn"], _last_restart_only(m["cnn"]), x, y)),
                       lambda m, x, y: silent_success(run_traced(m["cnn"], _traced_pgd(m["cnn"], 30), x, y))),
    "incomplete_optimisation": (
        lambda m, x, y: incomplete_optimisation(run_traced(m["cnn"], _traced_pgd(m["cnn"], 2), x, y)),
        lambda m, x, y: incomplete_optimisation(run_traced(m["cnn"], _traced_pgd(m["cnn"], 50), x, y))),
    # rounding to 16 levels zeroes the gradient, so white-box PGD breaks nothing, while perturbations from the
    # MLP beyond half a level (1/32) survive the rounding: transfer is the stronger attack (measured: 14 examples
    # broken by transfer alone, none by PGD alone)
    "baseline_transfer": (lambda m, x, y: _baseline_transfer(RoundedInput(m["cnn"]), m["mlp"], x, y),
                         lambda m, x, y: _baseline_transfer(m["cnn"], m["mlp"], x, y)),
    # the same Dynamic-k MLP, its soft stand-in loosened (tau = 10: every gate near 1/2, half the dense layer) so
    # that no stand-in predicts it (measured 0.71: 15 of 21 of the best stand-in's points failed on it); quiet on
    # a routing layer at k = fan-in, whose stand-ins are the model itself
    "surrogate_transfer_failure": (lambda m, x, y: _stand_in_transfer(m["routing_mlp"], x, y, tau=10.0),
                                   lambda m, x, y: _stand_in_transfer(_all_selected_routing(m["mlp"]), x, y)),
    "unconstrained_failure": (lambda m, x, y: unconstrained_failure(RoundedInput(m["cnn"]), x, y, 20, _gen()),
                              lambda m, x, y: unconstrained_failure(m["cnn"], x, y, 20, _gen())),
    "randomness": (lambda m, x, y: randomness(StochasticInputDropout(m["cnn"]), x),
                   lambda m, x, y: randomness(m["cnn"], x)),
    "zero_gradient_at_start": (lambda m, x, y: zero_gradient_at_start(RoundedInput(m["cnn"]), x, y, EPS, _gen()),
                               lambda m, x, y: zero_gradient_at_start(m["cnn"], x, y, EPS, _gen())),
    "square_beats_whitebox": (lambda m, x, y: _square_vs_pgd(RoundedInput(m["cnn"]), x, y),
                              lambda m, x, y: _square_vs_pgd(m["cnn"], x, y)),
    "selection_flip_rate": (lambda m, x, y: selection_flip_rate(m["routing_mlp"], x, generator=_gen()),
                            lambda m, x, y: selection_flip_rate(_all_selected_routing(m["mlp"]), x,
                                                                generator=_gen())),
    "gradient_agreement": (
        lambda m, x, y: gradient_agreement(ZeroedTopKActivation(m["cnn"], 2, 256), x, y, samples=100,
                                           generator=_gen()),
        lambda m, x, y: gradient_agreement(m["cnn"], x, y, samples=100, generator=_gen())),
}


@pytest.fixture(scope="module")
def models(cnn, mlp, routing_mlp):
    return {"cnn": cnn, "mlp": mlp, "routing_mlp": routing_mlp}


def _consistent(result):
    """The verdict follows from the value and the threshold (and the indicator says so in numbers)."""
    assert set(result) >= {"value", "threshold", "verdict"}
    if result["verdict"] != "n/a":
        below = result["value"] < result["threshold"]
        above = result["value"] > result["threshold"]
        assert (result["verdict"] == "flag") in (above, below)


OUTCOMES = [(name, 0, "flag") for name in CASES] + [(name, 1, "pass") for name in CASES]


@pytest.mark.parametrize("name, case, expected", OUTCOMES,
                         ids=[f"{name}-{'fires' if case == 0 else 'quiet'}" for name, case, _ in OUTCOMES])
def test_indicator_fires_on_a_model_built_to_trigger_it_and_stays_quiet_on_a_plain_one(name, case, expected,
                                                                                      models, digits_test):
    x, y = digits_test[0][:N], digits_test[1][:N]
    result = CASES[name][case](models, x, y)
    _consistent(result)
    assert result["verdict"] == expected, result


def test_routing_indicator_does_not_apply_to_a_model_without_routing(cnn, digits_test):
    assert selection_flip_rate(cnn, digits_test[0][:8])["verdict"] == "n/a"


def test_unavailable_gradients_reports_a_failing_gradient_call(digits_test):
    class NoGradient(nn.Module):
        def forward(self, x):
            with torch.no_grad():
                return torch.zeros(x.shape[0], 10).index_fill_(1, torch.tensor([0]), 1.0) + x.sum() * 0

    result = unavailable_gradients(NoGradient(), *[t[:4] for t in digits_test])
    assert result["verdict"] == "flag" and result["value"] == 1.0


@pytest.mark.parametrize("acc, indicators, expected", [
    ({"pgd": 0.50, "zeroth_order": 0.20, "square": 0.45}, {},
     "masking shown: attack zeroth_order beat attack pgd by 30.0 points"),
    ({"pgd": 0.50, "eot_pgd": 0.40, "transfer": 0.35}, {},
     "masking shown: attack transfer beat attack eot_pgd by 5.0 points"),
    ({"pgd": 0.50, "bpda_soft": 0.495}, {"randomness": {"verdict": "flag"}, "x": {"verdict": "pass"}},
     "masking suspected (indicators randomness)"),
    ({"pgd": 0.50, "fgsm": 0.60}, {"x": {"verdict": "pass"}, "y": {"verdict": "n/a"}}, "no masking indicated"),
], ids=["zeroth-order-beats-pgd", "against-the-strongest-white-box", "only-an-indicator", "nothing"])
def test_verdict_from_numbers(acc, indicators, expected):
    assert verdict(acc, indicators, ["pgd", "eot_pgd"], n=1000)["text"] == expected


FLAG = {"verdict": "flag"}
BINARIZATION_FAILED = {"verdict": "flag", "interval": [0.1, 0.5], "attack": "pgd", "passes": 3, "fails": 7,
                       "confidence": 0.95, "threshold": 0.9}


@pytest.mark.parametrize("indicators, kind, text", [
    ({"steps_restarts_converged": FLAG, "x": {"verdict": "pass"}}, "attack not converged",
     "attack not converged: robust accuracy is an upper bound (steps_restarts_converged)"),
    ({"steps_restarts_converged": FLAG, "incomplete_optimisation": FLAG}, "attack not converged",
     "attack not converged: robust accuracy is an upper bound (incomplete_optimisation, steps_restarts_converged)"),
    ({"incomplete_optimisation": FLAG, "randomness": FLAG}, "masking suspected",
     "masking suspected (indicators incomplete_optimisation, randomness)"),
    ({"incomplete_optimisation": FLAG, "binarization": BINARIZATION_FAILED}, "attack too weak", None),
], ids=["only-steps-restarts", "both-convergence-flags", "with-a-masking-indicator", "binarization-failed"])
def test_convergence_flags_alone_say_the_attack_had_not_converged(indicators, kind, text):
    """Not converging is the attack's fault (more budget still removes accuracy), not a sign of masking; any
    other flag keeps "masking suspected" and the line lists every flag."""
    found = verdict({"pgd": 0.5, "fgsm": 0.6}, indicators, ["pgd"], n=1000)
    assert found["verdict"] == kind, found
    assert text is None or found["text"] == text
    assert "incomplete_optimisation" in found["flags"] or "steps_restarts_converged" in found["flags"]


def test_masking_shown_is_kept_when_a_convergence_flag_is_also_raised():
    found = verdict({"pgd": 0.50, "zeroth_order": 0.20}, {"steps_restarts_converged": FLAG}, ["pgd"], n=1000)
    assert found["verdict"] == "masking shown" and found["flags"] == ["steps_restarts_converged"], found


@pytest.mark.parametrize("broken, expected", [
    # 100 examples; the cascaded square can only break what the white-box worst case left
    ({"pgd": range(10), "whitebox": range(14), "square": range(18)}, "masking suspected (indicators randomness)"),   # 4: p = 0.06
    ({"pgd": range(10), "whitebox": range(14), "square": range(20)},
     "found 6 examples the white-box attacks missed (p = 0.016; attack square on the white-box survivors)"),  # 6
], ids=["4-examples-not-significant", "6-examples-shown"])
def test_masking_is_shown_only_when_the_sign_test_finds_the_gap(broken, expected):
    outcomes = {}
    for name, indices in broken.items():
        outcomes[name] = torch.ones(100, dtype=torch.bool)
        outcomes[name][list(indices)] = False
    acc = {name: mask.float().mean().item() for name, mask in outcomes.items()}
    result = verdict(acc, {"randomness": {"verdict": "flag"}}, ["pgd", "eot_pgd"], n=100, cascaded=["square"],
                     outcomes=outcomes)
    assert result["text"] == expected, result
    # the 4-example gap is beyond the one-example slack: without the outcomes it is shown
    assert verdict(acc, {}, ["pgd", "eot_pgd"], n=100, cascaded=["square"])["verdict"] == "white-box misses found"


@pytest.mark.parametrize("acc, expected", [
    # square ran on the white-box survivors only: 0.5 -> 0.395 is mostly pgd_2x_steps's doing, not square's
    ({"pgd": 0.50, "pgd_2x_steps": 0.40, "whitebox": 0.40, "square": 0.395}, "no masking indicated"),
    ({"pgd": 0.50, "whitebox": 0.40, "zeroth_order": 0.30},
     "found 100 examples the white-box attacks missed (p not computed: no per-example outcomes; attack "
     "zeroth_order on the white-box survivors)"),
], ids=["within-one-example-of-the-white-box-worst-case", "beyond-it"])
def test_a_cascaded_attack_is_judged_against_the_white_box_worst_case(acc, expected):
    cascaded = [name for name in ("square", "zeroth_order") if name in acc]
    assert verdict(acc, {}, ["pgd", "eot_pgd"], n=1000, cascaded=cascaded)["text"] == expected


def _masks(n: int, **broken) -> dict:
    masks = {}
    for name, indices in broken.items():
        masks[name] = torch.ones(n, dtype=torch.bool)
        masks[name][list(indices)] = False
    return masks


@pytest.mark.parametrize("square_broke, expected", [
    (range(4, 24), "masking shown"),                  # 20 broken by square alone, 4 by pgd alone: p < 0.01
    (list(range(4, 12)) + [0], "no masking indicated"),  # 8 vs 3: the same gap size one way, not significant
], ids=["significant", "disagreements-both-ways"])
def test_masking_shown_needs_a_sign_test_that_can_fail_both_ways(square_broke, expected):
    """Square on every example against PGD: the examples PGD alone broke count against it."""
    outcomes = _masks(100, pgd=range(4), square=square_broke)
    acc = {name: mask.float().mean().item() for name, mask in outcomes.items()}
    found = verdict(acc, {}, ["pgd"], n=100, outcomes=outcomes)
    assert found["verdict"] == expected, found
    if expected == "masking shown":
        assert found["paired_test"]["broken_only_by"] == {"square": 20, "pgd": 4}


@pytest.fixture(scope="module")
def adversarially_trained(mlp, routing_mlp):
    """The fixtures with the CNN replaced by the PGD-trained one (the positive control of test_adversarial.py)."""
    return {"cnn": adversarial_models.trained("pgd"), "mlp": mlp, "routing_mlp": routing_mlp}


@pytest.mark.parametrize("name", list(CASES))
def test_indicator_stays_quiet_on_an_adversarially_trained_cnn(name, adversarially_trained, digits_test):
    """A genuinely robust model: its attacks fail because it is robust, not because its gradients mislead."""
    x, y = digits_test[0][:N], digits_test[1][:N]
    result = CASES[name][1](adversarially_trained, x, y)
    assert result["verdict"] in ("pass", "n/a"), result


# ---------------------------------------------------------------- on the traces of the reported attacks

def _record(loss, fooled, returned_fooled, index):
    """One attack run's trace as evaluate.run keeps it: (T, b) loss and fooled, (b,) returned, (b,) index."""
    return {"loss": torch.tensor(loss, dtype=torch.float64).T, "fooled": torch.tensor(fooled).T,
            "returned_fooled": torch.tensor(returned_fooled), "index": torch.tensor(index)}


RISING, SETTLED = [float(t) for t in range(21)], [float(min(t, 5)) for t in range(21)]
NEVER = [False] * 21


def test_silent_success_counts_the_adversarial_examples_the_worst_case_lost():
    # example 0: fooled at step 3, returned unfooled; example 1 fooled and returned so; example 2 never fooled
    path = [NEVER[:3] + [True] + NEVER[4:], [False] + [True] * 20, NEVER]
    traces = {"lossy": [_record([RISING] * 3, path, [False, True, False], [0, 1, 2])]}
    lost = reported_attack_traces(traces, torch.tensor([True, False, True]), examples=3)["silent_success"]
    assert (lost["verdict"], lost["examples"]) == ("flag", 1) and lost["value"] == pytest.approx(1 / 3)
    assert lost["per_attack"]["lossy"]["silent_success"] == pytest.approx(1 / 3)
    # another attack broke example 0: the worst case did not lose it
    assert reported_attack_traces(traces, torch.tensor([False, False, True]), 3)["silent_success"]["verdict"] == "pass"


def test_incomplete_optimisation_counts_robust_examples_every_traced_attack_left_still_moving():
    def traces(second_on_example_1):
        return {"pgd": [_record([RISING, RISING], [NEVER, NEVER], [False, False], [0, 1])],
                "pgd_2x_steps": [_record([SETTLED, second_on_example_1], [NEVER, NEVER], [False, False], [0, 1])]}

    robust = torch.tensor([True, True])
    moving = reported_attack_traces(traces(RISING), robust, 2)["incomplete_optimisation"]
    assert (moving["verdict"], moving["value"], moving["examples"]) == ("flag", 0.5, 2)   # example 1 only
    assert moving["per_attack"]["pgd"]["incomplete_optimisation"] == 1.0
    assert reported_attack_traces(traces(SETTLED), robust, 2)["incomplete_optimisation"]["verdict"] == "pass"
    # beyond the indicators' examples nothing counts; with no trace at all the indicators do not apply
    assert reported_attack_traces(traces(RISING), robust, 1)["incomplete_optimisation"]["value"] == 0.0
    assert reported_attack_traces({}, robust, 2)["silent_success"]["verdict"] == "n/a"
