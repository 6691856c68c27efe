"""The zeroth-order attack (Tramèr et al. 2020's k-WTA break): it beats PGD where the gradient is masked,
matches PGD where it is not, and keeps its promises on schedules, early stopping and the forward budget."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from masked_models import RoundedInput, ZeroedTopKActivation
from topkconv.attacks import accuracy, pgd, zeroth_order
from topkconv.attacks.zeroth_order import estimate_gradient, sample_schedule, samples_at

EPS = 24 / 255
N = 200
PGD_STEPS = 20


def _zo(model, x, y, **options):
    settings = dict(steps=20, step_size=EPS / 8, sigma=8 / 255, samples=[[0, 50], [10, 200]],
                    generator=torch.Generator().manual_seed(0))
    settings.update(options)
    return zeroth_order(model, x, y, EPS, **settings)


def _pgd(model, x, y):
    return pgd(model, x, y, EPS, EPS / 8, PGD_STEPS, start="zero")


MASKED = {
    "quantised-input": lambda cnn: RoundedInput(cnn),
    "topk-activation-zeroed-backward": lambda cnn: ZeroedTopKActivation(cnn, split=2, k=256),
}


@pytest.mark.parametrize("make", MASKED.values(), ids=list(MASKED))
def test_zeroth_order_breaks_a_gradient_masked_model(make, cnn, digits_test):
    model = make(cnn).eval()
    x, y = digits_test[0][:100], digits_test[1][:100]
    clean = accuracy(model, x, y)
    after_pgd = accuracy(model, _pgd(model, x, y), y)
    after_zo = accuracy(model, _zo(model, x, y, samples=[[0, 30], [10, 100]]), y)   # a lighter budget suffices
    assert clean > 0.8
    assert after_pgd > clean - 0.05, (clean, after_pgd)        # the gradient is masked: PGD does nothing
    assert after_zo < after_pgd - 0.3, (after_pgd, after_zo)   # the gradient-free attack does


def test_zeroth_order_matches_pgd_on_a_plain_model(cnn, digits_test):
    x, y = digits_test[0][:N], digits_test[1][:N]
    after_pgd = accuracy(cnn, _pgd(cnn, x, y), y)
    after_zo = accuracy(cnn, _zo(cnn, x, y), y)
    assert after_pgd < accuracy(cnn, x, y) - 0.3
    assert abs(after_zo - after_pgd) <= 0.06, (after_pgd, after_zo)


def test_examples_stop_once_misclassified(cnn, digits_test):
    x, y = digits_test[0][:60], digits_test[1][:60]
    wrong_label = (cnn(x).argmax(1) + 1) % 10          # every example starts misclassified for these labels
    x_adv = _zo(cnn, x, wrong_label)
    assert torch.equal(x_adv, x)
    trace = []
    _zo(cnn, x, y, trace=trace)
    fooled = torch.stack([t["fooled"] for t in trace])
    assert (fooled[1:] >= fooled[:-1]).all()           # once fooled, an example stays where it was


def test_forward_calls_stay_within_the_batch_budget(cnn, digits_test):
    sizes = []

    class Recording(nn.Module):
        def __init__(self):
            super().__init__()
            self.base = cnn

        def forward(self, x):
            sizes.append(x.shape[0])
            return self.base(x)

    x, y = digits_test[0][:50], digits_test[1][:50]
    _zo(Recording(), x, y, steps=3, samples=40, max_batch=64)
    assert max(sizes) <= 64 and max(sizes[1:]) == 64   # 50 examples x 40 pairs x 2 inputs, 64 at a time


def test_gradient_estimate_of_a_linear_margin_points_along_the_true_gradient():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    x, y = torch.rand(8, 1, 8, 8), torch.randint(0, 10, (8,))
    logits = model(x)
    other = logits.masked_fill(torch.nn.functional.one_hot(y, 10).bool(), float("-inf")).argmax(1)
    weight = model[1].weight
    true = (weight[other] - weight[y]).view_as(x)       # d(best other - label)/dx, fixed near x
    samples = 2000
    estimate = estimate_gradient(model, x, y, 1e-3, samples, 512, torch.Generator().manual_seed(1))
    cosine = torch.nn.functional.cosine_similarity(estimate.flatten(1), true.flatten(1), dim=1)
    expected = math.sqrt(samples / (samples + 64 + 1))    # the sampling limit for a linear function
    assert (cosine > expected - 0.05).all(), (cosine, expected)


@pytest.mark.parametrize("samples, expected", [
    (100, [(0, 100)]),
    ([[0, 100], [20, 1000], [40, 20000]], [(0, 100), (20, 1000), (40, 20000)]),
    ([[20, 1000], [0, 100]], [(0, 100), (20, 1000)]),
], ids=["constant", "reference", "unsorted"])
def test_sample_schedule(samples, expected):
    schedule = sample_schedule(samples)
    assert schedule == expected
    assert samples_at(schedule, 0) == expected[0][1] and samples_at(schedule, 99) == expected[-1][1]


@pytest.mark.parametrize("bad, match", [
    (dict(samples=[[5, 100]]), "start at iteration 0"),
    (dict(samples=[[0, 0]]), ">= 1 sample"),
    (dict(samples="many"), "samples"),
    (dict(sigma=0.0), "sigma"),
    (dict(max_batch=1), "max_batch"),
    (dict(steps=-1), "steps"),
], ids=["late-start", "zero-samples", "not-a-schedule", "zero-sigma", "tiny-batch", "negative-steps"])
def test_bad_arguments_raise_clear_errors(bad, match, cnn, digits_test):
    with pytest.raises(ValueError, match=match):
        zeroth_order(cnn, digits_test[0][:2], digits_test[1][:2], EPS, **bad)
