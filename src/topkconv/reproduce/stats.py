"""Statistics over seeds: an interval for a cell, for a paired difference, and the verdicts on claims.

The seed is the unit of replication. Every seed is tested on the same examples, so the outcomes of one
cell form an S x n matrix (seeds x test examples) of a crossed design. Its grand mean varies through

* the seeds (initialisation, batch order, augmentation): ``sigma2_seed / S``;
* the finite test set, shared by every seed (a hard example is hard for all of them): ``sigma2_example / n``;
* what is left (a seed's luck on one example): ``sigma2_rest / (S n)``.

The two-way ANOVA of the matrix estimates the three (mean squares ``MS_seed``, ``MS_example``,
``MS_rest``). The variance of the grand mean is estimated by ``A + B`` with

* ``A = MS_seed / (S n)``: the variance of the mean of the S per-seed accuracies (the classic t-interval's
  ``s^2 / S``); when every seed has exactly the same accuracy (a tie, common with few successes) the spread
  is unseen rather than zero, and ``MS_rest`` (what the examples alone put into a seed's accuracy) stands in;
* ``B = max(0, MS_example - MS_rest) / (S n)``: the shared examples' share, which the seed means cannot see
  (they all contain the same examples). It is about 0 when each seed has its own examples (nested).

The half-width is ``sqrt(t(S - 1)^2 A + t(m - 1)^2 B)``: each share with its own Student t critical value,
``m`` the examples that inform B (those off the most common per-example total; near an edge a handful of
examples carry every success). With ``B = 0`` this is exactly the t-interval on the per-seed accuracies,
df = S - 1. (A Satterthwaite df on ``A + B`` under-covered with 3 seeds: 0.90-0.91 in the tests' settings.)
A paired difference A - B (same seed index, same examples) is the same computation on the per-example
differences.

Edges. When every outcome is the same (every seed at 0, or every seed at 1) the spread is zero and says
nothing: the cell then gets the exact (Clopper-Pearson) interval of the pooled S n examples (0 of 300:
[0, 0.012]); a difference whose every per-example value is the same (two identical models, say) gets
the exact bound on the pooled discordant pairs (0 of N pairs discordant bounds ``|A - B|`` by the
Clopper-Pearson upper bound of 0/N). With one seed there is no interval over seeds: the interval is
the example-level one (Clopper-Pearson for a cell, t over the n paired differences for a difference)
and is labelled so.

Coverage of the 95% intervals, measured by simulation (tests/test_stats.py: nested and crossed designs,
seed SD 0 to 0.15, 3 to 10 seeds, 100 and 2,000 examples, 1,000 trials each) lies in [0.92, 0.98]. Within
1% of an edge on 100 examples (crossed) a cell's coverage fell to 0.92: a mean carried by a few examples is
skewed, and a symmetric interval's far side is short.

Verdicts (:func:`verdict`) come from the one-sided tests that invert these intervals (Student's one-sample
t-test on the per-seed values when ``B = 0``), so the p-values and the intervals agree; :func:`holm` adjusts
the p-values of a report's claims, and :func:`seeds_needed` says how many seeds would narrow an interval to a
target half-width.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
from scipy import optimize
from scipy import stats as sps

LEVEL = 0.95          # two-sided interval; a one-sided test behind a verdict is at (1 - LEVEL) / 2
DELTA = 0.02          # default non-superiority margin of "greater"/"less" claims (2 points)
P_FLOOR = 1e-100      # smaller p-values are reported as this (a t quantile beyond it overflows when squared)

# Methods of an interval
T_SEEDS = "t over seeds"                  # t with S - 1 df, plus the shared examples' share (see above)
EXACT = "exact (pooled examples)"         # every outcome the same: Clopper-Pearson on the pooled examples
ONE_SEED = "1 seed: examples only"        # no seed-to-seed variation measured

# Verdicts of a claim
REPRODUCED = "reproduced"
CONTRADICTED = "contradicted"
NO_GAIN = "no gain shown"
INCONCLUSIVE = "inconclusive"
NOT_MEASURED = "not measured"
DIRECTIONS = ("greater", "less", "equivalent", "not_less")


@dataclass(frozen=True)
class Estimate:
    """A mean over seeds (of accuracies, or of paired differences) with its interval."""
    mean: float
    low: float
    high: float
    per_seed: tuple
    n: int                   # test examples per seed
    method: str = T_SEEDS
    level: float = LEVEL
    seed_var: float = 0.0    # the seeds' share of the variance of the mean (A), t with df S - 1
    example_var: float = 0.0  # the shared test examples' share (B), t with df examples_informative - 1
    examples_informative: int = 0  # the examples B rests on (see :func:`_informative_examples`)
    kind: str = "cell"       # "cell" (an accuracy) or "difference" (a paired A - B)

    @property
    def n_seeds(self) -> int:
        return len(self.per_seed)

    @property
    def lo(self) -> float:   # the short names of the reports' dicts
        return self.low

    @property
    def hi(self) -> float:
        return self.high

    @property
    def se(self) -> float:
        return float(np.sqrt(self.seed_var + self.example_var))

    @property
    def seed_sd(self) -> float:
        """SD of the per-seed values (from ``seed_var``): what more seeds would average away."""
        return float(np.sqrt(self.seed_var * self.n_seeds))

    @classmethod
    def from_dict(cls, cell: dict) -> "Estimate":
        return cls(cell["mean"], cell["lo"], cell["hi"], tuple(cell["per_seed"]), cell["n"],
                   cell.get("method", T_SEEDS), cell.get("level", LEVEL), cell.get("seed_var", 0.0),
                   cell.get("example_var", 0.0), cell.get("examples_informative", 0), cell.get("kind", "cell"))

    def as_dict(self) -> dict:
        return {"mean": self.mean, "lo": self.low, "hi": self.high, "per_seed": list(self.per_seed), "n": self.n,
                "seeds": self.n_seeds, "method": self.method, "level": self.level, "seed_var": self.seed_var,
                "example_var": self.example_var, "examples_informative": self.examples_informative,
                "kind": self.kind}

    def p_value(self, threshold: float = 0.0, alternative: str = "greater") -> float:
        """One-sided p-value of ``mean > threshold`` (``alternative="greater"``) or ``< threshold``: the test
        that inverts this interval (with ``example_var = 0``, Student's one-sample t-test on the per-seed values)."""
        if alternative not in ("greater", "less"):
            raise ValueError(f"alternative must be 'greater' or 'less', got {alternative!r}")
        sign = 1.0 if alternative == "greater" else -1.0
        pooled = self.n * self.n_seeds
        if self.kind == "cell" and self.method in (EXACT, ONE_SEED):   # the exact binomial test, as CP inverts
            successes = int(round(self.mean * pooled))
            return float(sps.binomtest(successes, pooled, min(max(threshold, 0.0), 1.0), alternative).pvalue)
        if self.method == EXACT:
            return _exact_difference_p(sign * self.per_seed[0], sign * threshold, pooled)
        if self.seed_var + self.example_var <= 0:
            raise ValueError(f"p_value: an interval by {self.method!r} has no variance to test with")
        return _combined_p(sign * (self.mean - threshold), self.seed_var, self.example_var, self.n_seeds,
                           self.examples_informative)


def _combined_critical(p, seed_var, example_var, seeds: int, examples):
    """``sqrt(t(1 - p, S - 1)^2 A + t(1 - p, m - 1)^2 B)`` with the sign of the t quantiles: the distance from
    the mean at which a one-sided test rejects at ``p`` (vectorised). Each variance share keeps its own
    degrees of freedom: a seed-dominated mean gets t with S - 1, an example-dominated one t with m - 1
    (``examples``: the examples B rests on)."""
    seed_t = sps.t.isf(p, max(seeds - 1, 1))
    example_t = sps.t.isf(p, np.maximum(np.asarray(examples) - 1, 1))
    return np.sign(example_t) * np.sqrt(seed_t ** 2 * seed_var + example_t ** 2 * example_var)


def _combined_p(distance: float, seed_var: float, example_var: float, seeds: int, examples: int) -> float:
    """The one-sided p at which :func:`_combined_critical` equals ``distance`` (closed form when B = 0)."""
    if example_var <= 0:
        return float(sps.t.sf(distance / np.sqrt(seed_var), seeds - 1))
    if seed_var <= 0:
        return float(sps.t.sf(distance / np.sqrt(example_var), max(examples - 1, 1)))

    def gap(log_p: float) -> float:
        return float(_combined_critical(np.exp(log_p), seed_var, example_var, seeds, examples)) - distance

    low, high = np.log(P_FLOOR), np.log1p(-1e-15)
    if gap(low) <= 0:
        return P_FLOOR
    if gap(high) >= 0:
        return 1.0
    return float(np.exp(optimize.brentq(gap, low, high, xtol=1e-10)))


def _matrix(outcomes: Sequence, what: str) -> np.ndarray:
    values = [np.asarray(v, dtype=np.float64).ravel() for v in outcomes]
    if not values:
        raise ValueError(f"{what}: no seeds (outcomes is empty)")
    sizes = {v.size for v in values}
    if 0 in sizes:
        raise ValueError(f"{what}: a seed has no test examples")
    if len(sizes) > 1:
        raise ValueError(f"{what}: seeds have {sorted(sizes)} test examples; every seed is tested on the same ones")
    return np.stack(values)


def crossed_t(batch: np.ndarray, level: float = LEVEL) -> dict:
    """The t-interval of the grand mean of each S x n matrix in ``batch`` (shape ``(..., S, n)``, S >= 2).

    Vectorised over the leading axes (the coverage tests run thousands at once). Returns arrays ``mean``,
    ``low``, ``high``, ``seed_var``, ``example_var`` and ``constant`` (every value the same: no spread).
    """
    batch = np.asarray(batch)
    s, n = batch.shape[-2:]
    if s < 2:
        raise ValueError(f"crossed_t: needs at least 2 seeds, got {s}")
    total = batch.sum(axis=(-2, -1), dtype=np.float64)
    squares = np.square(batch, dtype=np.float32).sum(axis=(-2, -1), dtype=np.float64)
    rows = batch.sum(axis=-1, dtype=np.float64)
    cols = batch.sum(axis=-2, dtype=np.float64)
    correction = total ** 2 / (s * n)
    ss_seed = (rows ** 2).sum(axis=-1) / n - correction
    ss_example = (cols ** 2).sum(axis=-1) / s - correction
    ss_rest = squares - correction - ss_seed - ss_example
    ms_seed, ms_example = np.maximum(ss_seed, 0) / (s - 1), np.maximum(ss_example, 0) / max(n - 1, 1)
    ms_rest = np.maximum(ss_rest, 0) / ((s - 1) * max(n - 1, 1))
    tied = np.all(rows == rows[..., :1], axis=-1)   # every seed at the same accuracy: a spread unseen, not zero
    seed_var = np.where(tied, ms_rest, ms_seed) / (s * n)
    example_var = np.maximum(ms_example - ms_rest, 0) / (s * n)
    informative = _informative_examples(cols, s)
    half = _combined_critical((1.0 - level) / 2, seed_var, example_var, s, informative)
    mean = total / (s * n)
    constant = (squares == np.abs(total)) & ((total == 0) | (np.abs(total) == s * n))  # every value 0, or all +-1
    return {"mean": mean, "low": mean - half, "high": mean + half, "seed_var": seed_var,
            "example_var": example_var, "informative": informative, "constant": constant}


def _informative_examples(cols: np.ndarray, seeds: int) -> np.ndarray:
    """How many examples inform the shared examples' share: those off the most common per-example total.

    Near an edge a handful of examples carry every success (a 1% cell on 100 examples); the example share's
    variance then rests on those few, not on n, and its t critical value takes their number as the sample.
    """
    totals = np.rint(cols).astype(np.int64)
    mode = np.max([np.count_nonzero(totals == value, axis=-1) for value in range(-seeds, seeds + 1)], axis=0)
    return np.maximum(cols.shape[-1] - mode, 2)


def clopper_pearson(successes, trials, level: float = LEVEL) -> tuple:
    """The exact two-sided binomial interval (vectorised): 0 of 300 -> (0, 0.0122)."""
    k, m = np.asarray(successes, dtype=np.float64), np.asarray(trials, dtype=np.float64)
    tail = (1.0 - level) / 2
    with np.errstate(invalid="ignore"):
        low = np.where(k > 0, sps.beta.ppf(tail, k, m - k + 1), 0.0)
        high = np.where(k < m, sps.beta.isf(tail, k + 1, m - k), 1.0)
    return low, high


def _final_bounds(out: dict, pooled: int, level: float, kind: str) -> tuple:
    """The t bounds of :func:`crossed_t` kept inside the possible values, or the exact ones where constant."""
    if kind == "cell":
        exact_low, exact_high = clopper_pearson(np.rint(out["mean"] * pooled), pooled, level)
        floor = 0.0
    else:
        exact_low, exact_high = _exact_difference_interval(np.rint(out["mean"]), pooled, level)
        floor = -1.0
    low = np.where(out["constant"], exact_low, np.clip(out["low"], floor, 1))
    high = np.where(out["constant"], exact_high, np.clip(out["high"], floor, 1))
    return low, high


def cell_bounds(batch: np.ndarray, level: float = LEVEL) -> tuple:
    """``(mean, low, high)`` arrays of the cell interval of each S x n 0/1 matrix in ``batch`` (S >= 2)."""
    out = crossed_t(batch, level)
    return (out["mean"], *_final_bounds(out, batch.shape[-2] * batch.shape[-1], level, "cell"))


def difference_bounds(a: np.ndarray, b: np.ndarray, level: float = LEVEL) -> tuple:
    """``(mean, low, high)`` arrays of the paired-difference interval of each S x n pair in ``a`` and ``b``."""
    difference = np.asarray(a, dtype=np.int8) - np.asarray(b, dtype=np.int8)
    out = crossed_t(difference, level)
    return (out["mean"], *_final_bounds(out, difference.shape[-2] * difference.shape[-1], level, "difference"))


def _exact_difference_interval(value, pairs, level: float) -> tuple:
    """Every one of ``pairs`` paired differences equals ``value`` (-1, 0 or +1): the exact interval.

    0: no discordant pair, so ``|A - B|`` is at most the discordance rate, whose Clopper-Pearson upper
    bound of 0/N is ``u``: ``[-u, u]``. +1: every pair is A-right-B-wrong, at a rate of at least ``l``
    (the lower bound of N/N), so ``A - B >= 2 l - 1``; -1 is the mirror image.
    """
    bound = ((1.0 - level) / 2) ** (1.0 / pairs)         # CP lower bound of N/N = 1 - upper bound of 0/N
    value = np.asarray(value, dtype=np.float64)
    low = np.where(value > 0, 2 * bound - 1, np.where(value < 0, -1.0, bound - 1))
    high = np.where(value < 0, 1 - 2 * bound, np.where(value > 0, 1.0, 1 - bound))
    return low, high


def _exact_difference_p(value: float, threshold: float, pairs: int) -> float:
    """One-sided p-value of ``A - B > threshold`` when every paired difference equals ``value``; the test
    that inverts :func:`_exact_difference_interval` (``value`` and ``threshold`` already signed)."""
    if value > 0:      # all A-right-B-wrong: under A - B <= threshold their rate is at most (1 + threshold) / 2
        return 1.0 if threshold >= 1 else float(((1 + threshold) / 2) ** pairs)
    if value == 0 and threshold < 0:   # no discordant pair: under A - B <= threshold, discordance >= |threshold|
        return float((1 + threshold) ** pairs)
    return 1.0


def cell_estimate(outcomes: Sequence, level: float = LEVEL) -> Estimate:
    """Mean over seeds of the 0/1 ``outcomes`` (one 1-D array per seed, the same examples) and its interval."""
    matrix = _matrix(outcomes, "cell_estimate")
    if matrix.shape[0] == 1:   # no seed-to-seed variation measured: the exact interval of the n examples
        low, high = clopper_pearson(matrix.sum(), matrix.shape[1], level)
        mean = float(matrix.mean())
        return Estimate(mean, float(low), float(high), (mean,), matrix.shape[1], ONE_SEED, level)
    return _estimate(matrix, level, "cell")


def difference_estimate(a: Sequence, b: Sequence, level: float = LEVEL) -> Estimate:
    """``mean(A) - mean(B)`` over the same seeds and the same examples, with its paired interval."""
    if len(a) != len(b):
        raise ValueError(f"difference_estimate: {len(a)} seeds against {len(b)}; pair the same seeds")
    first, second = _matrix(a, "difference_estimate"), _matrix(b, "difference_estimate")
    if first.shape != second.shape:
        raise ValueError(f"difference_estimate: {first.shape[1]} examples against {second.shape[1]}; "
                         f"pair the same test examples")
    difference = first - second
    if difference.shape[0] > 1:
        return _estimate(difference, level, "difference")
    values, n = difference[0], difference.shape[1]   # one seed: t over the n per-example differences
    mean = float(values.mean())
    if np.all(values == values[0]):
        low, high = _exact_difference_interval(values[0], n, level)
        return Estimate(mean, float(low), float(high), (mean,), n, EXACT, level, kind="difference")
    example_var = float(values.var(ddof=1) / n)
    half = float(_combined_critical((1.0 - level) / 2, 0.0, example_var, 1, n))
    return Estimate(mean, max(-1.0, mean - half), min(1.0, mean + half), (mean,), n, ONE_SEED, level,
                    0.0, example_var, n, "difference")


def _estimate(matrix: np.ndarray, level: float, kind: str) -> Estimate:
    out = crossed_t(matrix, level)
    low, high = _final_bounds(out, matrix.size, level, kind)
    return Estimate(float(out["mean"]), float(low), float(high), tuple(float(m) for m in matrix.mean(axis=1)),
                    matrix.shape[1], EXACT if out["constant"] else T_SEEDS, level, float(out["seed_var"]),
                    float(out["example_var"]), int(out["informative"]), kind)


@dataclass(frozen=True)
class Verdict:
    verdict: str
    reason: str
    p_value: float           # two-sided-equivalent p of the test behind the verdict: decisive when < 1 - level


def _tests(direction: str, margin: Optional[float], delta: float) -> dict:
    """Each decisive outcome as the one-sided tests that must all reject: (threshold, alternative) lists.
    Several entries under one outcome are alternatives (any one suffices), an inner list must all reject."""
    if direction == "greater":
        return {REPRODUCED: [[(0.0, "greater")]], CONTRADICTED: [[(0.0, "less")]], NO_GAIN: [[(delta, "less")]]}
    if direction == "less":
        return {REPRODUCED: [[(0.0, "less")]], CONTRADICTED: [[(0.0, "greater")]], NO_GAIN: [[(-delta, "greater")]]}
    if direction in ("equivalent", "not_less"):
        if margin is None or not margin > 0:
            raise ValueError(f"direction {direction!r} needs a positive margin, got {margin!r}")
        if direction == "equivalent":   # two one-sided tests inside; wholly beyond either edge outside
            return {REPRODUCED: [[(-margin, "greater"), (margin, "less")]],
                    CONTRADICTED: [[(margin, "greater")], [(-margin, "less")]]}
        return {REPRODUCED: [[(-margin, "greater")]], CONTRADICTED: [[(-margin, "less")]]}
    raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")


def verdict(difference: Estimate, direction: str, margin: Optional[float] = None,
            delta: float = DELTA) -> Verdict:
    """The verdict on a claim about ``A - B`` (see the module's text and :func:`_tests`).

    * ``greater``: reproduced when A - B is shown > 0, contradicted when shown < 0, *no gain shown* when
      shown < ``delta`` (non-superiority); ``less`` is the mirror image.
    * ``equivalent``: reproduced when shown inside +-margin, contradicted when shown wholly outside.
    * ``not_less``: reproduced when shown > -margin, contradicted when shown < -margin.
    Each "shown" is a one-sided test at (1 - level) / 2, the same as the interval lying on that side.
    The p-value is doubled so that it compares with 1 - level (and with Holm's family-wise 5%).
    """
    alpha = 1.0 - difference.level
    reason = f"interval [{difference.low:+.3f}, {difference.high:+.3f}]"
    p_values = {}
    for outcome, alternatives in _tests(direction, margin, delta).items():
        one_sided = min(max(difference.p_value(t, alt) for t, alt in tests) for tests in alternatives)
        p_values[outcome] = min(1.0, 2 * one_sided)
        if p_values[outcome] < alpha:   # outcomes in order of precedence: a gain below delta is still a gain
            return Verdict(outcome, reason, p_values[outcome])
    return Verdict(INCONCLUSIVE, reason, min(p_values.values()))


def holm(p_values: Sequence) -> np.ndarray:
    """Holm-Bonferroni adjusted p-values: the i-th smallest times (m - i + 1), made non-decreasing."""
    p = np.asarray(p_values, dtype=np.float64)
    order = np.argsort(p, kind="stable")
    scaled = np.minimum(1.0, p[order] * (p.size - np.arange(p.size)))
    adjusted = np.empty_like(p)
    adjusted[order] = np.maximum.accumulate(scaled)
    return adjusted


def seeds_needed(seed_sd: float, half_width: float, level: float = LEVEL, limit: int = 100_000,
                 example_half: float = 0.0) -> Optional[int]:
    """The fewest seeds S >= 2 with ``sqrt((t(level, S - 1) seed_sd / sqrt(S))^2 + example_half^2) <= half_width``.

    ``example_half`` is the shared test examples' part of the half-width, which more seeds do not shrink
    (0: the t-interval on seeds alone). None when no number of seeds up to ``limit`` reaches the target.
    """
    if not half_width > 0:
        raise ValueError(f"seeds_needed: the target half-width must be positive, got {half_width!r}")
    if example_half >= half_width:
        return None
    quantile = 0.5 + level / 2
    reachable = np.sqrt(half_width ** 2 - example_half ** 2)
    half = lambda s: sps.t.ppf(quantile, s - 1) * seed_sd / np.sqrt(s)  # noqa: E731 (decreasing in s)
    if half(limit) > reachable:
        return None
    low, high = 2, limit
    while low < high:
        middle = (low + high) // 2
        low, high = (low, middle) if half(middle) <= reachable else (middle + 1, high)
    return int(low)


def example_half_width(estimate: Estimate) -> float:
    """The shared test examples' part of an interval's half-width: what more seeds cannot narrow."""
    if estimate.example_var <= 0:
        return 0.0
    return float(sps.t.ppf(0.5 + estimate.level / 2, max(estimate.examples_informative - 1, 1))
                 * np.sqrt(estimate.example_var))


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
