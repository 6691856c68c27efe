"""Judge: the masking checks, AutoAttack's Square flag and the one-line verdict, from the summary.

Which rows are compared comes from the plan (the white-box reference rows) and the attack registry's roles.
"""

from __future__ import annotations

from ..attacks.indicators import bounded_attacks, reported_attack_traces, square_beats_whitebox, verdict
from ..attacks.masking import masking_checks
from ..attacks.registry import WHITEBOX, Role, entry_of
from ..config import AttackConfig
from .plan import ModelTraits, Plan
from .summarise import Summary


def checks(plan: Plan, summary: Summary, traits: ModelTraits, cfg: AttackConfig, num_classes: int) -> dict:
    """The masking checks. A cascaded row holds "white-box and this attack": it is judged against the
    white-box worst case, so that it counts only what the attack broke beyond every reference attack."""
    cascaded = summary.cascaded
    bpda_cascaded = any(entry_of(name).role == Role.BPDA for name in cascaded)
    found = masking_checks(summary.acc, summary.n, num_classes, summary.eps_curve, routing=traits.routing,
                           whitebox=WHITEBOX if cascaded else plan.whitebox_row(),
                           bpda_reference=WHITEBOX if bpda_cascaded else "pgd", outcomes=summary.merged,
                           settings=cfg.indicators)
    for check in found.values():
        if check.get("whitebox") == WHITEBOX or check.get("reference") == WHITEBOX:
            check["one_sided"] = ("judged on rows run on the white-box survivors only: their sign test can find "
                                  "extra breaks but cannot fail the other way, so a flag counts what they found")
    if cfg.suite == "paper":
        # Only check 1 has its numbers in the paper suite; say so rather than leave the others blank.
        for name, check in found.items():
            if check["verdict"] == "n/a" and name != "bpda_not_stronger":
                check["reason"] = "not run in the paper suite; use --suite full"
    return found


def judge(plan: Plan, summary: Summary, traits: ModelTraits, cfg: AttackConfig, num_classes: int,
          measured: dict) -> tuple[dict, dict, dict]:
    """(indicators, masking checks, verdict)."""
    found_checks = checks(plan, summary, traits, cfg, num_classes)
    at_eps = summary.at_main_eps(cfg.eps)
    found = dict(measured)
    if cfg.suite == "full":
        # on the traces of the attacks that enter the worst case, not on a separate PGD (issue 22, section 5)
        found.update(reported_attack_traces(summary.traces, summary.merged["worst_case"],
                                            min(summary.n, cfg.indicators.examples), cfg.indicators))
        bounded = set(bounded_attacks())
        white = [name for name in at_eps if name not in bounded]
        found["square_beats_whitebox"] = square_beats_whitebox(at_eps, white, summary.n,
                                                               cfg.indicators.square_threshold, summary.merged,
                                                               summary.subsets, cfg.indicators.alpha)
    found.update(found_checks)
    line = verdict(at_eps, found, plan.reference_rows(), summary.n, summary.subsets, cascaded=summary.cascaded,
                   outcomes=summary.merged, settings=cfg.indicators)
    return found, found_checks, line
