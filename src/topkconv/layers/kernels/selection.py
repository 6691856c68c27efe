"""Exact top-k selection, the step every routing kernel shares: per row, the positions of the k
largest entries (any order, the same set as ``torch.topk`` ties aside).

Torch level (:func:`select_topk`, any device), two stages instead of one ``topk`` over the row:

1. Split the row into G strided groups of g elements and take each group's maximum.
2. Every one of the k largest entries lies in one of the k groups with the largest maxima: an entry's
   group can be outranked only by groups holding a larger entry, and at most k - 1 entries are larger
   than a top-k entry.
3. ``topk`` over the G maxima, then over the g * k entries of the chosen groups.

Choosing g near sqrt(n / k) makes both ``topk`` calls small (about 5,000 instead of 25,088 elements
per row for the paper's 25088 -> 512, k = 250 layer).

Compiled (numba, CPU; :func:`topk_rows`): ``torch.topk`` on the CPU copies every row into (value, index)
pairs and runs ``nth_element`` over them. Here the k-th largest maximum of about sqrt(width * k)
strided groups (element-wise maxima: vector instructions) bounds the k-th largest entry from below,
only the k groups above it are scanned for candidates, and the k largest candidates come from a
256-bucket histogram plus a three-way quickselect (robust to the many exact ties of ReLU inputs) on
the one bucket that straddles the k-th (rows under 2048 entries skip the groups). On rows of 25,088
products this is about 5x faster than ``torch.topk``, on rows of 128 2x
(``benchmarks/bench_selection.py``).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .bridge import as_array, split
from .jit import inline, jit
from .simd import LANES, count_at_least, count_down_block, trailing_zeros

# ---------------------------------------------------------------- torch level, any device

_MAX_GROUP = 64


def group_size(fan_in: int, k: int) -> int:
    """Group size minimising the elements the two ``topk`` calls see (G + g k with G = n / g).

    A divisor of the fan-in within a factor 1.5 of the best is preferred: no padding column then."""
    best = math.sqrt(fan_in / k)
    if best < 3:
        return 1
    cost = lambda g: fan_in / g + g * k  # noqa: E731
    divisors = [g for g in range(3, min(_MAX_GROUP, int(1.5 * best)) + 1) if fan_in % g == 0 and g >= best / 1.5]
    if divisors:
        return min(divisors, key=cost)
    return min(int(best), _MAX_GROUP)


def select_topk(products: torch.Tensor, k: int, g: int, workspace: torch.Tensor | None = None):
    """Exact top-k along the last dim of ``products`` (rows, g * G), as (values, indices).

    Columns past the real fan-in must hold -inf so they are never chosen. ``workspace``, at least
    rows * (G + g * k) elements, is reused for the group maxima and the candidates (a fresh
    allocation per block costs page faults)."""
    rows, width = products.shape
    n_groups = width // g
    if g == 1 or n_groups <= k:  # grouping cannot shrink the search
        return products.topk(k, dim=1, sorted=False)
    if workspace is None:
        workspace = products.new_empty(rows * (n_groups + g * k))
    maxima = workspace[: rows * n_groups].view(rows, n_groups)
    candidates = workspace[rows * n_groups: rows * (n_groups + g * k)].view(rows, g, k)
    grouped = products.view(rows, g, n_groups)  # group j = columns {j, j + G, j + 2G, ...}
    best_groups = torch.amax(grouped, 1, out=maxima).topk(k, dim=1, sorted=False).indices
    torch.gather(grouped, 2, best_groups[:, None, :].expand(rows, g, k), out=candidates)
    candidates = candidates.view(rows, g * k)
    values, where = candidates.topk(k, dim=1, sorted=False)
    indices = torch.div(where, k, rounding_mode="floor") * n_groups + best_groups.gather(1, where % k)
    return values, indices


# ---------------------------------------------------------------- compiled, CPU

def _greater(a, b):
    """a > b, with NaN above every number (as ``torch.topk`` orders them)."""
    return a > b or (a != a and b == b)


_greater = inline(_greater)


@jit
def _select_largest(values, ids, m, k):
    """Reorder values[:m] (and ids alongside) so that values[:k] are its k largest, in no order."""
    lo, hi = 0, m - 1
    while lo < hi:
        a, b, c = values[lo], values[(lo + hi) >> 1], values[hi]
        if _greater(a, b):
            a, b = b, a
        if _greater(b, c):
            b = c
        pivot = a if _greater(a, b) else b  # the median of the three
        # three-way partition: [lo, lt) above the pivot, [lt, gt] equal, (gt, hi] below
        lt, i, gt = lo, lo, hi
        while i <= gt:
            v = values[i]
            if _greater(v, pivot):
                values[i], values[lt] = values[lt], v
                ids[i], ids[lt] = ids[lt], ids[i]
                lt += 1
                i += 1
            elif _greater(pivot, v):
                values[i], values[gt] = values[gt], v
                ids[i], ids[gt] = ids[gt], ids[i]
                gt -= 1
            else:
                i += 1
        if k <= lt:
            hi = lt - 1
        elif k <= gt + 1:
            return
        else:
            lo = gt + 1


_BUCKETS = 256
_SMALL = 64  # below this many entries a plain quickselect beats the bucket pass


@jit
def _swap(values, ids, buckets, a, b):
    values[a], values[b] = values[b], values[a]
    ids[a], ids[b] = ids[b], ids[a]
    buckets[a], buckets[b] = buckets[b], buckets[a]


@jit
def _partition_largest(values, ids, m, k, buckets, counts):
    """Reorder values[:m] (ids alongside) so that values[:k] are the k largest, in no order.

    The entries are spread over 256 equal-width buckets between their minimum and maximum. Buckets
    above the one where the count from the top reaches k are taken whole; a quickselect runs only on
    that split bucket. Bucket numbers never decrease as values grow (float subtraction and scaling
    are monotone), so rounding cannot reorder two values. NaNs or infinities: plain quickselect."""
    if m <= _SMALL or k == m:
        _select_largest(values, ids, m, k)
        return
    low = values[0]
    high = values[0]
    total = values[0]
    for j in range(1, m):
        low = min(low, values[j])
        high = max(high, values[j])
        total += values[j]
    spread = high - low
    if not (spread > 0 and np.isfinite(spread) and np.isfinite(total)):  # all equal, a NaN or an infinity
        _select_largest(values, ids, m, k)
        return
    scale = (_BUCKETS - 1) / spread
    counts[:] = 0
    for j in range(m):
        bucket = min(_BUCKETS - 1, int((values[j] - low) * scale))
        buckets[j] = bucket
        counts[bucket] += 1
    split = _BUCKETS - 1
    above = 0
    while above + counts[split] < k:
        above += counts[split]
        split -= 1
    front = 0
    for j in range(m):  # the buckets above the split to the front ...
        if buckets[j] > split:
            _swap(values, ids, buckets, front, j)
            front += 1
    start = front
    for j in range(start, m):  # ... then the split bucket's entries
        if buckets[j] == split:
            _swap(values, ids, buckets, front, j)
            front += 1
    _select_largest(values[start:front], ids[start:front], front - start, k - start)


@jit
def selection_workspace(like, n_groups):
    """Scratch arrays of :func:`select_row` for rows like ``like`` (1-D), allocated once per call."""
    width = like.shape[0]
    return (np.empty(n_groups, like.dtype), np.empty(n_groups, np.int32), np.empty(width, like.dtype),
            np.empty(width, np.int32), np.empty(width, np.int32), np.empty(_BUCKETS, np.int64))


@inline
def group_maxima(row, n_groups, maxima):
    """maxima[q] = the largest of row[q], row[q + G], row[q + 2G], ... (G = n_groups): element-wise maxima
    of consecutive slices, vector instructions."""
    width = row.shape[0]
    maxima[:] = row[:n_groups]
    full = width // n_groups
    for t in range(1, full):
        np.maximum(maxima, row[t * n_groups:(t + 1) * n_groups], maxima)
    tail = width - full * n_groups
    if tail:
        np.maximum(maxima[:tail], row[full * n_groups:], maxima[:tail])


@jit
def select_row(row, k, n_groups, workspace, chosen):
    """Positions of the k largest entries of ``row`` into chosen[:k] (any order); returns their sum.

    The row is cut into ``n_groups`` strided groups (group q holds entries q, q + G, q + 2G, ...),
    whose maxima come from element-wise maxima of consecutive slices (vector instructions). The
    k-th largest group maximum is a lower bound on the k-th largest entry, and every entry above it
    that can matter lies in one of the k groups with the largest maxima: an entry in another group
    is at most that group's maximum, so at most equal to the bound (a tie). So only those k groups
    are scanned for candidates, about k * width / G entries, and the k largest candidates are the
    answer. With G near sqrt(width * k), both steps see about sqrt(width * k) entries, not width.
    """
    maxima, group_ids, cand, cand_ids, buckets, counts = workspace
    width = row.shape[0]
    if n_groups <= k or not np.isfinite(np.sum(row)):  # no gain from grouping, or NaN/inf present
        for i in range(width):
            cand[i] = row[i]
            cand_ids[i] = i
        m = width
    else:
        group_maxima(row, n_groups, maxima)
        for q in range(n_groups):
            group_ids[q] = q
        _partition_largest(maxima, group_ids, n_groups, k, buckets, counts)
        bound = maxima[0]
        for j in range(1, k):
            bound = min(bound, maxima[j])
        m = 0
        for j in range(k):
            for i in range(group_ids[j], width, n_groups):
                if row[i] >= bound:
                    cand[m] = row[i]
                    cand_ids[m] = i
                    m += 1
    _partition_largest(cand, cand_ids, m, k, buckets, counts)
    total = cand[0]
    chosen[0] = cand_ids[0]
    for j in range(1, k):
        total += cand[j]
        chosen[j] = cand_ids[j]
    return total


def key_dtype(values: torch.Tensor):
    """The integer type whose width matches ``values``' float type: what :func:`first_k_largest` ranks by."""
    return np.int32 if values.element_size() == 4 else np.int64


@inline
def ordered_keys(values, m, keys):
    """keys[:m]: integers in the order of the floats values[:m] (``keys`` an int array of their width):
    the sign-magnitude bits with the negative ones flipped, -0.0 equal to 0.0 and NaN above +inf (as
    ``torch.topk`` ranks it)."""
    bits = values[:m].view(keys.dtype)
    shift = keys.itemsize * 8 - 1
    magnitude = ~(keys.dtype.type(1) << shift)  # every bit but the sign
    for j in range(m):
        b = bits[j]
        key = b ^ ((b >> shift) & magnitude)
        keys[j] = key + (key == -1)  # -0.0 (the only key -1) to 0.0's key
    for j in range(m):
        if values[j] != values[j]:
            keys[j] = magnitude


@inline
def _kth_largest_key(keys, m, k):
    """The k-th largest of keys[:m], by bisection over the key range: each step one count of the keys
    at or above the midpoint (a vectorised pass, no data-dependent branch). It stops early at a midpoint
    that exactly k keys reach: that threshold selects the same k keys (none equals it but the k-th, if
    any), and the callers only compare keys with it."""
    lo = keys[0]
    hi = keys[0]
    for j in range(1, m):
        lo = min(lo, keys[j])
        hi = max(hi, keys[j])
    while lo < hi:  # invariant: at least k keys >= lo, fewer than k keys > hi
        mid = (lo >> 1) + (hi >> 1) + (((lo & 1) + (hi & 1) + 1) >> 1)  # ceil((lo + hi) / 2), no overflow
        count = 0
        for j in range(m):
            count += keys[j] >= mid
        if count == k:  # exactly the k largest reach mid: it selects as the k-th key would, so stop early
            return mid
        if count > k:
            lo = mid
        else:
            hi = mid - 1
    return lo


# Up to this many candidates :func:`first_k_largest` ranks them against each other (m * m comparisons,
# vectorised) instead of bisecting over the key range (up to 32 or 64 passes over the m keys): the guided
# Dynamic-k rows (k = 13 of 256, a median of 17 candidates) took about a third of the time.
_MAX_RANKED = 64


@inline
def _take_by_rank(keys, m, k, take):
    """take[j] = 1 if keys[j] is among the k largest of keys[:m] (ties to the first), else 0: its rank is
    the number of keys above it plus the number of equal keys before it."""
    for j in range(m):
        key = keys[j]
        rank = 0
        for i in range(m):  # one loop over all m (two split at j vectorise worse)
            rank += (keys[i] > key) | ((keys[i] == key) & (i < j))
        take[j] = rank < k


@inline
def first_k_largest(row, positions, m, k, scratch_values, scratch_keys, chosen):
    """The k largest entries of ``row`` among the candidate ``positions[:m]`` (increasing, and holding
    every entry at or above the row's k-th largest), into ``chosen`` in position order; ties at the
    k-th value go to the earliest positions. Returns (their sum in position order, the k-th value).

    Over order-preserving integer keys: up to :data:`_MAX_RANKED` candidates ranked against each other
    (:func:`_take_by_rank`); more by the k-th value's bisection (:func:`_kth_largest_key`), then one pass in
    position order that takes what lies above it and the first entries equal to it. Both branch-free. It is
    :func:`first_k_largest_above` with no bound, which leaves every row to the ranking."""
    no_bound = row.dtype.type(-np.inf)
    return first_k_largest_above(row, positions, m, k, no_bound, scratch_values, scratch_keys, chosen)


@inline
def first_k_largest_above(row, positions, m, k, bound, scratch_values, scratch_keys, chosen):
    """:func:`first_k_largest` for candidates at or above ``bound``, which k of them reach: all finite unless
    the bound is -inf (a row whose products' sum is finite, cut at a bound). A threshold that exactly k
    candidates reach, found by bisecting their value range (:func:`_split_at_k`), takes the same k in a few
    vectorised passes, where ranking m candidates costs m * m comparisons. Ties at the k-th value leave no
    such threshold, and a bound of -inf no finite range; then :func:`first_k_largest`'s ranking decides."""
    top = row[positions[0]]
    for j in range(m):
        scratch_values[j] = row[positions[j]]
        top = max(top, scratch_values[j])
    # no bound (-inf): the candidates may hold NaN or infinities, which only the ranking orders as torch.topk does
    threshold = _split_at_k(scratch_values, m, k, bound, top) if bound > -np.inf else row.dtype.type(np.nan)
    if threshold == threshold:
        taken = 0
        for j in range(m):  # branch-free: every position written, the taken ones kept
            scratch_keys[taken] = positions[j]
            taken += scratch_values[j] >= threshold
    else:
        _k_largest_positions(scratch_values, positions, m, k, scratch_keys)
    return _sum_and_kth(row, scratch_keys, k, chosen)


# Bisection steps :func:`_split_at_k` tries before it leaves the row to the ranking (a handful on rows
# of distinct values; more only when the k-th and the next are very close or the range spans magnitudes).
_MAX_SPLIT_STEPS = 40


@inline
def _split_at_k(values, m, k, low, high):
    """A threshold that exactly k of values[:m] reach (all finite, all >= ``low``; ``high`` their
    largest), by bisection of the value range, each step one 16-lane count (:func:`.simd.count_at_least`);
    NaN if none is found (ties at the k-th value)."""
    half = values.dtype.type(0.5)
    if m == k:
        return low
    above = count_at_least(values, m, high)
    if above == k:
        return high
    if above > k:
        return values.dtype.type(np.nan)
    for _ in range(_MAX_SPLIT_STEPS):  # invariant: more than k values >= low, fewer than k >= high
        mid = low + (high - low) * half
        if not (low < mid and mid < high):  # adjacent floats (or an overflowing range): no threshold
            break
        above = count_at_least(values, m, mid)
        if above == k:
            return mid
        if above > k:
            low = mid
        else:
            high = mid
    return values.dtype.type(np.nan)


@inline
def _k_largest_positions(scratch_values, positions, m, k, scratch_keys):
    """scratch_keys[:k] = the positions of the k largest of scratch_values[:m] (the row's values at
    ``positions[:m]``), in position order, ties at the k-th to the first; scratch_values is overwritten."""
    ordered_keys(scratch_values, m, scratch_keys)
    if m <= _MAX_RANKED:
        _take_by_rank(scratch_keys, m, k, scratch_values)
        taken = 0
        for j in range(m):  # the keys are no longer needed: their slots take the chosen positions
            scratch_keys[taken] = positions[j]
            taken += scratch_values[j] != 0
    else:
        kth = _kth_largest_key(scratch_keys, m, k)
        ties = k
        for j in range(m):
            ties -= scratch_keys[j] > kth
        taken = 0
        for j in range(m):
            key = scratch_keys[j]
            equal = key == kth
            take = (key > kth) | (equal & (ties > 0))
            ties -= equal & take
            scratch_keys[taken] = positions[j]  # keys[j] is read: slot taken <= j is free to reuse
            taken += take


@inline
def _sum_and_kth(row, taken_positions, k, chosen):
    """chosen = taken_positions[:k]; returns the sum of their values (in that order) and the smallest."""
    total = row.dtype.type(0)
    kth_value = row[taken_positions[0]]
    for t in range(k):
        chosen[t] = taken_positions[t]
        value = row[chosen[t]]
        total += value
        if not _greater(value, kth_value):
            kth_value = value
    return total, kth_value


def guided_wins(width: int, k: int) -> bool:
    """Whether the guided selection (:func:`first_k_largest_above` from a guessed bound) beats
    :func:`select_row` on rows of ``width`` entries: below the grouped width, for every k. Measured at one
    thread, 64 samples (with the bisection of the candidates' values; before it, only up to k = 32): 1024 -> 128,
    k = 51: 5.2 against 33 ms; k = 900: 35 against 40 ms; 2000 -> 64, k = 40: 4.0 against 28 ms; k = 1000: 71
    against 74 ms (another job on the other core). (256 -> 128, k = 13: 1.7 ms quiet; the bucket pass had taken
    11 ms there.)"""
    return width < _MIN_GROUPED_WIDTH


def bounded_wins(width: int, k: int) -> bool:
    """Whether the Dynamic-k forward bounds each row by the previous rows' k-th values and scans only the
    strided groups above the bound (``numba_loops._linear_forward_bounded``): on rows long enough to be
    grouped at all, and k below the group count (else grouping cannot shrink the search)."""
    return width >= _MIN_GROUPED_WIDTH and k < n_groups_for(width, k)


# Below this width the bucket pass over the whole row beats grouping (benchmarks/bench_selection.py:
# rows of 128-1024 entries took 0.6-0.8x the time without groups; at 4096 both tie; at 25,088
# grouping wins by 4x).
_MIN_GROUPED_WIDTH = 2048


def n_groups_for(width: int, k: int) -> int:
    """Strided groups for :func:`select_row`: about sqrt(width * k), so that the group maxima and
    the scanned groups cost alike; 1 (no grouping) for short rows."""
    if width < _MIN_GROUPED_WIDTH:
        return 1
    return max(1, min(width, round((width * k) ** 0.5)))


@jit
def _select_rows(rows, k, n_groups, indices_out, totals_out, r0, r1):
    """Per row r0 <= r < r1 of a 2-D array: positions of its k largest entries and their sum."""
    workspace = selection_workspace(rows[0], n_groups)
    for r in range(r0, r1):
        totals_out[r] = select_row(rows[r], k, n_groups, workspace, indices_out[r])


def topk_rows(scores: torch.Tensor, k: int, indices: torch.Tensor) -> None:
    """indices[r] = the positions of the k largest entries of scores[r] (rows of a 2-D CPU tensor), any order."""
    scores = as_array(scores.contiguous())
    args = (scores, k, n_groups_for(scores.shape[1], k), as_array(indices), np.empty(scores.shape[0], scores.dtype))
    split(scores.shape[0], lambda r0, r1: _select_rows(*args, r0, r1))


# ---------------------------------------------------------------- compiled, CPU: many short columns at once

# Rows of a TopKConv sample's scores are short (one per input channel) and many (one per output channel):
# the loops below keep the output channels innermost, so every step is a vectorised pass over a row of
# them, where :func:`first_k_largest` per output channel would run its bisection scalar, column by column.

@inline
def _kth_largest_down(keys, k, kth, upper, mid, counts):
    """kth[c] = the k-th largest of keys[:, c] for every column at once, or a threshold that exactly k of
    them reach (:func:`_kth_largest_key`'s bisection and early stop), one vectorised pass over the rows per
    step for all the columns; it ends when every column has. counts: int32."""
    in_rows, columns = keys.shape
    for c in range(columns):
        kth[c] = keys[0, c]
        upper[c] = keys[0, c]
    for i in range(1, in_rows):
        row = keys[i]
        for c in range(columns):
            kth[c] = min(kth[c], row[c])
            upper[c] = max(upper[c], row[c])
    for _ in range(keys.itemsize * 8 + 1):  # each step halves every open range of keys
        still_open = 0
        for c in range(columns):
            lo, hi = kth[c], upper[c]
            still_open += lo < hi
            mid[c] = (lo >> 1) + (hi >> 1) + (((lo & 1) + (hi & 1) + 1) >> 1)  # ceil((lo + hi) / 2)
        if still_open == 0:
            return
        for start in range(0, columns, LANES):
            count_down_block(keys, mid, start, counts)
        for c in range(columns):  # invariant: at least k keys >= kth[c], fewer than k > upper[c]
            enough = counts[c] >= k
            kth[c] = mid[c] if enough else kth[c]
            # exactly k keys reach mid: they are the k largest, so the column closes at mid (the early stop)
            upper[c] = mid[c] if counts[c] == k else (upper[c] if enough else mid[c] - 1)


@inline
def row_bits_words(rows):
    """64-bit words a column's bitmap of chosen rows takes in :func:`first_k_largest_down`."""
    return (rows + 63) // 64


@inline
def first_k_largest_down(keys, k, chosen, mask, kth, upper, mid, counts, row_bits):
    """chosen[c] = the k rows of largest keys[:, c], in row order, ties at the k-th going to the first rows
    (what :func:`first_k_largest` picks in each column); mask[i, c] = 1 where row i is chosen for c, else
    0. kth, upper, mid: scratch of one entry per column of the keys' type; counts the same in int32;
    row_bits (:func:`row_bits_words`, columns) uint64 scratch.

    The chosen rows of each column are set as bits while the mask is written (rows innermost would stride
    across the mask), then read off lowest first: k ``tzcnt`` a column. Writing each row's index to its column's
    next slot instead (a dependent store per row and column) took 0.41 of the 1.1 ms this selection took at
    64 x 64, k = 32, batch 64."""
    _kth_largest_down(keys, k, kth, upper, mid, counts)
    rows, columns = keys.shape
    ties = counts
    for c in range(columns):
        ties[c] = k
    for i in range(rows):
        row = keys[i]
        for c in range(columns):
            ties[c] -= np.int32(row[c] > kth[c])
    row_bits[:, :] = 0
    for i in range(rows):
        row = keys[i]
        keep = mask[i]
        word = row_bits[i >> 6]
        bit = np.uint64(1) << np.uint64(i & 63)
        zero = np.uint64(0)
        for c in range(columns):
            equal = row[c] == kth[c]
            take = (row[c] > kth[c]) | (equal & (ties[c] > 0))
            ties[c] -= np.int32(equal & take)
            keep[c] = take
            word[c] |= bit if take else zero
    for c in range(columns):
        taken = 0
        for w in range(row_bits.shape[0]):
            bits = row_bits[w, c]
            while bits != 0:
                chosen[c, taken] = np.int32(w * 64 + trailing_zeros(bits))
                taken += 1
                bits &= bits - np.uint64(1)
