"""What a table cell measures, read per example from the evaluations of every seed.

A measure is ``clean``, ``fgsm@<eps>`` or ``pgd@<eps>`` (the paper's attacks, from ``eval.json``) or
``worst@<eps>`` (the strong suite's per-example worst case, from ``eval-strong-<eps>.json``). Its value
for one seed is a 0/1 vector over the test examples (1: classified correctly, or robust); the cell is
the mean over seeds with the interval of :mod:`.stats` (t over seeds).

The per-example vectors come from the evaluation's ``per_example`` record (one ``"0110..."`` string per
attack, ``clean`` and ``worst_case``).
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np

from . import stats

PAPER_ATTACKS = ("fgsm", "pgd")


def names(eps_list: list, strong_eps: list) -> list:
    """The measures of a table, in row order: clean, FGSM and PGD at each eps, the worst case at each strong eps."""
    out = ["clean"]
    for eps in eps_list:
        out += [f"fgsm@{eps:g}", f"pgd@{eps:g}"]
    out += [f"worst@{eps:g}" for eps in strong_eps]
    return out


def split(measure: str) -> tuple:
    """``"pgd@24"`` -> ``("pgd", 24.0)``; ``"clean"`` -> ``("clean", None)``."""
    family, _, eps = measure.partition("@")
    return family, (float(eps) if eps else None)


def _vector(record, where: str) -> np.ndarray:
    if isinstance(record, str):
        if set(record) - {"0", "1"}:
            raise ValueError(f"{where}: per-example outcomes must be a string of 0 and 1")
        return np.frombuffer(record.encode("ascii"), dtype=np.uint8) - ord("0")
    return np.asarray(record, dtype=np.uint8)


def _per_example(result: dict, name: str, where: str) -> np.ndarray:
    record = result.get("per_example")
    if record is None:
        raise RuntimeError(f"{where}: has no per-example outcomes ('per_example'); it was written by an older "
                           f"topkconv: rerun with --force to evaluate again")
    if name not in record:
        raise RuntimeError(f"{where}: no per-example outcomes for {name!r} (has {sorted(record)})")
    return _vector(record[name], where)


def outcomes(seed_result: dict, measure: str) -> Optional[np.ndarray]:
    """The 0/1 vector of ``measure`` for one seed's ``{"paper": ..., "strong": {...}}``; None if not run."""
    family, eps = split(measure)
    paper = seed_result["paper"]
    where = f"runs/{seed_result.get('run', '?')}"
    if family == "clean":
        return _per_example(paper, "clean", where + "/eval.json")
    if family in PAPER_ATTACKS:
        matches = [name for name, entry in (paper.get("attacks") or {}).items()
                   if name.split("@")[0] == family
                   and math.isclose(float(entry.get("params", {}).get("eps", math.nan)), eps, abs_tol=1e-6)]
        if not matches:
            return None
        vectors = [_per_example(paper, name, where + "/eval.json") for name in matches]
        return np.minimum.reduce(vectors)  # robust only if it survives every variant (both starts)
    if family == "worst":
        for key, part in seed_result["strong"].items():
            if math.isclose(float(key), eps, abs_tol=1e-6):
                return _per_example(part, "worst_case", f"{where}/eval-strong-{key}.json")
        return None
    raise ValueError(f"unknown measure {measure!r}; expected clean, fgsm@EPS, pgd@EPS or worst@EPS")


def seed_outcomes(seeds: list, measure: str) -> Optional[list]:
    """One 0/1 vector per seed, or None when some seed did not run ``measure``."""
    vectors = [outcomes(result, measure) for result in seeds]
    return None if any(v is None for v in vectors) else vectors


def estimate(seeds: list, measure: str) -> Optional[stats.Estimate]:
    vectors = seed_outcomes(seeds, measure)
    return None if vectors is None else stats.cell_estimate(vectors)


def masking_flags(seeds: list) -> str:
    """The gradient-masking checks flagged on any seed, with how many seeds flag each."""
    from .. import report

    counts: dict = {}
    for result in seeds:
        for flag in report.masking_flags(result):
            counts[flag] = counts.get(flag, 0) + 1
    if not counts:
        return "none"
    return ", ".join(f"{flag} ({count}/{len(seeds)} seeds)" for flag, count in sorted(counts.items()))


def binarization_summary(seeds: list) -> str:
    """The binarization test (Zimmermann et al. 2022) at each eps, pooled over seeds: examples passed of those
    tested (a pass: the attack found the adversarial point the test built in), and the seeds whose test
    passed; "" when no seed ran it."""
    from .. import report

    passes: dict = {}
    for result in seeds:
        for part in report.strong_parts(result):
            test = (part.get("indicators") or {}).get("binarization")
            if not isinstance(test, dict) or "passes" not in test:
                continue
            eps = (part.get("worst_case") or {}).get("eps")
            where = f"eps={eps:g}" if isinstance(eps, (int, float)) else "eps=?"
            tested = test["passes"] + test.get("fails", 0)
            total = passes.setdefault(where, [0, 0, 0])
            total[0] += test["passes"]
            total[1] += tested
            total[2] += test.get("verdict") == "pass"
    return "; ".join(f"{where}: {p}/{n} examples pass ({s}/{len(seeds)} seeds pass)"
                     for where, (p, n, s) in sorted(passes.items()))


def masking_verdicts(seeds: list) -> str:
    """The strong suite's one-line verdict at each eps, counted over seeds: ``eps=8: masking suspected (3/3)``."""
    from .. import report

    counts: dict = {}
    for result in seeds:
        for found in report.masking_verdicts(result):
            where = f"eps={found['eps']:g}" if isinstance(found["eps"], (int, float)) else "eps=?"
            counts[(where, found["verdict"])] = counts.get((where, found["verdict"]), 0) + 1
    return "; ".join(f"{where}: {kind} ({count}/{len(seeds)} seeds)" for (where, kind), count in sorted(counts.items()))
