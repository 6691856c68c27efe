"""Compiled CPU loops (numba) for the parts of the routing layers that no single torch op does well.

The torch-level fast kernels (``_linear_kernel.py``, ``_conv_kernel.py``) pay for two things that
compiled loops avoid:

* **Selection.** ``torch.topk`` on the CPU copies every row into (value, index) pairs and runs
  ``nth_element`` over them. Here the k-th largest maximum of about sqrt(width * k) strided groups
  (element-wise maxima: vector instructions) bounds the k-th largest entry from below, only the k
  groups above it are scanned for candidates, and the k largest candidates come from a 256-bucket
  histogram plus a three-way quickselect (robust to the many exact ties of ReLU inputs) on the one
  bucket that straddles the k-th (rows under 2048 entries skip the groups). On rows of 25,088
  products this is about 5x faster than ``torch.topk``, on rows of 128 2x
  (``benchmarks/bench_selection.py``).
* **Dense work on sparse routes.** The masked-weight matmuls of TopKConv do a dense convolution's
  FLOPs, although each (sample, output channel) uses only k of the input channels. Here the output
  and both gradients walk the saved (sample, output channel, k) indices and touch only the selected
  channels: ``k / in`` of the dense FLOPs, as contiguous multiply-adds along the output positions.

Every function writes into arrays the caller allocated; none allocates per row. The loops release
the GIL, and the entry points split them over ``torch.get_num_threads()`` Python threads along axes
whose outputs do not overlap (one thread: a single call). ``fastmath`` allows only reassociation
and contraction (vectorised sums and FMA); infinities and NaNs keep their meaning.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

try:
    import numba
except ImportError:  # the torch-level kernels serve instead
    numba = None

AVAILABLE = numba is not None
_FASTMATH = {"reassoc", "contract"}
# Compiled code is cached next to this file (or in NUMBA_CACHE_DIR), so a process pays the few
# seconds of compilation once per machine.
_CACHE = True


def _jit(fn):
    if numba is None:
        return fn
    return numba.njit(nogil=True, cache=_CACHE, fastmath=_FASTMATH)(fn)


def _greater(a, b):
    """a > b, with NaN above every number (as ``torch.topk`` orders them)."""
    return a > b or (a != a and b == b)


if numba is not None:
    _greater = numba.njit(inline="always")(_greater)


@_jit
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


@_jit
def _swap(values, ids, buckets, a, b):
    values[a], values[b] = values[b], values[a]
    ids[a], ids[b] = ids[b], ids[a]
    buckets[a], buckets[b] = buckets[b], buckets[a]


@_jit
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


@_jit
def _selection_workspace(like, n_groups):
    """Scratch arrays of :func:`_select_row` for rows like ``like`` (1-D), allocated once per call."""
    width = like.shape[0]
    return (np.empty(n_groups, like.dtype), np.empty(n_groups, np.int32), np.empty(width, like.dtype),
            np.empty(width, np.int32), np.empty(width, np.int32), np.empty(_BUCKETS, np.int64))


@_jit
def _select_row(row, k, n_groups, workspace, chosen):
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
        maxima[:] = row[:n_groups]
        full = width // n_groups
        for t in range(1, full):
            np.maximum(maxima, row[t * n_groups:(t + 1) * n_groups], maxima)
        tail = width - full * n_groups
        if tail:
            np.maximum(maxima[:tail], row[full * n_groups:], maxima[:tail])
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


# Below this width the bucket pass over the whole row beats grouping (benchmarks/bench_selection.py:
# rows of 128-1024 entries took 0.6-0.8x the time without groups; at 4096 both tie; at 25,088
# grouping wins by 4x).
_MIN_GROUPED_WIDTH = 2048


def n_groups_for(width: int, k: int) -> int:
    """Strided groups for :func:`_select_row`: about sqrt(width * k), so that the group maxima and
    the scanned groups cost alike; 1 (no grouping) for short rows."""
    if width < _MIN_GROUPED_WIDTH:
        return 1
    return max(1, min(width, round((width * k) ** 0.5)))


@_jit
def _select_rows(rows, k, n_groups, indices_out, totals_out, r0, r1):
    """Per row r0 <= r < r1 of a 2-D array: positions of its k largest entries and their sum."""
    workspace = _selection_workspace(rows[0], n_groups)
    for r in range(r0, r1):
        totals_out[r] = _select_row(rows[r], k, n_groups, workspace, indices_out[r])


@_jit
def _linear_forward(x, weight, k, n_groups, positive_only, out, indices, c0, c1):
    """Output rows c0 <= c < c1 of the Dynamic-k forward, for the whole batch."""
    products = np.empty(x.shape[1], x.dtype)
    workspace = _selection_workspace(products, n_groups)
    for c in range(c0, c1):  # weight row outermost: it stays in cache for the whole batch
        for b in range(x.shape[0]):
            np.multiply(weight[c], x[b], products)
            if positive_only:
                np.maximum(products, 0, products)
            out[b, c] = _select_row(products, k, n_groups, workspace, indices[b, c])


@_jit
def _linear_backward(x, weight, indices, grad_out, positive_only, need_x, need_w, grad_x, grad_w, b0, b1, c0, c1):
    """Gradients of :func:`_linear_forward` from the saved indices, over samples b0:b1 and output
    rows c0:c1; adds into grad_x and grad_w."""
    k = indices.shape[2]
    for b in range(b0, b1):
        for c in range(c0, c1):
            g = grad_out[b, c]
            if g == 0:
                continue
            for j in range(k):
                i = indices[b, c, j]
                xv = x[b, i]
                wv = weight[c, i]
                if positive_only and not xv * wv > 0:  # clamped products pass no gradient
                    continue
                if need_x:
                    grad_x[b, i] += g * wv
                if need_w:
                    grad_w[c, i] += g * xv


@_jit
def _conv_output(cols, weight_tm, indices, out, b0, b1):
    """out[b, c, :] = sum over the selected input channels i and taps j of weight_tm[c, j, i] * cols[b, j, i, :]
    for samples b0 <= b < b1.

    cols (n, taps, in, L): tap-major patch columns; weight_tm (out, taps, in); indices (n, out, k)."""
    taps, positions = cols.shape[1], cols.shape[3]
    out_ch, k = indices.shape[1], indices.shape[2]
    acc = np.empty(positions, cols.dtype)
    for b in range(b0, b1):
        for c in range(out_ch):
            acc[:] = 0
            for s in range(k):
                i = indices[b, c, s]
                for j in range(taps):
                    w = weight_tm[c, j, i]
                    src = cols[b, j, i]
                    for p in range(positions):
                        acc[p] += w * src[p]
            out[b, c, :] = acc


@_jit
def _conv_backward(cols, weight_tm, indices, grad_out, need_x, need_w, grad_cols, grad_w, b0, b1, c0, c1):
    """Gradients of :func:`_conv_output` over the selected channels only, for samples b0:b1 and output
    channels c0:c1: adds into grad_cols (n, taps, in, L; its unselected entries stay as they were)
    and grad_w (out, taps, in)."""
    taps = weight_tm.shape[1]
    positions = grad_out.shape[2]
    k = indices.shape[2]
    for b in range(b0, b1):
        for c in range(c0, c1):
            g = grad_out[b, c]
            for s in range(k):
                i = indices[b, c, s]
                for j in range(taps):
                    if need_w:
                        src = cols[b, j, i]
                        dot = cols.dtype.type(0)  # a float64 literal would widen a float32 sum
                        for p in range(positions):
                            dot += g[p] * src[p]
                        grad_w[c, j, i] += dot
                    if need_x:
                        w = weight_tm[c, j, i]
                        dst = grad_cols[b, j, i]
                        for p in range(positions):
                            dst[p] += w * g[p]


# ---------------------------------------------------------------- torch-facing entry points (CPU tensors)

def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy()


def _threads() -> int:
    return max(1, torch.get_num_threads())


_pool = (None, 0, 0)  # (executor, its size, the pid that made it: threads do not survive a fork)


def _split(total: int, run) -> None:
    """run(start, stop) over [0, total), cut into torch.get_num_threads() pieces run in parallel
    (the compiled loops release the GIL). Callers split only along axes whose outputs do not overlap."""
    global _pool
    threads = min(_threads(), total)
    if threads <= 1:
        run(0, total)
        return
    executor, size, pid = _pool
    if executor is None or size != threads or pid != os.getpid():
        executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="topkconv")
        _pool = (executor, threads, os.getpid())
    step = -(-total // threads)
    for future in [executor.submit(run, s, min(total, s + step)) for s in range(0, total, step)]:
        future.result()


def topk_rows(scores: torch.Tensor, k: int, indices: torch.Tensor) -> None:
    """indices[r] = the positions of the k largest entries of scores[r] (rows of a 2-D tensor), any order."""
    scores = _np(scores.contiguous())
    args = (scores, k, n_groups_for(scores.shape[1], k), _np(indices), np.empty(scores.shape[0], scores.dtype))
    _split(scores.shape[0], lambda r0, r1: _select_rows(*args, r0, r1))


def linear_forward(x: torch.Tensor, weight: torch.Tensor, k: int, positive_only: bool):
    """Dynamic-k forward: (out, indices) with out[b, c] the sum of the k largest weight[c, i] * x[b, i]
    and indices[b, c] (int32) their i."""
    out = x.new_empty(x.shape[0], weight.shape[0])
    indices = torch.empty(x.shape[0], weight.shape[0], k, dtype=torch.int32)
    args = (_np(x), _np(weight), k, n_groups_for(x.shape[1], k), positive_only, _np(out), _np(indices))
    _split(weight.shape[0], lambda c0, c1: _linear_forward(*args, c0, c1))
    return out, indices


def _split_gradients(batch: int, rows: int, need_x: bool, need_w: bool, run) -> None:
    """run(need_x, need_w, b0, b1, c0, c1) over every (sample, output row) pair. On one thread a single
    call; on several, the input gradient split by sample and the weight gradient by output row, in two
    passes, so that no two threads add into the same entry."""
    if _threads() == 1:
        run(need_x, need_w, 0, batch, 0, rows)
        return
    if need_x:
        _split(batch, lambda b0, b1: run(True, False, b0, b1, 0, rows))
    if need_w:
        _split(rows, lambda c0, c1: run(False, True, 0, batch, c0, c1))


def linear_backward(x, weight, indices, grad_out, positive_only: bool, need_x: bool, need_w: bool):
    """(grad_x, grad_w) of :func:`linear_forward` from its saved indices (None where not needed)."""
    grad_x = torch.zeros_like(x) if need_x else x.new_empty(0, 0)
    grad_w = torch.zeros_like(weight) if need_w else weight.new_empty(0, 0)
    arrays = (_np(x), _np(weight), _np(indices), _np(grad_out.contiguous()), positive_only)
    outputs = (_np(grad_x), _np(grad_w))
    _split_gradients(indices.shape[0], indices.shape[1], need_x, need_w,
                     lambda nx, nw, *ranges: _linear_backward(*arrays, nx, nw, *outputs, *ranges))
    return (grad_x if need_x else None), (grad_w if need_w else None)


def conv_output(cols: torch.Tensor, weight_tm: torch.Tensor, indices: torch.Tensor, out: torch.Tensor) -> None:
    """out (n, out, L) = the routed convolution of tap-major columns (n, taps, in, L) with weight_tm
    (out, taps, in) over the selected (n, out, k) input channels."""
    args = (_np(cols), _np(weight_tm), _np(indices), _np(out))
    _split(cols.shape[0], lambda b0, b1: _conv_output(*args, b0, b1))


def conv_backward(cols, weight_tm, indices, grad_out, grad_cols, grad_w) -> None:
    """Adds the gradients of :func:`conv_output` into grad_cols (n, taps, in, L) and grad_w (out, taps,
    in); either may be None (then ``cols`` may be None when grad_w is)."""
    need_x, need_w = grad_cols is not None, grad_w is not None
    empty = weight_tm.new_empty(0, 0, 0, 0)
    arrays = (_np(cols if need_w else empty), _np(weight_tm), _np(indices), _np(grad_out.contiguous()))
    outputs = (_np(grad_cols if need_x else empty), _np(grad_w if need_w else weight_tm.new_empty(0, 0, 0)))
    _split_gradients(indices.shape[0], indices.shape[1], need_x, need_w,
                     lambda nx, nw, *ranges: _conv_backward(*arrays, nx, nw, *outputs, *ranges))
