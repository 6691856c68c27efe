"""Attack strength: the binarization test (Zimmermann et al. 2022) of the evaluation's own strongest white-box
attack, as the ``binarization`` indicator.

It is an indicator, not an attack registry entry: it leaves no per-example robust mask and no row of the
worst case; it judges the attacks that made those rows. Its value is the pass rate over the valid examples,
its threshold ``indicators.binarization_threshold``, and it flags when the pass rate's upper confidence bound
lies below the threshold; a flag makes the verdict "attack too weak" (:func:`topkconv.attacks.indicators.verdict`).

Every rank runs it on the same first examples with the same seed, so every rank has the same verdict.
"""

from __future__ import annotations

import dataclasses

from typing import Optional

import torch
from torch import nn

from ..attacks.binarization import BinarizationConfig, binarization_test
from ..attacks.common import seeded
from ..attacks.masking import not_applicable
from ..attacks.registry import PlanContext, Role
from ..config import AttackConfig
from .plan import ModelTraits, Plan, PlannedAttack
from .run import attack_seed
from .summarise import Summary

STRENGTH_ROLES = (Role.WHITEBOX, Role.EOT)


def whitebox_candidates(plan: Plan, summary: Summary, stochastic: bool = False) -> list[PlannedAttack]:
    """The white-box reference attacks that ran on every example at the main eps, strongest (lowest accuracy)
    first; ties keep the plan's order. On a random model the EOT attacks come first: an accuracy from one draw
    per attack can rank plain PGD above EOT-PGD by luck (Fashion-MNIST's SAP, 20 examples: PGD 0.45 against
    EOT-PGD's 0.55), and plain PGD on the binarized random model then found none of 18 valid examples."""
    ran = [a for a in plan.at_main_eps() if a.entry.role in STRENGTH_ROLES and a.entry.reference
           and not a.cascade and a.examples is None]
    return sorted(ran, key=lambda a: (stochastic and a.entry.role != Role.EOT, summary.acc[a.name]))


def _on_binarized(attack: PlannedAttack, cfg: AttackConfig, traits: ModelTraits, seed: int):
    """``attack`` re-planned for the binarized model, as the binarization test calls it."""
    def run(binarized: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
        planned = attack.entry.make(PlanContext(binarized, cfg, traits), attack.eps)
        with seeded(binarized, seed) as generator:
            return planned.run(x, y, generator, seed)
    return run


def binarization_indicator(model: nn.Module, x: torch.Tensor, plan: Plan, summary: Summary, cfg: AttackConfig,
                           traits: ModelTraits) -> dict:
    """The ``binarization`` indicator: the strongest white-box attack that can run on a two-class model
    (AutoAttack's DLR losses need three classes; such an attack is skipped and named) on the first
    ``indicators.binarization_examples`` examples at the main eps."""
    settings = cfg.indicators
    m = min(settings.binarization_examples, x.shape[0])
    if m <= 0:
        return not_applicable("off (indicators.binarization_examples = 0)")
    skipped = {}
    # a random model's features are averaged over draws for the fit and the judgement (its attack needs EOT)
    binarization = BinarizationConfig(seed=cfg.seed, draws=settings.binarization_draws if traits.stochastic else 1)
    for attack in whitebox_candidates(plan, summary, traits.stochastic):
        seed = attack_seed(cfg.seed, -2, f"binarization/{attack.name}")
        try:
            with seeded(model, seed):   # a random model's fits and judgements too: the same draws whatever ran before
                result = binarization_test(model, x[:m], _on_binarized(attack, cfg, traits, seed), cfg.eps / 255,
                                           binarization)
        except (ValueError, RuntimeError, IndexError, AssertionError) as error:
            skipped[attack.name] = f"{type(error).__name__}: {error}"[:200]
            continue
        found = _judged(result.to_dict(), attack.name, settings.binarization_threshold, skipped)
        if traits.stochastic:
            found["draws"] = binarization.draws
        return found
    return not_applicable("no white-box attack could run on the binarized model" if skipped
                          else "no white-box reference attack ran at the main eps") | {"skipped": skipped}


def _judged(found: dict, attack: str, threshold: float, skipped: Optional[dict]) -> dict:
    if found["pass_rate"] is None:
        return not_applicable("no example gave a valid binary task (no readout separated inner from "
                              "boundary points)") | {"attack": attack, **found}
    upper = found["interval"][1]
    return {"value": found["pass_rate"], "threshold": threshold, "verdict": "flag" if upper < threshold else "pass",
            "upper_bound": upper, "attack": attack, "skipped": skipped, **found}


def budget_fractions(plan: Plan, cfg: AttackConfig, n: Optional[int] = None) -> dict:
    """Each budget table the planned attacks read, as a fraction of its reference (declared beside the budget
    dataclass as ``reference_fraction``), with the attacks that read it. Tables without a reference (a BPDA
    stand-in's temperature) are left out. A budget's limit on the examples (``examples``) at or above the ``n``
    examples evaluated limits nothing: it is judged as no limit."""
    found: dict = {}
    for attack in plan.attacks:
        table = attack.entry.budget_name
        budget = cfg.budgets.get(table)
        if budget is None or not hasattr(budget, "reference_fraction"):
            continue
        limit = getattr(budget, "examples", None)
        if n is not None and limit is not None and limit >= n:
            budget = dataclasses.replace(budget, examples=None)
        found.setdefault(table, dict(budget.reference_fraction(), attacks=[]))["attacks"].append(attack.name)
    return found


def provisional(budgets: dict) -> dict:
    """``{"provisional": bool, "reason": str}``: a verdict reached with any attack below its reference budget
    is provisional."""
    below = {table: entry for table, entry in budgets.items() if entry["below_reference"]}
    if not below:
        return {"provisional": False, "reason": "every attack ran at or above its reference budget"}
    parts = [f"{table} {100 * entry['fraction']:.3g}% of {entry['reference']}" for table, entry in below.items()]
    return {"provisional": True, "reason": "attacks below their reference budget: " + "; ".join(parts)}


def draw_statistics(per_draw: torch.Tensor, confidence: float = 0.95) -> dict:
    """A row's (draws, n) robust masks as its expected accuracy over draws (the headline for a random model),
    with a t-interval over the examples' robust fractions (the examples are the unit: the draws of one example
    are not independent of it), and the worst and best accuracy over draws."""
    from scipy import stats

    per_example = per_draw.double().mean(0)
    expected = float(per_example.mean())
    n = per_example.numel()
    half = (float(stats.t.ppf(0.5 + confidence / 2, n - 1) * per_example.std(unbiased=True) / n ** 0.5)
            if n > 1 else float("nan"))
    by_draw = per_draw.double().mean(1)
    return {"draws": per_draw.shape[0], "expected": expected, "interval": [max(0.0, expected - half),
                                                                          min(1.0, expected + half)],
            "worst": float(by_draw.min()), "best": float(by_draw.max()), "by_draw": by_draw.tolist()}


def over_draws(plan: Plan, outcomes, n_chunks: int) -> dict:
    """``{row: draw statistics}`` for every attack row, combined row and per-eps worst case of a random model
    (empty for a deterministic one). A worst case is the AND across attacks *within* each draw."""
    if not plan.draws:
        return {}
    rows = ["clean"] + [a.name for a in plan.attacks]
    masks = {row: torch.cat([outcomes.draws[i][row] for i in range(n_chunks)], dim=1) for row in rows}
    for combined in plan.combined:
        masks[combined.name] = torch.stack([masks[part] for part in combined.parts]).all(0)
    for eps in sorted({a.eps for a in plan.attacks}):
        names = [a.name for a in plan.attacks if a.eps == eps]
        masks[f"worst_case@{eps:g}"] = torch.stack([masks["clean"]] + [masks[name] for name in names]).all(0)
    return {row: draw_statistics(mask) for row, mask in masks.items()}
