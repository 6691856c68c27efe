"""Attacks tested by the accuracy they really remove, on tiny models trained offline on sklearn digits (8x8).

Cases are tables (pytest.mark.parametrize), foolbox style. The models are conftest.py fixtures, trained
once per test session in a few seconds on two CPU cores.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from topkconv.attacks import accuracy, autoattack, fgsm, pgd, square, transfer, zeroth_order
from topkconv.layers import dense_gradients

EPS = 16 / 255          # digits pixels are multiples of 1/16: eps = one grey level moves accuracy a lot
STEPS = 16
STEP = 2.5 * EPS / STEPS




# ---------------------------------------------------------------- the attacks remove accuracy

def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


ATTACKS = {
    "fgsm": lambda m, x, y, eps: fgsm(m, x, y, eps),
    "pgd": lambda m, x, y, eps: pgd(m, x, y, eps, STEP * eps / EPS, STEPS, generator=_gen()),
    "pgd-margin": lambda m, x, y, eps: pgd(m, x, y, eps, STEP * eps / EPS, STEPS, loss="margin", generator=_gen()),
    "pgd-restarts": lambda m, x, y, eps: pgd(m, x, y, eps, 2.5 * eps / 4, 4, restarts=3, generator=_gen()),
    "pgd-zero-start": lambda m, x, y, eps: pgd(m, x, y, eps, STEP * eps / EPS, STEPS, start="zero"),
    # gradient-free: 16 sign steps on finite differences of 100 noise pairs
    "zeroth-order": lambda m, x, y, eps: zeroth_order(m, x, y, eps, steps=STEPS, step_size=STEP * eps / EPS,
                                                      sigma=8 / 255, samples=100, generator=_gen()),
}


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_attack_lowers_accuracy_by_a_real_margin(name, mlp, digits_test):
    model = mlp
    x, y = digits_test
    clean = accuracy(model, x, y)
    attacked = accuracy(model, ATTACKS[name](model, x, y, EPS), y)
    assert clean > 0.9
    assert attacked < clean - 0.2, (name, clean, attacked)


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_eps_zero_leaves_accuracy_unchanged(name, mlp, digits_test):
    model = mlp
    x, y = digits_test
    x_adv = ATTACKS[name](model, x, y, 0.0)
    assert torch.equal(x_adv, x)
    assert accuracy(model, x_adv, y) == accuracy(model, x, y)


@pytest.mark.parametrize("name", sorted(ATTACKS))
@pytest.mark.parametrize("eps", [4 / 255, EPS, 64 / 255])
def test_adversarial_inputs_stay_in_the_ball_and_in_range(name, eps, mlp, digits_test):
    model = mlp
    x, y = digits_test
    x_adv = ATTACKS[name](model, x, y, eps)
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype
    assert (x_adv - x).abs().max() <= eps + 1e-6
    assert x_adv.min() >= 0 and x_adv.max() <= 1


@pytest.mark.parametrize("name", sorted(ATTACKS))
@pytest.mark.parametrize("training", [True, False])
def test_model_mode_is_restored(name, training, mlp, digits_test):
    model = mlp
    x, y = digits_test
    model.train(training)
    model[1].train(not training)  # a mixed state must survive too
    try:
        ATTACKS[name](model, x[:20], y[:20], EPS)
        assert model.training == training and model[1].training == (not training)
    finally:
        model.eval()


def test_model_mode_is_restored_when_the_attack_raises(digits_test):
    class Exploding(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(64, 10)

        def forward(self, x):
            assert not self.training, "attacks must run in eval mode"
            raise RuntimeError("boom")

    model = Exploding().train()
    x, y = digits_test
    with pytest.raises(RuntimeError, match="boom"):
        pgd(model, x[:4], y[:4], EPS, STEP, 2)
    assert model.training and model.linear.training


def test_targeted_pgd_reaches_its_targets(mlp, digits_test):
    model = mlp
    x, y = digits_test
    target = (y + 1) % 10
    x_adv = pgd(model, x, target, 64 / 255, 10 / 255, 20, targeted=True, generator=_gen())
    assert accuracy(model, x_adv, target) > 0.8


def test_pgd_is_reproducible_with_a_generator(mlp, digits_test):
    model = mlp
    x, y = digits_test
    first = pgd(model, x, y, EPS, STEP, 4, generator=_gen(5))
    second = pgd(model, x, y, EPS, STEP, 4, generator=_gen(5))
    assert torch.equal(first, second)


@pytest.mark.parametrize("bad, match", [
    (dict(eps=8.0), "eps"),
    (dict(loss="hinge"), "loss"),
    (dict(steps=-1), "steps"),
    (dict(restarts=0), "restarts"),
    (dict(start="middle"), "start"),
    (dict(keep="best"), "keep"),
    (dict(x=torch.full((2, 1, 8, 8), 255.0)), r"\[0, 1\]"),
    (dict(y=torch.zeros(3, dtype=torch.long)), "y"),
])
def test_bad_arguments_raise_clear_errors(bad, match, mlp):
    model = mlp
    args = dict(x=torch.rand(2, 1, 8, 8), y=torch.zeros(2, dtype=torch.long), eps=EPS, step_size=STEP, steps=2)
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        pgd(model, **args)


# ---------------------------------------------------------------- agreement with independent implementations

def independent_pgd(model, x, y, eps, alpha, steps, seed):
    """A plain PGD loop written from the textbook (Madry et al.), sharing no code with topkconv."""
    torch.manual_seed(seed)
    x_adv = (x + torch.empty_like(x).uniform_(-eps, eps)).clamp(0, 1)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        loss = F.cross_entropy(model(x_adv), y)
        (grad,) = torch.autograd.grad(loss, x_adv)
        x_adv = x_adv.detach() + alpha * grad.sign()
        x_adv = torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0, 1)
    return x_adv.detach()


@pytest.mark.parametrize("eps", [8 / 255, 16 / 255, 24 / 255])
def test_pgd_agrees_with_an_independent_implementation(eps, mlp, digits_test):
    model = mlp
    x, y = digits_test
    ours = accuracy(model, pgd(model, x, y, eps, 2.5 * eps / STEPS, STEPS, generator=_gen(1)), y)
    theirs = accuracy(model, independent_pgd(model, x, y, eps, 2.5 * eps / STEPS, STEPS, seed=1), y)
    assert abs(ours - theirs) <= 0.02, (ours, theirs)


def test_pgd_keeping_the_last_iterate_is_the_textbook_loop_from_the_clean_point(mlp, digits_test):
    """keep="last" runs every step (what a transfer attack needs); keep="first" stops at the boundary, so its
    points sit at a shallower margin than the end of the same run."""
    x, y = digits_test
    eps, alpha = 16 / 255, 4 / 255
    expected = x.clone()
    for _ in range(STEPS):
        expected.requires_grad_(True)
        (grad,) = torch.autograd.grad(F.cross_entropy(mlp(expected), y), expected)
        expected = torch.min(torch.max(expected.detach() + alpha * grad.sign(), x - eps), x + eps).clamp(0, 1)
    last = pgd(mlp, x, y, eps, alpha, STEPS, start="zero", keep="last")
    first = pgd(mlp, x, y, eps, alpha, STEPS, start="zero")
    assert torch.allclose(last, expected, atol=1e-6)
    with torch.no_grad():
        margin = lambda points: mlp(points).gather(1, y[:, None]).squeeze(1)  # noqa: E731  (true-class logit)
        fooled = mlp(first).argmax(1) != y
        assert fooled.sum() > 10 and (margin(last)[fooled] < margin(first)[fooled]).float().mean() > 0.6


def test_apgd_ce_is_not_far_above_our_pgd(mlp, digits_test):
    model = mlp
    x, y = digits_test
    ours = accuracy(model, pgd(model, x, y, EPS, STEP, STEPS, restarts=2, generator=_gen()), y)
    apgd = accuracy(model, autoattack(model, x, y, EPS, attacks=["apgd-ce"], n_iter=50, seed=0), y)
    # APGD-CE is a strong white-box attack: if our PGD is much weaker, our PGD is broken.
    assert apgd <= ours + 0.03, (apgd, ours)
    assert apgd < accuracy(model, x, y) - 0.2


def test_square_black_box_lowers_accuracy(mlp, digits_test):
    model = mlp
    x, y = digits_test
    x_adv = square(model, x, y, EPS, n_queries=200, seed=0)
    assert (x_adv - x).abs().max() <= EPS + 1e-6
    assert accuracy(model, x_adv, y) < accuracy(model, x, y) - 0.1


def test_transfer_from_a_surrogate_lowers_accuracy(mlp, digits_test, surrogate):
    model, surrogate = mlp, surrogate
    x, y = digits_test
    x_adv = transfer(surrogate, model, x, y, EPS, STEP, STEPS, generator=_gen())
    assert accuracy(model, x_adv, y) < accuracy(model, x, y) - 0.1


# ---------------------------------------------------------------- EOT and BPDA

def test_eot_lowers_sap_accuracy_compared_with_a_single_draw(digits_test, sap_mlp):
    model = sap_mlp
    x, y = digits_test
    torch.manual_seed(0)
    single = accuracy(model, pgd(model, x, y, EPS, STEP, 8, eot_samples=1, generator=_gen()), y)
    torch.manual_seed(0)
    eot = accuracy(model, pgd(model, x, y, EPS, STEP, 8, eot_samples=8, generator=_gen()), y)
    assert eot < single - 0.03, (eot, single)


def test_bpda_switch_changes_gradients_not_outputs_for_the_attack(digits_test, routing_mlp):
    model = routing_mlp
    x, y = digits_test
    x_adv_plain = pgd(model, x, y, EPS, STEP, STEPS, generator=_gen())
    with dense_gradients():
        x_adv_bpda = pgd(model, x, y, EPS, STEP, STEPS, generator=_gen())
        outputs_bpda = model(x)
    outputs_plain = model(x)
    torch.testing.assert_close(outputs_bpda, outputs_plain)
    assert not torch.equal(x_adv_plain, x_adv_bpda)  # the attack followed a different gradient
    assert accuracy(model, x_adv_bpda, y) < accuracy(model, x, y) - 0.1


def test_autoattack_standard_runs_on_a_model_with_few_classes(digits_test):
    torch.manual_seed(0)
    x, y = digits_test
    keep = y < 4
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 4))
    x_adv = autoattack(model, x[keep][:16], y[keep][:16], EPS, n_iter=2, square_queries=5, seed=0)
    assert (x_adv - x[keep][:16]).abs().max() <= EPS + 1e-6


@pytest.mark.parametrize("eot_iter", [None, 3], ids=["autoattack-default-20", "eot_samples-3"])
def test_autoattack_rand_averages_eot_iter_draws_per_gradient(eot_iter, digits_test, sap_mlp):
    # Every APGD iteration of the rand version takes eot_iter forward passes for its gradient, so the count of
    # gradient-carrying passes of one iteration-run tells the draws used (AutoAttack's own default: 20).
    x, y = digits_test
    passes = []
    hook = sap_mlp.register_forward_hook(lambda m, i, o: passes.append(torch.is_grad_enabled()))
    try:
        autoattack(sap_mlp, x[:4], y[:4], EPS, version="rand", attacks=["apgd-ce"], n_iter=2, seed=0,
                   eot_iter=eot_iter)
    finally:
        hook.remove()
    draws = 20 if eot_iter is None else eot_iter
    # APGD's first gradient and one per iteration (n_iter=2), each over the draws; plus one more pass that
    # pyautoattack makes with gradients on (counted, measured: 4 passes with eot_iter=1)
    assert sum(passes) == draws * 3 + 1, sum(passes)


def test_autoattack_refuses_eot_iter_outside_the_rand_version(mlp, digits_test):
    x, y = digits_test
    with pytest.raises(ValueError, match="eot_iter"):
        autoattack(mlp, x[:4], y[:4], EPS, version="standard", eot_iter=4)


def test_autoattack_rejects_unknown_attack_names(mlp, digits_test):
    x, y = digits_test
    with pytest.raises(ValueError, match="apgd-xx"):
        autoattack(mlp, x[:4], y[:4], EPS, attacks=["apgd-xx"])


def test_seeded_puts_back_the_sap_generators_and_the_global_random_state(sap_mlp):
    # (that seeded() fixes SAP's draws is tested with the defences in test_baselines.py)
    from topkconv.attacks.common import seeded

    model = sap_mlp
    own = torch.Generator().manual_seed(123)
    model[3].generator = own
    try:
        torch.manual_seed(5)
        expected = torch.rand(3)
        torch.manual_seed(5)
        with seeded(model, 7) as generator:
            assert model[3].generator is not own and generator is not own
            torch.rand(10)
        assert model[3].generator is own
        assert torch.equal(torch.rand(3), expected)
    finally:
        model[3].generator = None


@pytest.mark.parametrize("schedule, per_example", [("reference", [100, 100, 1000]), ("reference-2x", [200, 200, 2000])],
                         ids=["reference", "reference-2x"])
def test_zeroth_order_reference_schedule_runs_the_notebooks_forward_passes(schedule, per_example, mlp, digits_test):
    # Tramer et al.'s 01_kwta notebook: 100 samples a step (iterations 0-19), then 1,000 (20-39), looping over
    # samples // 2 antithetic pairs x +- sigma u: 100 and 1,000 forward passes a step. "reference-2x" is twice it.
    from topkconv.attacks.zeroth_order import PAPER_STEPS, SCHEDULES, total_pairs

    calls = []

    class Counting(nn.Module):
        def __init__(self):
            super().__init__()
            self.base = mlp

        def forward(self, inputs):
            calls.append(inputs.shape[0])
            return self.base(inputs)

    x = digits_test[0][:1]
    own = mlp(x).argmax(1)   # the model's own label: never fooled within eps = 1e-6, so every step runs
    for iteration, expected in zip((0, 19, 20), per_example):
        calls.clear()
        zeroth_order(Counting(), x, own, 1e-6, steps=iteration + 1, samples=schedule, max_batch=10 ** 6,
                     generator=torch.Generator().manual_seed(0))
        assert calls[-2] == expected, (iteration, calls[-2:])   # the last step's estimate, then its judging pass
    assert total_pairs("reference", PAPER_STEPS) == 20 * 50 + 20 * 500 + 60 * 10000
    assert total_pairs(schedule, PAPER_STEPS) == total_pairs("reference", PAPER_STEPS) * per_example[0] // 100
    assert SCHEDULES["reference"] == [[0, 50], [20, 500], [40, 10000]]


def test_predictions_and_accuracies_build_no_autograd_graph(mlp, digits_test):
    """Judging examples is forward-only: the model runs with gradients off (no graph to build or keep)."""
    modes = []
    handle = mlp.register_forward_hook(lambda module, inputs, output: modes.append(torch.is_grad_enabled()))
    try:
        accuracy(mlp, *digits_test)
    finally:
        handle.remove()
    assert modes and not any(modes)
