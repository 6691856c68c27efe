"""Automated gradient-masking checks (Athalye, Carlini and Wagner 2018; Carlini et al. 2019).

Each check turns the accuracies of one evaluation into a verdict, ``pass``, ``flag`` or ``n/a`` (the
attacks it needs were not run, or do not apply), with the numbers it was decided on: like the indicators of
:mod:`topkconv.attacks.indicators`, a ``value`` judged against a ``threshold``. A flag does not
prove masking; it says the white-box numbers of that model should not be trusted as they are.

Tolerance: accuracies are compared with a slack of ``max(1 point, 1 example)``, so a single example
never flips a verdict on small evaluations. The chance check allows 5 points above chance.

Noise: two attacks on the same examples disagree on some of them by chance alone (random starts, a few
examples at the boundary). When the per-example outcomes are given, a gap between two attacks flags only if
it is also significant: an exact sign test (McNemar's exact test) on the examples the two disagree on, p <
:data:`ALPHA`. On 100 examples, 2 examples broken by doubling PGD's steps and none the other way (p = 0.25) is
noise; 11 and none (p < 0.001) is an attack that had not converged.
"""

from __future__ import annotations

from typing import Optional

import torch
from scipy.stats import binomtest

CHANCE_SLACK = 0.05
ALPHA = 0.05        # the sign test's level for a gap between two attacks on the same examples
CHECKS = ("pgd_beats_fgsm", "falls_to_chance", "blackbox_not_stronger", "steps_restarts_converged",
          "bpda_not_stronger")


_ROUNDING = 1e-9   # accuracies are ratios of counts; keep float noise from deciding a verdict


def tolerance(n: int) -> float:
    return max(0.01, 1.0 / max(n, 1))


def _verdict(ok: bool) -> str:
    return "pass" if ok else "flag"


def _na(reason: str) -> dict:
    return {"value": None, "threshold": None, "verdict": "n/a", "reason": reason}


def paired_test(outcomes: Optional[dict], reference: str, variant: str, two_sided: bool = False) -> Optional[dict]:
    """The examples on which ``variant`` and ``reference`` disagree (per-example robust masks in
    ``outcomes``) and the exact sign test's p-value that ``variant`` is the stronger attack (two-sided: that
    they differ). None when either attack's outcomes are missing."""
    if outcomes is None or reference not in outcomes or variant not in outcomes:
        return None
    kept_by_reference = torch.as_tensor(outcomes[reference]).bool()
    kept_by_variant = torch.as_tensor(outcomes[variant]).bool()
    only_variant = int((kept_by_reference & ~kept_by_variant).sum())   # broken by the variant alone
    only_reference = int((~kept_by_reference & kept_by_variant).sum())
    disagree = only_variant + only_reference
    alternative = "two-sided" if two_sided else "greater"
    p_value = binomtest(only_variant, disagree, 0.5, alternative=alternative).pvalue if disagree else 1.0
    return {"broken_only_by": {variant: only_variant, reference: only_reference}, "p_value": float(p_value),
            "alpha": ALPHA}


def significant_gap(gap: bool, test: Optional[dict]) -> bool:
    """A gap beyond the tolerance counts when it is also significant (or no per-example outcomes were given)."""
    return gap and (test is None or test["p_value"] < ALPHA)


def check_pgd_beats_fgsm(acc: dict, tol: float, outcomes: Optional[dict] = None) -> dict:
    """(1) An iterative attack is at least as strong as a one-step one: PGD accuracy <= FGSM accuracy."""
    if "pgd" not in acc or "fgsm" not in acc:
        return _na("needs fgsm and pgd")
    test = paired_test(outcomes, "pgd", "fgsm")
    flagged = significant_gap(acc["pgd"] > acc["fgsm"] + tol + _ROUNDING, test)
    return {"value": acc["pgd"] - acc["fgsm"], "threshold": tol, "verdict": _verdict(not flagged),
            "pgd": acc["pgd"], "fgsm": acc["fgsm"], "tolerance": tol, "paired_test": test}


def check_falls_to_chance(curve: list, num_classes: int, tol: float) -> dict:
    """(2) Accuracy under the white-box attack falls to chance (1 / classes) at the largest eps of the curve,
    and never rises (beyond the tolerance) as eps grows: an unbounded attack must win."""
    if len(curve) < 2:
        return _na("needs an eps curve (full suite)")
    points = sorted(curve, key=lambda p: p["eps"])
    chance = 1.0 / num_classes
    last = points[-1]
    rises = [p["eps"] for before, p in zip(points, points[1:]) if p["accuracy"] > before["accuracy"] + tol + _ROUNDING]
    ok = last["accuracy"] <= chance + CHANCE_SLACK + _ROUNDING and not rises
    return {"value": last["accuracy"], "threshold": chance + CHANCE_SLACK, "verdict": _verdict(ok),
            "max_eps": last["eps"], "accuracy_at_max_eps": last["accuracy"], "chance": chance,
            "chance_slack": CHANCE_SLACK, "rises_at_eps": rises, "tolerance": tol}


def check_blackbox_not_stronger(acc: dict, whitebox: str, tol: float, outcomes: Optional[dict] = None) -> dict:
    """(3) Square (black-box) and transfer attacks do not beat white-box PGD on the model itself."""
    others = {name: acc[name] for name in ("square", "transfer") if name in acc}
    if whitebox not in acc or not others:
        return _na("needs square or transfer (full suite; transfer needs --surrogate)")
    tests = {name: paired_test(outcomes, whitebox, name) for name in others}
    stronger = [name for name, value in others.items()
                if significant_gap(value < acc[whitebox] - tol - _ROUNDING, tests[name])]
    return {"value": acc[whitebox] - min(others.values()), "threshold": tol, "verdict": _verdict(not stronger),
            "whitebox": whitebox, whitebox: acc[whitebox], **others,
            "stronger_than_whitebox": stronger, "tolerance": tol, "paired_tests": tests}


def check_steps_restarts_converged(acc: dict, tol: float, outcomes: Optional[dict] = None) -> dict:
    """(4) Doubling the PGD steps, or the restarts, moves PGD accuracy by at most the tolerance.

    The doubled runs start at random, so they are compared with the random-start PGD (``pgd_random``)
    when it was run, else with ``pgd``."""
    variants = {name: acc[name] for name in ("pgd_2x_steps", "pgd_2x_restarts") if name in acc}
    reference = "pgd_random" if "pgd_random" in acc else "pgd"
    if reference not in acc or not variants:
        return _na("needs pgd_2x_steps / pgd_2x_restarts (full suite)")
    moves = {name: acc[reference] - value for name, value in variants.items()}
    tests = {name: paired_test(outcomes, reference, name, two_sided=True) for name in variants}
    moved = [name for name, move in moves.items() if significant_gap(abs(move) > tol + _ROUNDING, tests[name])]
    return {"value": max(abs(move) for move in moves.values()), "threshold": tol, "verdict": _verdict(not moved),
            "reference": reference, reference: acc[reference], **variants, "drops": moves, "tolerance": tol,
            "paired_tests": tests}


BPDA_ATTACKS = ("bpda_dense", "bpda_soft")


def check_bpda_not_stronger(acc: dict, routing: bool, tol: float, reference: str = "pgd",
                            outcomes: Optional[dict] = None) -> dict:
    """(5) PGD through a differentiable stand-in of every top-k layer (BPDA: dense, or the soft relaxation
    of the selection) does not beat plain PGD; the stronger stand-in is the one judged. ``reference`` is
    ``"whitebox"`` when the stand-ins ran only on the white-box survivors (a cascade)."""
    if not routing:
        return _na("the model has no top-k routing layer")
    bpda = {name: acc[name] for name in BPDA_ATTACKS if name in acc}
    if reference not in acc or not bpda:
        return _na("needs bpda_dense or bpda_soft (full suite)")
    strongest = min(bpda, key=bpda.get)
    test = paired_test(outcomes, reference, strongest)
    flagged = significant_gap(bpda[strongest] < acc[reference] - tol - _ROUNDING, test)
    return {"value": acc[reference] - bpda[strongest], "threshold": tol, "verdict": _verdict(not flagged),
            "reference": reference, reference: acc[reference], **bpda, "strongest": strongest, "tolerance": tol,
            "paired_test": test}


def masking_checks(acc: dict, n: int, num_classes: int, curve: Optional[list] = None, routing: bool = False,
                   whitebox: str = "pgd", bpda_reference: str = "pgd", outcomes: Optional[dict] = None) -> dict:
    """All five checks from a ``{attack name: accuracy}`` dict; ``curve`` is ``[{eps, accuracy}, ...]``.

    ``whitebox`` names the strongest plain white-box attack for check 3 (``eot_pgd`` for stochastic models).
    ``outcomes`` (``{attack name: per-example robust mask}``, the same examples for every attack) makes each
    gap between two attacks count only when a sign test finds it significant (see the module's docstring).
    """
    tol = tolerance(n)
    return {
        "pgd_beats_fgsm": check_pgd_beats_fgsm(acc, tol, outcomes),
        "falls_to_chance": check_falls_to_chance(curve or [], num_classes, tol),
        "blackbox_not_stronger": check_blackbox_not_stronger(acc, whitebox, tol, outcomes),
        "steps_restarts_converged": check_steps_restarts_converged(acc, tol, outcomes),
        "bpda_not_stronger": check_bpda_not_stronger(acc, routing, tol, bpda_reference, outcomes),
    }
