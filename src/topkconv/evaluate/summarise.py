"""Summarise: the gathered per-example masks as rows: accuracies, combined rows, the cascade's reference
row, first-N subsets, the per-example worst case at every eps, the eps curve and the per-example strings.

An example is robust under an attack when it is classified correctly both clean and attacked;
``worst_cases`` holds, for every eps at which attacks ran, the examples that survive *every* attack at that
eps, and ``worst_case`` is the one at the main eps.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..attacks.registry import WHITEBOX
from .plan import CombinedAttack, Plan
from .run import Outcomes


@dataclass
class Summary:
    n: int
    merged: dict        # row -> per-example robust mask (clean, attacks, combined rows, worst cases)
    acc: dict           # row -> accuracy (exact counts, in double)
    attacks: dict       # row -> eval.json's entry (params, accuracy, n_examples, seconds ...)
    eps_of: dict        # row -> eps
    cascaded: list      # the cascaded rows
    subsets: dict       # row run on the first m examples -> (accuracies on those m, m)
    worst_cases: list
    eps_curve: list
    traces: dict = field(default_factory=dict)   # row -> the loss traces of its runs on the first examples

    def at_main_eps(self, eps: float) -> dict:
        return {name: value for name, value in self.acc.items() if self.eps_of.get(name) == eps}


def _fmt(eps: float) -> str:
    return f"{eps:g}"


def _combined_rows(plan: Plan, cascaded: list) -> list:
    """The plan's combined rows, plus, when a cascade ran, the reference attacks' worst case (``whitebox``)."""
    if not cascaded:
        return list(plan.combined)
    return list(plan.combined) + [CombinedAttack(WHITEBOX, plan.eps, plan.cascade_base())]


def _rows(plan: Plan, outcomes: Outcomes, n_chunks: int) -> tuple[dict, dict, dict, dict]:
    merged = {name: torch.cat([outcomes.masks[i][name] for i in range(n_chunks)])
              for name in ["clean"] + [a.name for a in plan.attacks]}
    seconds, eps_of = dict(outcomes.seconds), {a.name: a.eps for a in plan.attacks}
    attacks = {a.name: {"params": a.params} for a in plan.attacks}
    for row in _combined_rows(plan, [a.name for a in plan.attacks if a.cascade]):
        merged[row.name] = torch.stack([merged[part] for part in row.parts]).all(0)
        seconds[row.name] = sum(seconds[part] for part in row.parts)
        eps_of[row.name] = row.eps
        attacks[row.name] = {"params": {"eps": row.eps, "worst_of": list(row.parts)}}
    return merged, seconds, eps_of, attacks


def _subsets(plan: Plan, merged: dict, attacks: dict, n: int) -> dict:
    """An attack run on the first m examples only is compared with the others on those m examples."""
    subsets = {}
    for attack in plan.attacks:
        if attack.examples is not None and attack.examples < n:
            m = attack.examples
            subset = {name: mask[:m].sum().item() / m for name, mask in merged.items()}
            attacks[attack.name].update(accuracy_on_attacked=subset[attack.name], n_attacked=m)
            subsets[attack.name] = (subset, m)
    return subsets


def _worst_cases(plan: Plan, merged: dict, eps_of: dict, n: int) -> list:
    worst_cases = []
    for eps in sorted(set(eps_of.values())):
        names = [a.name for a in plan.attacks if a.eps == eps]
        worst = merged["clean"].clone()
        for name in names:
            worst &= merged[name]
        merged[f"worst_case@{_fmt(eps)}"] = worst
        worst_cases.append({"eps": eps, "accuracy": worst.sum().item() / n, "attacks": names, "n": n})
    merged["worst_case"] = merged[f"worst_case@{_fmt(plan.eps)}"]
    return worst_cases


def summarise(plan: Plan, outcomes: Outcomes, n: int, n_chunks: int) -> Summary:
    merged, seconds, eps_of, attacks = _rows(plan, outcomes, n_chunks)
    acc = {name: mask.sum().item() / n for name, mask in merged.items()}
    cascaded = [a.name for a in plan.attacks if a.cascade]
    base = list(plan.cascade_base())
    for name in cascaded:
        attacks[name]["params"]["cascade"] = {"after": base, "n_attacked": outcomes.attacked[name],
                                              "broke": round((acc[WHITEBOX] - acc[name]) * n)}
    for name, entry in attacks.items():
        entry.update(accuracy=acc[name], n=n, seconds=seconds[name])
    subsets = _subsets(plan, merged, attacks, n)
    worst_cases = _worst_cases(plan, merged, eps_of, n)
    eps_curve = [{"eps": eps, "accuracy": acc[name], "attack": name} for eps, name in plan.curve]
    return Summary(n, merged, acc, attacks, eps_of, cascaded, subsets, worst_cases, eps_curve, outcomes.traces)


def per_example(merged: dict) -> dict:
    """Per example, "1" = classified correctly (clean) or robust, in the order of x: what paired statistics
    over seeds and examples (topkconv.reproduce) resample."""
    return {name: "".join("1" if bit else "0" for bit in mask.tolist()) for name, mask in merged.items()}
