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
alpha (:class:`topkconv.config.IndicatorConfig` holds it, and every other threshold). On 100 examples, 2 examples broken by doubling PGD's steps and none the other way (p = 0.25) is
noise; 11 and none (p < 0.001) is an attack that had not converged.
"""

from __future__ import annotations

from typing import Optional

import torch
from scipy.stats import binomtest

from ..config import IndicatorConfig
from . import registry
from .registry import WHITEBOX, Role

DEFAULTS = IndicatorConfig()
CHECKS = ("pgd_beats_fgsm", "falls_to_chance", "blackbox_not_stronger", "steps_restarts_converged",
          "bpda_not_stronger")
ROUNDING = 1e-9   # accuracies are ratios of counts; keep float noise from deciding a verdict


def slack(n: int, points: float = DEFAULTS.slack_points) -> float:
    """``max(points, 1 example)``: a single example never decides a verdict on a small evaluation."""
    return max(points, 1.0 / max(n, 1))


def not_applicable(reason: str) -> dict:
    """A check or indicator that does not apply (or was not run): no value, no threshold, verdict ``n/a``."""
    return {"value": None, "threshold": None, "verdict": "n/a", "reason": reason}


def _verdict(ok: bool) -> str:
    return "pass" if ok else "flag"


def paired_test(outcomes: Optional[dict], reference: str, variant: str, two_sided: bool = False,
                alpha: float = DEFAULTS.alpha) -> Optional[dict]:
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
            "alpha": alpha}


def significant_gap(gap: bool, test: Optional[dict]) -> bool:
    """A gap beyond the tolerance counts when it is also significant (or no per-example outcomes were given)."""
    return gap and (test is None or test["p_value"] < test["alpha"])


def one_step_pairs() -> list:
    """``[(reference row, one-step attack)]``: white-box attacks bound by a named row (FGSM by PGD)."""
    return [(row, name) for name, entry in registry.REGISTRY.items() if entry.role == Role.WHITEBOX
            for row in entry.must_not_beat if row != WHITEBOX]


def check_pgd_beats_fgsm(acc: dict, tol: float, outcomes: Optional[dict] = None,
                         alpha: float = DEFAULTS.alpha) -> dict:
    """(1) An iterative attack is at least as strong as a one-step one: PGD accuracy <= FGSM accuracy."""
    present = [(row, name) for row, name in one_step_pairs() if row in acc and name in acc]
    if not present:
        return not_applicable("needs " + " and ".join(sorted({p for pair in one_step_pairs() for p in pair})))
    reference, one_step = present[0]
    test = paired_test(outcomes, reference, one_step, alpha=alpha)
    flagged = significant_gap(acc[reference] > acc[one_step] + tol + ROUNDING, test)
    return {"value": acc[reference] - acc[one_step], "threshold": tol, "verdict": _verdict(not flagged),
            reference: acc[reference], one_step: acc[one_step], "tolerance": tol, "paired_test": test}


def check_falls_to_chance(curve: list, num_classes: int, tol: float,
                          chance_slack: float = DEFAULTS.chance_slack) -> dict:
    """(2) Accuracy under the white-box attack falls to chance (1 / classes) at the largest eps of the curve,
    and never rises (beyond the tolerance) as eps grows: an unbounded attack must win."""
    if len(curve) < 2:
        return not_applicable("needs an eps curve (full suite)")
    points = sorted(curve, key=lambda p: p["eps"])
    chance = 1.0 / num_classes
    last = points[-1]
    rises = [p["eps"] for before, p in zip(points, points[1:]) if p["accuracy"] > before["accuracy"] + tol + ROUNDING]
    ok = last["accuracy"] <= chance + chance_slack + ROUNDING and not rises
    return {"value": last["accuracy"], "threshold": chance + chance_slack, "verdict": _verdict(ok),
            "max_eps": last["eps"], "accuracy_at_max_eps": last["accuracy"], "chance": chance,
            "chance_slack": chance_slack, "rises_at_eps": rises, "tolerance": tol}


def check_blackbox_not_stronger(acc: dict, whitebox: str, tol: float, outcomes: Optional[dict] = None,
                                alpha: float = DEFAULTS.alpha) -> dict:
    """(3) Gradient-free (Square, zeroth-order) and transfer attacks do not beat white-box PGD on the model."""
    names = registry.with_role(Role.GRADIENT_FREE, Role.TRANSFER)
    others = {name: acc[name] for name in names if name in acc}
    if whitebox not in acc or not others:
        return not_applicable(f"needs one of {', '.join(names)} (full suite; transfer needs --surrogate)")
    tests = {name: paired_test(outcomes, whitebox, name, alpha=alpha) for name in others}
    stronger = [name for name, value in others.items()
                if significant_gap(value < acc[whitebox] - tol - ROUNDING, tests[name])]
    return {"value": acc[whitebox] - min(others.values()), "threshold": tol, "verdict": _verdict(not stronger),
            "whitebox": whitebox, whitebox: acc[whitebox], **others,
            "stronger_than_whitebox": stronger, "tolerance": tol, "paired_tests": tests}


def check_steps_restarts_converged(acc: dict, tol: float, outcomes: Optional[dict] = None,
                                   alpha: float = DEFAULTS.alpha) -> dict:
    """(4) A larger budget of an attack (doubled PGD steps, doubled restarts) moves its accuracy by at most
    the tolerance. Each variant is compared with the attack it varies (the random-start PGD) when it was
    run, else with that attack's row (``pgd``)."""
    variants = {name: entry for name, entry in registry.REGISTRY.items() if entry.variant_of and name in acc}
    if not variants:
        return not_applicable("needs " + " / ".join(n for n, e in registry.REGISTRY.items() if e.variant_of)
                              + " (full suite)")
    base = registry.get(next(iter(variants.values())).variant_of)
    reference = base.name if base.name in acc else (base.row or base.name)
    if reference not in acc:
        return not_applicable(f"needs {base.name}")
    moves = {name: acc[reference] - acc[name] for name in variants}
    tests = {name: paired_test(outcomes, reference, name, two_sided=True, alpha=alpha) for name in variants}
    moved = [name for name, move in moves.items() if significant_gap(abs(move) > tol + ROUNDING, tests[name])]
    return {"value": max(abs(move) for move in moves.values()), "threshold": tol, "verdict": _verdict(not moved),
            "reference": reference, reference: acc[reference], **{name: acc[name] for name in variants},
            "drops": moves, "tolerance": tol, "paired_tests": tests}


def check_bpda_not_stronger(acc: dict, routing: bool, tol: float, reference: str = "pgd",
                            outcomes: Optional[dict] = None, alpha: float = DEFAULTS.alpha) -> dict:
    """(5) PGD through a differentiable stand-in of every top-k layer (the BPDA attacks) does not beat plain
    PGD; the stronger stand-in is the one judged. ``reference`` is ``"whitebox"`` when the stand-ins ran only
    on the white-box survivors (a cascade)."""
    if not routing:
        return not_applicable("the model has no top-k routing layer")
    names = registry.with_role(Role.BPDA)
    bpda = {name: acc[name] for name in names if name in acc}
    if reference not in acc or not bpda:
        return not_applicable(f"needs {' or '.join(names)} (full suite)")
    strongest = min(bpda, key=bpda.get)
    test = paired_test(outcomes, reference, strongest, alpha=alpha)
    flagged = significant_gap(bpda[strongest] < acc[reference] - tol - ROUNDING, test)
    return {"value": acc[reference] - bpda[strongest], "threshold": tol, "verdict": _verdict(not flagged),
            "reference": reference, reference: acc[reference], **bpda, "strongest": strongest, "tolerance": tol,
            "paired_test": test}


def masking_checks(acc: dict, n: int, num_classes: int, curve: Optional[list] = None, routing: bool = False,
                   whitebox: str = "pgd", bpda_reference: str = "pgd", outcomes: Optional[dict] = None,
                   settings: IndicatorConfig = DEFAULTS) -> dict:
    """All five checks from a ``{attack name: accuracy}`` dict; ``curve`` is ``[{eps, accuracy}, ...]``.

    ``whitebox`` names the strongest plain white-box attack for check 3 (``eot_pgd`` for stochastic models).
    ``outcomes`` (``{attack name: per-example robust mask}``, the same examples for every attack) makes each
    gap between two attacks count only when a sign test finds it significant (see the module's docstring).
    """
    tol, alpha = slack(n, settings.slack_points), settings.alpha
    return {
        "pgd_beats_fgsm": check_pgd_beats_fgsm(acc, tol, outcomes, alpha),
        "falls_to_chance": check_falls_to_chance(curve or [], num_classes, tol, settings.chance_slack),
        "blackbox_not_stronger": check_blackbox_not_stronger(acc, whitebox, tol, outcomes, alpha),
        "steps_restarts_converged": check_steps_restarts_converged(acc, tol, outcomes, alpha),
        "bpda_not_stronger": check_bpda_not_stronger(acc, routing, tol, bpda_reference, outcomes, alpha),
    }
