"""Attack strength through `evaluate`: the binarization test of the evaluation's strongest white-box attack,
budgets as fractions of their reference, sign-test labels under the cascade and stochastic models over draws."""

from __future__ import annotations

import dataclasses

import pytest

from masked_models import RoundedInput
from topkconv.config import AttackConfig
from topkconv.evaluate import evaluate

# A cheap full suite at the digits' radius of the audit tests (32/255: a plain CNN falls far under PGD there):
# no zeroth-order attack, short AutoAttack and Square, few indicator draws; the binarization test on 12 examples.
CHEAP_FULL = AttackConfig(suite="full", eps=32, eps_curve=[], n_examples=40, batch_size=64, seed=0,
                          budgets={"pgd": {"step_size": 5.0, "steps": 16}, "eot_pgd": {"samples": 4},
                                   "autoattack": {"iterations": 10, "attacks": ["apgd-ce"]},
                                   "square": {"queries": 50}, "zeroth_order": {"steps": 0}},
                          indicators={"examples": 12, "draws": 5, "steps": 10, "binarization_examples": 12})


@pytest.fixture(scope="module")
def evaluated(cnn, digits_test):
    cache = {}

    def run(name: str) -> dict:
        if name not in cache:
            model = cnn if name == "plain" else RoundedInput(cnn)
            cache[name] = evaluate(model, *digits_test, CHEAP_FULL, progress=False)
        return cache[name]

    return run


def test_binarization_passes_for_the_evaluations_pgd_on_a_plain_cnn(evaluated):
    result = evaluated("plain")
    test = result["indicators"]["binarization"]
    print("plain CNN:", {k: v for k, v in test.items() if k != "outcomes"})
    assert test["attack"] in result["attacks"] and test["fails"] + test["passes"] + test["invalid"] == 12
    assert test["verdict"] == "pass" and test["value"] >= 0.9 and test["interval"][1] >= 0.9
    assert not result["verdict"]["text"].startswith("attack too weak")


def test_binarization_fails_on_a_gradient_masked_cnn_and_the_verdict_says_the_attack_is_too_weak(evaluated):
    result = evaluated("masked")
    test = result["indicators"]["binarization"]
    print("rounded-input CNN:", {k: v for k, v in test.items() if k != "outcomes"}, result["verdict"])
    assert test["verdict"] == "flag" and test["interval"][1] < CHEAP_FULL.indicators.binarization_threshold
    assert result["verdict"]["verdict"] == "attack too weak"
    assert result["verdict"]["text"].startswith("attack too weak: robust accuracy not trustworthy")


def test_binarization_is_off_with_zero_examples_and_in_the_paper_suite(cnn, digits_test):
    off = dataclasses.replace(CHEAP_FULL, indicators=dataclasses.replace(CHEAP_FULL.indicators,
                                                                         binarization_examples=0))
    result = evaluate(cnn, *digits_test, dataclasses.replace(off, n_examples=10), progress=False)
    assert result["indicators"]["binarization"]["verdict"] == "n/a"
    paper = evaluate(cnn, *digits_test, dataclasses.replace(CHEAP_FULL, suite="paper", n_examples=10),
                     progress=False)
    assert "binarization" not in paper["indicators"]
