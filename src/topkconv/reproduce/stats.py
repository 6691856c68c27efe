"""Statistics over seeds: a two-level bootstrap for a mean and for a paired difference, and verdicts.

Two sources of variation make a reproduced number uncertain: the seed (initialisation, batch order,
augmentation) and the finite test set. :func:`bootstrap` resamples both: first the seeds, with
replacement; then, for every seed drawn, its test examples, with replacement. Resampling n examples
whose values take a few distinct levels (0/1 for an accuracy, -1/0/1 for a paired difference) is a
multinomial draw over those levels, so each replicate costs a handful of numbers, not n indices, and the
whole bootstrap is a few vectorised numpy calls.

A paired difference (column A minus column B) is the same bootstrap on the per-example differences
``a_i - b_i`` of each seed: A and B are compared on the same seeds and the same test examples, so what
the two share (a hard example, a lucky seed) cancels.

Small-sample correction: a bootstrap over S seeds sees a spread (S - 1) / S times the true one, so the
seed-level deviations of each replicate are scaled by sqrt(S / (S - 1)) (the "rescaled bootstrap").
Measured coverage of the 95% interval over 200 synthetic trials (tests/test_stats.py and the numbers
in the module's README text): 3 seeds x 360 examples at accuracy 0.5 covers the truth in 97.5% of trials
when the seed-to-seed spread is 0.03 and in 89% when it is 0.08; three seeds cannot pin a large
seed-to-seed spread down, and no interval from three values can.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

RESAMPLES = 2000     # bootstrap replicates (the issue asks for at least 1,000)
LEVEL = 0.95         # two-sided interval
SEED = 0             # the bootstrap's own seed: the same outcomes give the same interval, every time

# Verdicts of a claim
REPRODUCED = "reproduced"
CONTRADICTED = "contradicted"
INCONCLUSIVE = "inconclusive"
DIRECTIONS = ("greater", "less", "equivalent", "not_less")


@dataclass(frozen=True)
class Estimate:
    """A mean over seeds with its bootstrap interval, and the per-seed means it came from."""
    mean: float
    lo: float
    hi: float
    per_seed: tuple
    n: int                      # test examples per seed
    resamples: int = RESAMPLES

    @classmethod
    def from_dict(cls, cell: dict) -> "Estimate":
        return cls(cell["mean"], cell["lo"], cell["hi"], tuple(cell["per_seed"]), cell["n"],
                   cell.get("resamples", RESAMPLES))

    def as_dict(self) -> dict:
        return {"mean": self.mean, "lo": self.lo, "hi": self.hi, "per_seed": list(self.per_seed), "n": self.n,
                "seeds": len(self.per_seed), "resamples": self.resamples}


def _as_matrix(outcomes: Sequence) -> list:
    values = [np.asarray(v, dtype=np.float64).ravel() for v in outcomes]
    if not values:
        raise ValueError("bootstrap: no seeds (outcomes is empty)")
    if any(v.size == 0 for v in values):
        raise ValueError("bootstrap: a seed has no test examples")
    return values


def bootstrap(outcomes: Sequence, resamples: int = RESAMPLES, seed: int = SEED, level: float = LEVEL) -> Estimate:
    """Mean over seeds of the per-example ``outcomes`` (one 1-D array per seed) and its interval.

    Each replicate draws S seeds with replacement, then, for each seed drawn, resamples its examples with
    replacement (independently each time the seed is drawn), and averages the seed means.
    """
    if resamples < 1:
        raise ValueError(f"bootstrap: resamples must be >= 1, got {resamples}")
    values = _as_matrix(outcomes)
    rng = np.random.default_rng(seed)
    s = len(values)
    drawn = rng.integers(0, s, size=(resamples, s))      # which seed fills each slot of each replicate
    slot_means = np.zeros((resamples, s))
    for index, v in enumerate(values):
        levels, counts = np.unique(v, return_counts=True)
        counts_drawn = rng.multinomial(v.size, counts / v.size, size=(resamples, s))
        slot_means = np.where(drawn == index, counts_drawn @ levels / v.size, slot_means)
    seed_means = np.array([v.mean() for v in values])
    grand = float(seed_means.mean())
    if s > 1:  # rescaled bootstrap: undo the (S - 1) / S shrinkage of the spread over S seeds
        slot_means = grand + np.sqrt(s / (s - 1)) * (slot_means - grand)
    # ... but never beyond what a mean of these values can be (an accuracy stays in [0, 1])
    low, high = min(v.min() for v in values), max(v.max() for v in values)
    replicates = np.clip(slot_means.mean(axis=1), low, high)
    tail = (1.0 - level) / 2.0
    lo, hi = np.quantile(replicates, [tail, 1.0 - tail])
    n = values[0].size if len({v.size for v in values}) == 1 else -1
    return Estimate(grand, float(lo), float(hi), tuple(float(m) for m in seed_means), n, resamples)


def paired_difference(a: Sequence, b: Sequence, resamples: int = RESAMPLES, seed: int = SEED,
                      level: float = LEVEL) -> Estimate:
    """``mean(A) - mean(B)`` over the same seeds and the same examples, with the paired bootstrap interval."""
    if len(a) != len(b):
        raise ValueError(f"paired difference: {len(a)} seeds against {len(b)}; pair the same seeds")
    diffs = []
    for index, (x, y) in enumerate(zip(a, b)):
        x = np.asarray(x, dtype=np.float64).ravel()
        y = np.asarray(y, dtype=np.float64).ravel()
        if x.shape != y.shape:
            raise ValueError(f"paired difference: seed {index} has {x.size} examples against {y.size}; "
                             f"pair the same test examples")
        diffs.append(x - y)
    return bootstrap(diffs, resamples, seed, level)


@dataclass(frozen=True)
class Verdict:
    verdict: str
    reason: str
    extra: dict = field(default_factory=dict)


def verdict(difference: Estimate, direction: str, margin: Optional[float] = None) -> Verdict:
    """The verdict on a claim about ``A - B`` from the interval of the difference.

    * ``greater`` ("A beats B"): reproduced when the interval lies above 0, contradicted when below 0.
    * ``less``: the mirror image.
    * ``equivalent`` (within ``margin``): reproduced when the interval lies inside [-margin, margin]
      (an equivalence test, two one-sided tests at the interval's level), contradicted when it lies wholly
      outside it.
    * ``not_less`` ("A is at least B", non-inferiority with ``margin``): reproduced when the interval lies
      above -margin, contradicted when it lies below -margin.
    Anything else is inconclusive.
    """
    lo, hi = difference.lo, difference.hi
    if direction == "greater":
        return _decide(lo > 0, hi < 0, f"interval [{lo:+.3f}, {hi:+.3f}] against 0")
    if direction == "less":
        return _decide(hi < 0, lo > 0, f"interval [{lo:+.3f}, {hi:+.3f}] against 0")
    if direction in ("equivalent", "not_less"):
        if margin is None or not margin > 0:
            raise ValueError(f"direction {direction!r} needs a positive margin, got {margin!r}")
        if direction == "equivalent":
            return _decide(-margin < lo and hi < margin, lo > margin or hi < -margin,
                           f"interval [{lo:+.3f}, {hi:+.3f}] against the margin +-{margin:g}")
        return _decide(lo > -margin, hi < -margin, f"interval [{lo:+.3f}, {hi:+.3f}] against -{margin:g}")
    raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")


def _decide(reproduced: bool, contradicted: bool, reason: str) -> Verdict:
    if reproduced:
        return Verdict(REPRODUCED, reason)
    if contradicted:
        return Verdict(CONTRADICTED, reason)
    return Verdict(INCONCLUSIVE, reason)


def holds(difference: float, direction: str, margin: Optional[float] = None) -> bool:
    """Whether a point difference (the paper's own two numbers) says what the claim says."""
    if direction == "greater":
        return difference > 0
    if direction == "less":
        return difference < 0
    if direction == "equivalent":
        return abs(difference) < margin
    if direction == "not_less":
        return difference > -margin
    raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
