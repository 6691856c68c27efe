"""Compiled CPU loops (numba) for the routing work that no single torch op does well: the numba backend.

The masked-weight matmuls of the torch-level TopKConv kernel do a dense convolution's FLOPs, although
each (sample, output channel) uses only k of the input channels. Here the output and both gradients
walk the saved (sample, output channel, k) indices and touch only the selected channels: ``k / in``
of the dense FLOPs, as contiguous multiply-adds along the output positions. For small inputs or a
large k the dense-order loops (``_conv_forward_whole``, ``_conv_input_gradient_whole``,
``_conv_weight_gradient_whole``) serve instead, reading the zero-padded input: every map with the output
channels innermost, which vectorises where the few output positions of a small map would not. The Dynamic-k
forward forms one row of products at a time and selects in place (:mod:`.selection`); for small k, guided by
the previous rows' k-th values (``_linear_forward_guided``: the products at or above the bound are packed 16
at a time by :mod:`.simd`, and a bisection of their values finds the k largest).

Every function writes into arrays the caller allocated; none allocates per row. The entry points at
the bottom take CPU tensors, view them as numpy arrays and split the loops over threads
(:mod:`.bridge`).
"""

from __future__ import annotations

import numpy as np
import torch

from .bridge import as_array, run_pieces, split, split_gradients
from .jit import inline, jit, jit_pieces, prange
from .selection import (bounded_wins, first_k_largest_above, first_k_largest_down, guided_wins, key_dtype,
                        n_groups_for, ordered_keys, row_bits_words, select_row, selection_workspace)
from .simd import (LANES, MAX_NETWORK_K, borrowed, positions_at_least, routed_block_3x3, taps_block_3x3,
                   top_k_sums_block, weight_taps_block_3x3)


@jit
def _linear_forward(x, weight, k, n_groups, positive_only, out, indices, c0, c1):
    """Output rows c0 <= c < c1 of the Dynamic-k forward, for the whole batch."""
    products = np.empty(x.shape[1], x.dtype)
    workspace = selection_workspace(products, n_groups)
    for c in range(c0, c1):  # weight row outermost: it stays in cache for the whole batch
        for b in range(x.shape[0]):
            np.multiply(weight[c], x[b], products)
            if positive_only:
                np.maximum(products, 0, products)
            out[b, c] = select_row(products, k, n_groups, workspace, indices[b, c])


# How many recent rows' k-th values guide the next row's bound (see _linear_forward_guided): the lowest
# of R exchangeable values lies below a new one with probability R / (R + 1).
_RECENT_ROWS = 8


@inline
def _products_above(w_row, x, b, positive_only, high, low, lower, products):
    """products = w_row * x_row (non-positive ones 0 under ``positive_only``); returns how many are at
    least ``high``, ``low`` and ``lower`` (three candidate bounds, tightest first), and their sum (NaN if
    any is NaN). One vectorised pass: the bounds must have the products' float type, and the counts are kept
    in it too (exact below 2**24 products), since integer counts would halve the vector's lanes."""
    zero = products.dtype.type(0)  # a plain 0 would widen p, the bounds and the sum to float64
    one = products.dtype.type(1)
    above_high = zero
    above_low = zero
    above_lower = zero
    total = zero
    for i in range(products.shape[0]):
        p = w_row[i] * x[b, i]
        if positive_only and p < zero:
            p = zero
        products[i] = p
        above_high += one if p >= high else zero
        above_low += one if p >= low else zero
        above_lower += one if p >= lower else zero
        total += p
    return int(above_high), int(above_low), int(above_lower), total


@inline
def _tightest_bound(counts, bounds, k, total, no_bound):
    """The first of ``bounds`` (tightest first) that at least k products reach, else ``no_bound``; also
    ``no_bound`` when the row's sum is not finite (a NaN or an infinity among the products)."""
    if not np.isfinite(total):
        return no_bound
    for counted, bound in zip(counts, bounds):
        if counted >= k:
            return bound
    return no_bound


@inline
def _recent_bounds(recent, seen, no_bound):
    """(low, lower) from the k-th values of the last ``seen`` rows: their lowest, and that less their spread."""
    if seen == 0:
        return no_bound, no_bound
    low = recent[0]
    high = recent[0]
    for j in range(1, seen):  # not recent[:seen].min(): numpy's reductions cost more than the products' pass
        low = min(low, recent[j])
        high = max(high, recent[j])
    return low, low - (high - low)


@inline
def _positions_at_least(products, bound, positions):
    """positions[:m] = the positions of the products >= bound, in order (all of them for -inf); returns m."""
    if bound == -np.inf:  # NaNs included
        for i in range(products.shape[0]):
            positions[i] = i
        return products.shape[0]
    return positions_at_least(products, bound, positions)


def _guided_scratch(x: torch.Tensor, k: int) -> tuple:
    """The scratch rows of :func:`_linear_forward_guided`, allocated by its caller (who keeps them alive):
    products, candidate positions, candidate values, their keys, the recent rows' k-th values, one row's chosen
    positions."""
    n, dtype = x.shape[1], as_array(x).dtype
    return (np.empty(n, dtype), np.empty(n, np.int32), np.empty(n, dtype), np.empty(n, key_dtype(x)),
            np.empty(_RECENT_ROWS, dtype), np.empty(k, np.int32))


@jit
def _linear_forward_guided(x, weight, k, positive_only, scratch, out, indices, c0, c1):
    """:func:`_linear_forward` for small k and rows: the same weight row meets every sample in turn, and
    the k-th values of the last rows bound the next row's from below, so only the few products above
    that bound reach the selection (:func:`.selection.first_k_largest_above`; ties at the k-th value keep
    the first inputs). A row whose bound keeps fewer than k products starts from all of them.

    Every array is used through a borrowed view (:func:`.simd.borrowed`; the caller holds the arrays, the
    scratch included, :func:`_guided_scratch`): numba reference-counts the arrays its inlined helpers take,
    with atomic operations, which took 13-18% of this loop's samples under perf."""
    products, positions, scratch_values = borrowed(scratch[0]), borrowed(scratch[1]), borrowed(scratch[2])
    scratch_keys, recent, chosen = borrowed(scratch[3]), borrowed(scratch[4]), borrowed(scratch[5])
    x, weight, out, indices = borrowed(x), borrowed(weight), borrowed(out), borrowed(indices)
    no_bound = x.dtype.type(-np.inf)  # typed: a float64 bound would turn the vectorised pass scalar
    for c in range(c0, c1):
        high = no_bound  # the previous row's k-th value
        w_row = weight[c]
        for b in range(x.shape[0]):
            low, lower = _recent_bounds(recent, min(b, _RECENT_ROWS), no_bound)
            counts = _products_above(w_row, x, b, positive_only, high, low, lower, products)
            bound = _tightest_bound(counts[:3], (high, low, lower), k, counts[3], no_bound)
            m = _positions_at_least(products, bound, positions)
            out[b, c], kth = first_k_largest_above(products, positions, m, k, bound, scratch_values, scratch_keys,
                                                   chosen)
            for t in range(k):
                indices[b, c, t] = chosen[t]
            high = kth if np.isfinite(kth) else no_bound
            recent[b % _RECENT_ROWS] = high


@inline
def _indices_at_kth(w_row, x_row, positive_only, kth, k, products, positions, scratch_values, scratch_keys, chosen):
    """chosen = the positions of the k largest products w_row * x_row given the k-th of them, in input order: the
    products at or above it, or, when more tie at it, :func:`.selection.first_k_largest_above`'s choice among them
    (ties to the first inputs, -0.0 below 0.0), what the search loops pick. products, positions, scratch_values,
    scratch_keys: scratch as long as the row."""
    zero = products.dtype.type(0)
    for i in range(products.shape[0]):  # the same products, to the bit, as the sorted registers formed
        p = w_row[i] * x_row[i]
        if positive_only and p < zero:
            p = zero
        products[i] = p
    m = positions_at_least(products, kth, positions)
    if m == k:
        for t in range(k):
            chosen[t] = positions[t]
    else:
        first_k_largest_above(products, positions, m, k, kth, scratch_values, scratch_keys, chosen)


@jit
def _linear_forward_lanes(x, xt, weight, k, positive_only, with_indices, keys_dtype, out_t, totals_t, kth_t, indices,
                          c0, c1):
    """Output rows c0 <= c < c1 of the Dynamic-k forward for k <= :data:`.simd.MAX_NETWORK_K`, transposed (out_t[c,
    b]), 16 samples at a time (:func:`.simd.top_k_sums_block`), with the sum of every product of each row in
    totals_t and its k-th largest in kth_t; ``with_indices``: the k chosen inputs of each (sample, row) whose sum
    is finite, from its k-th value (:func:`_indices_at_kth`). x (batch, in) and xt, its transpose, both C."""
    x, xt, weight, indices = borrowed(x), borrowed(xt), borrowed(weight), borrowed(indices)
    out_t, totals_t, kth_t = borrowed(out_t), borrowed(totals_t), borrowed(kth_t)
    products, positions = np.empty(x.shape[1], x.dtype), np.empty(x.shape[1], np.int32)
    scratch_values, scratch_keys = np.empty(x.shape[1], x.dtype), np.empty(x.shape[1], keys_dtype)
    for c in range(c0, c1):
        w_row = weight[c]
        for start in range(0, xt.shape[1], LANES):
            top_k_sums_block(xt, w_row, start, k, positive_only, out_t[c], totals_t[c], kth_t[c])
        if with_indices:
            for b in range(x.shape[0]):
                if np.isfinite(totals_t[c, b]):
                    _indices_at_kth(w_row, x[b], positive_only, kth_t[c, b], k, products, positions, scratch_values,
                                    scratch_keys, indices[b, c])


# Weight rows that take each sample in turn in :func:`_linear_forward_bounded`: their rows and one sample's
# stay in the L2 cache, so a sample row comes from memory once per block instead of once per weight row.
_ROW_BLOCK = 4


@jit
def _linear_forward_bounded(x, weight, k, n_groups, positive_only, keys_dtype, out, indices, c0, c1):
    """:func:`_linear_forward` for wide rows (the paper's 25088 -> 512, k = 250). As in
    :func:`_linear_forward_guided`, the k-th values of the last rows of the same weight row bound the next
    row's from below: their lowest, or if fewer than k products reach it, that less their spread (both
    counted in the products' own pass). The products at or above the bound are packed 16 at a time
    (:func:`.simd.positions_at_least`: about 300 of 25,088) and a bisection of their values picks the k
    largest (:func:`.selection.first_k_largest_above`). A row with no bound that keeps k products (the first
    of each weight row, a NaN) takes :func:`.selection.select_row`. Ties at the k-th value go to the first
    positions (select_row's to whichever its quickselect leaves)."""
    n = x.shape[1]
    products = np.empty(n, x.dtype)
    scratch_keys = np.empty(n, keys_dtype)
    recent = np.empty((_ROW_BLOCK, _RECENT_ROWS), x.dtype)
    workspace = selection_workspace(products, n_groups)
    # select_row's scratch serves a bounded row too (a row takes one path or the other): its candidate values
    # and positions
    scratch_values, positions = workspace[2], workspace[3]
    no_bound = x.dtype.type(-np.inf)  # typed: a float64 bound would turn the vectorised pass scalar
    for block in range(c0, c1, _ROW_BLOCK):
        for b in range(x.shape[0]):  # a sample meets a few weight rows in turn: x[b] is read from cache again
            for c in range(block, min(c1, block + _ROW_BLOCK)):
                low, lower = _recent_bounds(recent[c - block], min(b, _RECENT_ROWS), no_bound)
                counts = _products_above(weight[c], x, b, positive_only, low, low, lower, products)
                bound = _tightest_bound(counts[1:3], (low, lower), k, counts[3], no_bound)
                chosen = indices[b, c]
                if bound > no_bound:
                    m = positions_at_least(products, bound, positions)
                    out[b, c], kth = first_k_largest_above(products, positions, m, k, bound, scratch_values,
                                                           scratch_keys, chosen)
                else:
                    out[b, c] = select_row(products, k, n_groups, workspace, chosen)
                    kth = products[chosen[0]]
                    for t in range(1, k):
                        kth = min(kth, products[chosen[t]])
                recent[c - block, b % _RECENT_ROWS] = kth if np.isfinite(kth) else no_bound


@jit
def _linear_backward(x, weight, indices, grad_out, positive_only, need_x, need_w, grad_x, grad_w, b0, b1, c0, c1):
    """Gradients of :func:`_linear_forward` from the saved indices, over samples b0:b1 and output
    rows c0:c1; adds into grad_x and grad_w. Weight row outermost: its row and its gradient's stay in cache
    while every sample adds into them (sample outermost, the paper's layer fetched a line of the 51 MB weight
    and its gradient from memory for nearly every selected pair: 218 against 112 ms on one thread). Each entry sums
    its terms in the same order (grad_x over c, grad_w over b, both increasing), so the bits are the same."""
    k = indices.shape[2]
    for c in range(c0, c1):
        for b in range(b0, b1):
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


@jit
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


@jit
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


# The whole-batch TopKConv loops below keep the output channels innermost, in (in, taps, out)
# weights and (L, out) maps: loops of `out` contiguous multiply-adds vectorise, where loops over the
# few output positions of a small map (16 at 4 x 4) would run scalar. They read the zero-padded input
# itself, one (sample, channel) plane at a time, and write the input gradient onto a padded plane:
# F.unfold's and F.fold's whole-batch columns cost more than a third of a dense convolution apiece
# at 4 x 4 (0.37 ms each at 64 x 32 x 4 x 4, one thread). ``geometry`` is (kh, kw, sh, sw, dh, dw, oh, ow).

@inline
def _plane_columns(plane, geometry, cols_i):
    """cols_i (taps, L) = what each tap sees at each output position of one zero-padded input plane: that
    sample's and channel's ``F.unfold`` columns, tap-major."""
    kh, kw, sh, sw, dh, dw, oh, ow = geometry
    if kh == 3 and kw == 3:  # nine loads and stores per position, no loops over taps (measured: the weight
        # gradient at 64 x 32 x 4 x 4 took 0.94 ms instead of 1.30 ms)
        for oy in range(oh):
            r0, r1, r2 = plane[oy * sh], plane[oy * sh + dh], plane[oy * sh + 2 * dh]
            for ox in range(ow):
                x0, p = ox * sw, oy * ow + ox
                cols_i[0, p], cols_i[1, p], cols_i[2, p] = r0[x0], r0[x0 + dw], r0[x0 + 2 * dw]
                cols_i[3, p], cols_i[4, p], cols_i[5, p] = r1[x0], r1[x0 + dw], r1[x0 + 2 * dw]
                cols_i[6, p], cols_i[7, p], cols_i[8, p] = r2[x0], r2[x0 + dw], r2[x0 + 2 * dw]
        return
    for u in range(kh):
        for v in range(kw):
            dst = cols_i[u * kw + v]
            for oy in range(oh):
                src = plane[oy * sh + u * dh]
                for ox in range(ow):
                    dst[oy * ow + ox] = src[ox * sw + v * dw]


@inline
def _fold_plane(grad_cols_i, geometry, grad_plane):
    """grad_plane (zero-padded) += every column gradient of grad_cols_i (taps, L) at the input position it
    came from (the adjoint of :func:`_plane_columns`), tap by tap then position by position: ``F.fold``'s
    order of additions, so the sums are its bits."""
    kh, kw, sh, sw, dh, dw, oh, ow = geometry
    for u in range(kh):
        for v in range(kw):
            src = grad_cols_i[u * kw + v]
            for oy in range(oh):
                dst = grad_plane[oy * sh + u * dh]
                for ox in range(ow):
                    dst[ox * sw + v * dw] += src[oy * ow + ox]


@inline
def _taps_3x3(w_i, c, v0, v1, v2, v3, v4, v5, v6, v7, v8):
    """sum_j w_i[j, c] * v_j: one output channel's map entry from the nine values a 3 x 3 kernel sees."""
    return (w_i[0, c] * v0 + w_i[1, c] * v1 + w_i[2, c] * v2 + w_i[3, c] * v3 + w_i[4, c] * v4
            + w_i[5, c] * v5 + w_i[6, c] * v6 + w_i[7, c] * v7 + w_i[8, c] * v8)


@inline
def _plane_maps_3x3_fours(plane, oh, ow, w_i, block, scores_i):
    """:func:`_plane_maps_3x3` at stride and dilation 1, ow a multiple of 4: four neighbouring positions of a row
    at once. Their 4 x 9 taps read 3 x 6 values of the plane, and each output channel's nine weights, loaded
    once, serve all four: about one load per four multiply-adds where one position at a time needed one per
    multiply-add. Measured (``bench_stages.py --batch 64``, shared machine, two readings each, interleaved): the
    quick model's last layer (64 -> 64 at 4 x 4) maps, maxima and keys 1.31-1.42 -> 1.27-1.29 ms, the module
    2.78-3.01 -> 2.60-2.67 ms; at width 1.0 (``--setting wide``, 256 -> 256) no change (about 24 ms: one sample's
    maps, 4 MB, outgrow the L2 cache, and their stores set the pace). Each entry's sum is written in the same
    order as :func:`_taps_3x3`'s, so the maps are the same to the bit. ``scores_i`` must hold -inf on entry."""
    for oy in range(oh):
        r0, r1, r2 = plane[oy], plane[oy + 1], plane[oy + 2]
        for x0 in range(0, ow, 4):
            a0, a1, a2, a3, a4, a5 = r0[x0], r0[x0 + 1], r0[x0 + 2], r0[x0 + 3], r0[x0 + 4], r0[x0 + 5]
            b0, b1, b2, b3, b4, b5 = r1[x0], r1[x0 + 1], r1[x0 + 2], r1[x0 + 3], r1[x0 + 4], r1[x0 + 5]
            c0, c1, c2, c3, c4, c5 = r2[x0], r2[x0 + 1], r2[x0 + 2], r2[x0 + 3], r2[x0 + 4], r2[x0 + 5]
            p = oy * ow + x0
            row0, row1, row2, row3 = block[p], block[p + 1], block[p + 2], block[p + 3]
            for c in range(row0.shape[0]):
                w0, w1, w2, w3, w4 = w_i[0, c], w_i[1, c], w_i[2, c], w_i[3, c], w_i[4, c]
                w5, w6, w7, w8 = w_i[5, c], w_i[6, c], w_i[7, c], w_i[8, c]
                v0 = w0 * a0 + w1 * a1 + w2 * a2 + w3 * b0 + w4 * b1 + w5 * b2 + w6 * c0 + w7 * c1 + w8 * c2
                v1 = w0 * a1 + w1 * a2 + w2 * a3 + w3 * b1 + w4 * b2 + w5 * b3 + w6 * c1 + w7 * c2 + w8 * c3
                v2 = w0 * a2 + w1 * a3 + w2 * a4 + w3 * b2 + w4 * b3 + w5 * b4 + w6 * c2 + w7 * c3 + w8 * c4
                v3 = w0 * a3 + w1 * a4 + w2 * a5 + w3 * b3 + w4 * b4 + w5 * b5 + w6 * c3 + w7 * c4 + w8 * c5
                row0[c] = v0
                row1[c] = v1
                row2[c] = v2
                row3[c] = v3
                best = scores_i[c]
                best = v0 if v0 > best else best  # the order of the one-position loop's running max
                best = v1 if v1 > best else best
                best = v2 if v2 > best else best
                best = v3 if v3 > best else best
                scores_i[c] = best


@inline
def _plane_maps_3x3(plane, geometry, w_i, block, scores_i):
    """block (L, out) = the maps of one input channel of a 3 x 3 kernel: block[p, c] = sum_j w_i[j, c] *
    (tap j at position p), read from the zero-padded plane, w_i (9, out); and scores_i (out) = each map's
    spatial max, exact for maps without NaN. The nine taps are summed in registers and each entry written
    once (a tap at a time reads and writes the block nine times: about 1.5x the time); the running max's
    compare-and-store hides behind the multiply-adds (a pass of its own waited on each masked store: about
    0.28 ms of a 1.5 ms forward at 64 x 32 x 4 x 4), so callers that need only the maps pass a spare row."""
    _, _, sh, sw, dh, dw, oh, ow = geometry
    scores_i[:] = -np.inf
    if sh == 1 and sw == 1 and dh == 1 and dw == 1 and ow % 4 == 0:
        _plane_maps_3x3_fours(plane, oh, ow, w_i, block, scores_i)
    else:
        _plane_maps_3x3_ones(plane, geometry, w_i, block, scores_i)


@inline
def _plane_maps_3x3_ones(plane, geometry, w_i, block, scores_i):
    """:func:`_plane_maps_3x3` one position at a time: any stride, dilation and width. ``scores_i`` must hold
    -inf on entry."""
    _, _, sh, sw, dh, dw, oh, ow = geometry
    for oy in range(oh):
        r0, r1, r2 = plane[oy * sh], plane[oy * sh + dh], plane[oy * sh + 2 * dh]
        for ox in range(ow):
            x0 = ox * sw
            v0, v1, v2 = r0[x0], r0[x0 + dw], r0[x0 + 2 * dw]
            v3, v4, v5 = r1[x0], r1[x0 + dw], r1[x0 + 2 * dw]
            v6, v7, v8 = r2[x0], r2[x0 + dw], r2[x0 + 2 * dw]
            row = block[oy * ow + ox]
            for c in range(row.shape[0]):
                value = _taps_3x3(w_i, c, v0, v1, v2, v3, v4, v5, v6, v7, v8)
                row[c] = value
                best = scores_i[c]
                scores_i[c] = value if value > best else best


@inline
def _channel_maps_any(cols_i, w_i, block):
    """:func:`_plane_maps_3x3` for any kernel, from the plane's columns (taps, L), a tap at a time."""
    block[:] = 0
    for j in range(cols_i.shape[0]):
        w_row = w_i[j]
        for p in range(cols_i.shape[1]):
            v = cols_i[j, p]
            row = block[p]
            for c in range(row.shape[0]):  # 1-D rows: the loop LLVM vectorises
                row[c] += w_row[c] * v


@inline
def _channel_maps(plane, geometry, cols_i, w_i, block, spare_row):
    """block (L, out) = the maps of one input channel from its zero-padded plane: block[p, c] = sum_j
    w_i[j, c] * (tap j at position p); cols_i (taps, L) and spare_row (out) are scratch."""
    if geometry[0] == 3 and geometry[1] == 3:
        _plane_maps_3x3(plane, geometry, w_i, block, spare_row)
    else:
        _plane_columns(plane, geometry, cols_i)
        _channel_maps_any(cols_i, w_i, block)


@inline
def _sample_keys(planes_b, geometry, weight_t, max_criterion, maps_finite, maps, scores, keys, cols):
    """keys (in, out): the ordered keys (:func:`.selection.ordered_keys`) of one sample's channel scores,
    scores (in, out) the floats, from its zero-padded planes (in, Hp, Wp). ``max``: the spatial max of every
    map A[c, i] (maps (in, L, out) kept for the output): for a 3 x 3 kernel whose maps hold no NaN
    (``maps_finite``) in the pass that computes them, else by ``np.maximum``, which propagates NaN as
    ``torch.amax`` does. ``sum``: the spatial sum, from the window sums times the taps, and cols (in, taps,
    L) the sample's patch columns."""
    in_ch, taps, out_ch = weight_t.shape
    positions = maps.shape[1]
    for i in range(in_ch):  # explicit loops: a numba array expression would allocate its result
        row = scores[i]
        if max_criterion and maps_finite:  # a 3 x 3 kernel (see conv_forward_whole)
            _plane_maps_3x3(planes_b[i], geometry, weight_t[i], maps[i], row)
        elif max_criterion:
            block = maps[i]
            _channel_maps(planes_b[i], geometry, cols[i], weight_t[i], block, row)
            row[:] = block[0]
            for p in range(1, positions):  # NaN propagates as in torch.amax
                np.maximum(row, block[p], row)
        else:
            cols_i = cols[i]
            _plane_columns(planes_b[i], geometry, cols_i)
            row[:] = 0
            for j in range(taps):
                window = np.sum(cols_i[j])
                w_row = weight_t[i, j]
                for c in range(out_ch):
                    row[c] += w_row[c] * window
        ordered_keys(row, out_ch, keys[i])


@jit
def _conv_forward_whole(padded, geometry, weight_t, weight_rows, k, max_criterion, maps_finite, routed, keys_dtype,
                        out, indices, b0, b1):
    """TopKConv forward for samples b0:b1, one sample at a time: scores as ordered keys, the selection of
    every output channel at once (:func:`.selection.first_k_largest_down`: ties to the first channels)
    and the sum of the selected maps (the max criterion reuses the maps its scores came from; the sum
    criterion of a 3 x 3 kernel whose maps are finite computes the selected ones alone, from the patch
    columns, :func:`.simd.routed_block_3x3`, when ``routed``; otherwise every map, masked as the reference
    formula). padded (B, in, Hp, Wp): the zero-padded input; weight_t (in, taps, out), and weight_rows (out,
    in, taps) the same weight as the module holds it (read only when routed); out (B, out, L); indices (B, out,
    k); keys_dtype: the integer type of the floats' width (:func:`.selection.key_dtype`); maps_finite: a 3 x 3
    kernel whose maps cannot hold NaN (:func:`maps_are_finite`). Allocates the scratch
    and hands everything to :func:`_conv_forward_samples`, which holds it all through borrowed views."""
    in_ch, taps, out_ch = weight_t.shape
    positions = geometry[6] * geometry[7]
    dtype = padded.dtype
    scratch = (np.empty((in_ch, positions, out_ch), dtype), np.empty((in_ch, taps, positions), dtype),
               np.empty((in_ch, out_ch), dtype), np.empty((in_ch, out_ch), keys_dtype),
               np.empty((3, out_ch), keys_dtype), np.empty(out_ch, np.int32),
               np.empty((row_bits_words(in_ch), out_ch), np.uint64),
               np.empty((in_ch, out_ch), dtype), np.empty((positions, out_ch), dtype))
    _conv_forward_samples(padded, geometry, weight_t, weight_rows, k, max_criterion, maps_finite, routed, out, indices,
                          scratch, b0, b1)


@jit
def _conv_forward_samples(padded, geometry, weight_t, weight_rows, k, max_criterion, maps_finite, routed, out, indices,
                          scratch, b0, b1):
    """The loop of :func:`_conv_forward_whole`, every array through a borrowed view (:func:`.simd.borrowed`:
    the caller holds them): numba would reference-count the views taken per sample and channel (atomic
    operations)."""
    maps, cols, scores, keys = borrowed(scratch[0]), borrowed(scratch[1]), borrowed(scratch[2]), borrowed(scratch[3])
    column_scratch, counts, row_bits = borrowed(scratch[4]), borrowed(scratch[5]), borrowed(scratch[6])
    mask, acc = borrowed(scratch[7]), borrowed(scratch[8])
    padded, weight_t, out, indices = borrowed(padded), borrowed(weight_t), borrowed(out), borrowed(indices)
    weight_rows = borrowed(weight_rows)
    in_ch, positions, out_ch = maps.shape
    zero = padded.dtype.type(0)  # a plain 0 would make the select below float64: a scalar loop, 10x slower
    for b in range(b0, b1):
        _sample_keys(padded[b], geometry, weight_t, max_criterion, maps_finite, maps, scores, keys, cols)
        first_k_largest_down(keys, k, indices[b], mask, column_scratch[0], column_scratch[1], column_scratch[2],
                             counts, row_bits)
        if routed:  # the selected maps alone, from the columns the scores came from
            for c in range(out_ch):
                for start in range(0, positions, LANES):
                    routed_block_3x3(cols, weight_rows[c], indices[b, c], start, out[b, c])
            continue
        acc[:] = 0
        for i in range(in_ch):
            keep = mask[i]
            if not max_criterion:
                _channel_maps(padded[b, i], geometry, cols[i], weight_t[i], maps[i], scores[i])
            for p in range(positions):
                acc_row = acc[p]
                map_row = maps[i, p]
                if max_criterion:  # a select, not a product: an unselected NaN map stays out
                    for c in range(out_ch):
                        acc_row[c] += map_row[c] if keep[c] != 0 else zero
                else:  # the mask as a factor, as the reference formula applies it
                    for c in range(out_ch):
                        acc_row[c] += map_row[c] * keep[c]
        out[b] = acc.T


@inline
def _input_gradient_columns(w_masked, g_t, grad_cols_i):
    """grad_cols_i (taps, L) = w_masked (taps, out) times g_t (L, out) transposed: one dot over the output
    channels per (tap, position)."""
    zero = w_masked.dtype.type(0)  # a float64 literal would widen the float32 sums
    for p in range(g_t.shape[0]):
        g_row = g_t[p]
        for j in range(w_masked.shape[0]):
            dot = zero
            for c in range(g_row.shape[0]):
                dot += w_masked[j, c] * g_row[c]
            grad_cols_i[j, p] = dot


@inline
def _weight_gradient_rows(g_kept, cols_i, grad_wt_i):
    """grad_wt_i (taps, out) += cols_i (taps, L) times g_kept (L, out): four positions per pass over a
    tap's row (a position per pass reads and writes the row four times as often). (Read from the padded
    plane instead of its columns, with four positions of an output row per pass, it ran 1.1x slower at 4 x 4.)"""
    positions = g_kept.shape[0]
    whole = positions - positions % 4
    for j in range(cols_i.shape[0]):
        gw_row = grad_wt_i[j]
        for p in range(0, whole, 4):
            v0, v1, v2, v3 = cols_i[j, p], cols_i[j, p + 1], cols_i[j, p + 2], cols_i[j, p + 3]
            g0, g1, g2, g3 = g_kept[p], g_kept[p + 1], g_kept[p + 2], g_kept[p + 3]
            for c in range(gw_row.shape[0]):
                gw_row[c] += g0[c] * v0 + g1[c] * v1 + g2[c] * v2 + g3[c] * v3
        for p in range(whole, positions):
            v = cols_i[j, p]
            g_row = g_kept[p]
            for c in range(gw_row.shape[0]):
                gw_row[c] += g_row[c] * v


@inline
def _sample_mask(indices_b, mask):
    """mask (in, out) = 1 where input channel i is selected for output channel c, else 0."""
    mask[:] = 0
    for c in range(indices_b.shape[0]):
        for t in range(indices_b.shape[1]):
            mask[indices_b[c, t], c] = 1


@inline
def _chosen_by(indices_b, i0, i1, counts, chosen):
    """chosen[i - i0, :counts[i - i0]] = the output channels that selected input channel i, ascending, for
    i0 <= i < i1."""
    counts[:] = 0
    for c in range(indices_b.shape[0]):
        for t in range(indices_b.shape[1]):
            i = indices_b[c, t] - i0
            if 0 <= i < i1 - i0:
                chosen[i, counts[i]] = c
                counts[i] += 1


@jit
def _conv_input_gradient_whole(weight_t, indices, grad_out, geometry, grad_padded, i0, i1):
    """Adds into grad_padded (B, in, Hp, Wp), zero-padded, the input gradient of :func:`_conv_forward_whole`
    for input channels i0:i1: only the selected (input, output) channel pairs pass gradient. A 3 x 3 kernel
    sums, per (sample, input channel), the output gradient rows of the channels that selected it
    (:func:`.simd.taps_block_3x3`); other kernels apply the mask to the weight once per input channel. (The
    two gradients are separate loops: compiled together, each ran up to 1.6x slower.)"""
    in_ch, taps, out_ch = weight_t.shape
    scratch = (np.empty((in_ch, out_ch), weight_t.dtype), np.empty((grad_out.shape[2], out_ch), weight_t.dtype),
               np.empty((taps, out_ch), weight_t.dtype), np.empty((taps, grad_out.shape[2]), weight_t.dtype),
               np.empty(in_ch, np.int32), np.empty((in_ch, out_ch), np.int32))
    _conv_input_gradient_samples(weight_t, indices, grad_out, geometry, grad_padded, scratch, i0, i1)


@jit
def _conv_input_gradient_samples(weight_t, indices, grad_out, geometry, grad_padded, scratch, i0, i1):
    """The loop of :func:`_conv_input_gradient_whole`, every array through a borrowed view."""
    mask, g_t, w_masked, grad_cols_i = borrowed(scratch[0]), borrowed(scratch[1]), borrowed(scratch[2]), \
        borrowed(scratch[3])
    counts, chosen = borrowed(scratch[4]), borrowed(scratch[5])
    weight_t, indices, grad_out, grad_padded = borrowed(weight_t), borrowed(indices), borrowed(grad_out), \
        borrowed(grad_padded)
    in_ch, taps, out_ch = weight_t.shape
    positions = grad_out.shape[2]
    by_taps = geometry[0] == 3 and geometry[1] == 3
    for b in range(grad_out.shape[0]):
        if by_taps:  # only this thread's channels: on several threads each would otherwise index them all
            _chosen_by(indices[b], i0, i1, counts, chosen)
        else:
            _sample_mask(indices[b], mask)
            g_t[:] = grad_out[b].T
        for i in range(i0, i1):
            if by_taps:
                for start in range(0, positions, LANES):
                    taps_block_3x3(weight_t[i], grad_out[b], chosen[i - i0], counts[i - i0], start, grad_cols_i)
            else:
                keep = mask[i]
                for j in range(taps):
                    for c in range(out_ch):
                        w_masked[j, c] = weight_t[i, j, c] * keep[c]
                _input_gradient_columns(w_masked, g_t, grad_cols_i)
            _fold_plane(grad_cols_i, geometry, grad_padded[b, i])


@inline
def _aligned_empty(shape, dtype):
    """np.empty(shape, dtype) starting on a 64-byte boundary: 16-lane loads and stores that never straddle
    two cache lines (about 1.15x faster in :func:`_conv_weight_gradient_by_taps`)."""
    size = 1
    for n in shape:
        size *= n
    raw = np.empty(size + 64, dtype)
    skip = (64 - raw.ctypes.data % 64) % 64 // raw.itemsize
    return raw[skip:skip + size].reshape(shape)


@jit
def _conv_weight_gradient_whole(padded, geometry, indices, grad_out, grad_wt, i0, i1):
    """Adds into grad_wt (in, taps, out) the weight gradient of :func:`_conv_forward_whole` for input
    channels i0:i1 (threads own disjoint entries; every entry sums over the samples in order, whatever
    the thread count). A 3 x 3 kernel: :func:`_conv_weight_gradient_by_taps`; other kernels apply the mask
    to the output gradient once per (sample, input channel)."""
    in_ch, taps, out_ch = grad_wt.shape
    batch, positions = grad_out.shape[0], grad_out.shape[2]
    if geometry[0] == 3 and geometry[1] == 3:
        scratch = (np.empty((batch, i1 - i0), np.int32), np.empty((batch, i1 - i0, out_ch), np.int32),
                   np.empty((batch, taps, positions), grad_wt.dtype),
                   _aligned_empty((out_ch, taps, LANES), grad_wt.dtype))
        _conv_weight_gradient_by_taps(padded, geometry, indices, grad_out, grad_wt, scratch, i0, i1)
        return
    mask = np.empty((in_ch, out_ch), grad_wt.dtype)
    g_t = np.empty((positions, out_ch), grad_wt.dtype)
    g_kept = np.empty((positions, out_ch), grad_wt.dtype)
    cols_i = np.empty((taps, positions), grad_wt.dtype)
    for b in range(batch):
        _sample_mask(indices[b], mask)
        g_t[:] = grad_out[b].T  # one transposing copy; read in place, the mask loop below would not vectorise
        for i in range(i0, i1):
            keep = mask[i]
            for p in range(positions):
                g_row = g_t[p]
                for c in range(out_ch):
                    g_kept[p, c] = keep[c] * g_row[c]
            _plane_columns(padded[b, i], geometry, cols_i)
            _weight_gradient_rows(g_kept, cols_i, grad_wt[i])


@jit
def _conv_weight_gradient_by_taps(padded, geometry, indices, grad_out, grad_wt, scratch, i0, i1):
    """:func:`_conv_weight_gradient_whole` for a 3 x 3 kernel, an input channel at a time: the samples' patch
    columns, then for each 16 output positions the products with the gradient rows of the output channels
    that selected the channel, kept lane by lane in sums (out, 9, 16) over the samples
    (:func:`.simd.weight_taps_block_3x3`) and their lanes summed once. Every array through a borrowed view."""
    counts, chosen, cols, sums = borrowed(scratch[0]), borrowed(scratch[1]), borrowed(scratch[2]), borrowed(scratch[3])
    padded, indices, grad_out, grad_wt = borrowed(padded), borrowed(indices), borrowed(grad_out), borrowed(grad_wt)
    _, taps, out_ch = grad_wt.shape
    batch, positions = grad_out.shape[0], grad_out.shape[2]
    for b in range(batch):
        _chosen_by(indices[b], i0, i1, counts[b], chosen[b])
    for i in range(i0, i1):
        for b in range(batch):
            _plane_columns(padded[b, i], geometry, cols[b])
        grad_wt_i = grad_wt[i]
        for start in range(0, positions, LANES):
            sums[:] = 0
            for b in range(batch):
                weight_taps_block_3x3(cols[b], grad_out[b], chosen[b, i - i0], counts[b, i - i0], start, sums)
            for c in range(out_ch):
                for j in range(taps):
                    grad_wt_i[j, c] += np.sum(sums[c, j])


@jit_pieces
def _conv_forward_pieces(padded, geometry, weight_t, weight_rows, k, max_criterion, maps_finite, routed, keys_dtype,
                         out, indices, pieces):
    """:func:`_conv_forward_whole` over the samples in ``pieces`` parts on numba's threads
    (:func:`.bridge.run_pieces`)."""
    total = padded.shape[0]
    step = -(-total // pieces)
    for p in prange(pieces):
        _conv_forward_whole(padded, geometry, weight_t, weight_rows, k, max_criterion, maps_finite, routed,
                            keys_dtype, out, indices, p * step, min(total, (p + 1) * step))


@jit_pieces
def _conv_input_gradient_pieces(weight_t, indices, grad_out, geometry, grad_padded, pieces):
    """:func:`_conv_input_gradient_whole` over the input channels in ``pieces`` parts on numba's threads."""
    total = weight_t.shape[0]
    step = -(-total // pieces)
    for p in prange(pieces):
        _conv_input_gradient_whole(weight_t, indices, grad_out, geometry, grad_padded, p * step,
                                   min(total, (p + 1) * step))


@jit_pieces
def _conv_weight_gradient_pieces(padded, geometry, indices, grad_out, grad_wt, pieces):
    """:func:`_conv_weight_gradient_whole` over the input channels in ``pieces`` parts on numba's threads."""
    total = grad_wt.shape[0]
    step = -(-total // pieces)
    for p in prange(pieces):
        _conv_weight_gradient_whole(padded, geometry, indices, grad_out, grad_wt, p * step, min(total, (p + 1) * step))


# ---------------------------------------------------------------- torch-facing entry points (CPU tensors)

def _linear_forward_searched(x: torch.Tensor, weight: torch.Tensor, k: int, positive_only: bool):
    """:func:`linear_forward` by the loops that search each row's k largest: any k, NaN and infinities ranked as
    torch.topk ranks them."""
    out = x.new_empty(x.shape[0], weight.shape[0])
    indices = torch.empty(x.shape[0], weight.shape[0], k, dtype=torch.int32)
    x_a, w_a, out_a, idx_a = as_array(x), as_array(weight), as_array(out), as_array(indices)
    if guided_wins(x.shape[1], k):
        def run(c0, c1):
            _linear_forward_guided(x_a, w_a, k, positive_only, _guided_scratch(x, k), out_a, idx_a, c0, c1)
    elif bounded_wins(x.shape[1], k):
        keys, groups = key_dtype(x), n_groups_for(x.shape[1], k)
        run = lambda c0, c1: _linear_forward_bounded(x_a, w_a, k, groups, positive_only, keys, out_a, idx_a,  # noqa: E731
                                                     c0, c1)
    else:
        groups = n_groups_for(x.shape[1], k)
        run = lambda c0, c1: _linear_forward(x_a, w_a, k, groups, positive_only, out_a, idx_a, c0, c1)  # noqa: E731
    split(weight.shape[0], run, x.numel() * weight.shape[0])
    return out, indices


def _linear_forward_sorted(x: torch.Tensor, weight: torch.Tensor, k: int, positive_only: bool, with_indices: bool):
    """:func:`linear_forward` for k <= :data:`.simd.MAX_NETWORK_K` by the sorted registers
    (:func:`_linear_forward_lanes`), the indices only ``with_indices`` (else None); a sample with a NaN or
    infinite product is redone by :func:`_linear_forward_searched`."""
    batch, fan_out = x.shape[0], weight.shape[0]
    out_t = x.new_empty(fan_out, batch)
    totals_t, kth_t = torch.empty_like(out_t), torch.empty_like(out_t)
    indices = torch.empty(batch if with_indices else 0, fan_out, k, dtype=torch.int32)
    arrays = (as_array(x), as_array(x.t().contiguous()), as_array(weight), k, positive_only, with_indices,
              key_dtype(x), as_array(out_t), as_array(totals_t), as_array(kth_t), as_array(indices))
    split(fan_out, lambda c0, c1: _linear_forward_lanes(*arrays, c0, c1), x.numel() * fan_out)
    out = out_t.t().contiguous()
    redo = ~torch.isfinite(totals_t).all(0)
    if redo.any():
        searched = _linear_forward_searched(x[redo].contiguous(), weight, k, positive_only)
        out[redo] = searched[0]
        if with_indices:
            indices[redo] = searched[1]
    return out, (indices if with_indices else None)


def linear_forward(x: torch.Tensor, weight: torch.Tensor, k: int, positive_only: bool):
    """Dynamic-k forward: (out, indices) with out[b, c] the sum of the k largest weight[c, i] * x[b, i] (in input
    order) and indices[b, c] (int32) their i, in input order, ties at the k-th value to the first. For k <=
    :data:`.simd.MAX_NETWORK_K` by the sorted registers, else by the search loops: the same bits either way."""
    if k > MAX_NETWORK_K:
        return _linear_forward_searched(x, weight, k, positive_only)
    return _linear_forward_sorted(x, weight, k, positive_only, with_indices=True)


def linear_values(x: torch.Tensor, weight: torch.Tensor, k: int, positive_only: bool) -> torch.Tensor:
    """The output of :func:`linear_forward` (the same bits) without its indices, for forward passes that save
    nothing."""
    if k > MAX_NETWORK_K:
        return _linear_forward_searched(x, weight, k, positive_only)[0]
    return _linear_forward_sorted(x, weight, k, positive_only, with_indices=False)[0]


def linear_backward(x, weight, indices, grad_out, positive_only: bool, need_x: bool, need_w: bool):
    """(grad_x, grad_w) of :func:`linear_forward` from its saved indices (None where not needed)."""
    grad_x = torch.zeros_like(x) if need_x else x.new_empty(0, 0)
    grad_w = torch.zeros_like(weight) if need_w else weight.new_empty(0, 0)
    arrays = (as_array(x), as_array(weight), as_array(indices), as_array(grad_out.contiguous()), positive_only)
    outputs = (as_array(grad_x), as_array(grad_w))
    split_gradients(indices.shape[0], indices.shape[1], need_x, need_w,
                    lambda nx, nw, *ranges: _linear_backward(*arrays, nx, nw, *outputs, *ranges), indices.numel())
    return (grad_x if need_x else None), (grad_w if need_w else None)


def conv_output(cols: torch.Tensor, weight_tm: torch.Tensor, indices: torch.Tensor, out: torch.Tensor) -> None:
    """out (n, out, L) = the routed convolution of tap-major columns (n, taps, in, L) with weight_tm
    (out, taps, in) over the selected (n, out, k) input channels."""
    args = (as_array(cols), as_array(weight_tm), as_array(indices), as_array(out))
    split(cols.shape[0], lambda b0, b1: _conv_output(*args, b0, b1))


def conv_backward(cols, weight_tm, indices, grad_out, grad_cols, grad_w) -> None:
    """Adds the gradients of :func:`conv_output` into grad_cols (n, taps, in, L) and grad_w (out, taps,
    in); either may be None (then ``cols`` may be None when grad_w is)."""
    need_x, need_w = grad_cols is not None, grad_w is not None
    empty = weight_tm.new_empty(0, 0, 0, 0)
    arrays = (as_array(cols if need_w else empty), as_array(weight_tm), as_array(indices), as_array(grad_out.contiguous()))
    outputs = (as_array(grad_cols if need_x else empty), as_array(grad_w if need_w else weight_tm.new_empty(0, 0, 0)))
    split_gradients(indices.shape[0], indices.shape[1], need_x, need_w,
                     lambda nx, nw, *ranges: _conv_backward(*arrays, nx, nw, *outputs, *ranges))


def maps_are_finite(padded: torch.Tensor, weight_t: torch.Tensor) -> bool:
    """Whether no channel map can hold NaN or infinity: |A[c, i, p]| <= max |x| * max over (i, c) of
    sum_j |weight_t[i, j, c]|, and that bound (in float64) stays below half the largest float of the dtype,
    so no rounded product or partial sum reaches infinity. A NaN or infinity in the input or the weight
    makes the bound NaN or infinite: false."""
    if padded.numel() == 0:
        return True
    bound = float(padded.abs().amax()) * float(weight_t.abs().sum(1).amax())
    return bound < torch.finfo(padded.dtype).max / 2


def conv_forward_whole(padded: torch.Tensor, geometry: tuple, weight_t: torch.Tensor, k: int, criterion: str,
                       out: torch.Tensor, indices: torch.Tensor) -> None:
    """out (B, out, L) and indices (B, out, k) of TopKConv from the zero-padded input (B, in, Hp, Wp), the
    geometry (kh, kw, sh, sw, dh, dw, oh, ow) and the weight as (in, taps, out), split over samples
    (:func:`_conv_forward_whole`)."""
    max_criterion = criterion == "max"
    # the bound costs a pass over the input: only 3 x 3 kernels have paths that use it
    maps_finite = geometry[:2] == (3, 3) and maps_are_finite(padded, weight_t)
    routed = maps_finite and not max_criterion
    # (out, in, taps): each output channel's weights together, for the routed sum alone
    weight_rows = weight_t.permute(2, 0, 1).contiguous() if routed else weight_t.new_empty(0, 0, 0)
    args = (as_array(padded), geometry, as_array(weight_t), as_array(weight_rows), k, max_criterion, maps_finite,
            routed, key_dtype(padded), as_array(out), as_array(indices))
    work = padded.shape[0] * weight_t.numel() * geometry[6] * geometry[7]
    run_pieces(_conv_forward_whole, _conv_forward_pieces, args, padded.shape[0], work)


def conv_backward_whole(padded, geometry, weight_t, indices, grad_out, grad_padded, grad_wt) -> None:
    """Adds into grad_padded (B, in, Hp, Wp), zeros on entry, and grad_wt (in, taps, out) the gradients of
    :func:`conv_forward_whole`; either may be None (then ``padded`` may be None when grad_wt is)."""
    weight_a, indices_a, grad_a = as_array(weight_t), as_array(indices), as_array(grad_out.contiguous())
    work = grad_out.numel() * weight_t.shape[0] * weight_t.shape[1]
    if grad_padded is not None:
        run_pieces(_conv_input_gradient_whole, _conv_input_gradient_pieces,
                   (weight_a, indices_a, grad_a, geometry, as_array(grad_padded)), weight_t.shape[0], work)
    if grad_wt is not None:
        run_pieces(_conv_weight_gradient_whole, _conv_weight_gradient_pieces,
                   (as_array(padded), geometry, indices_a, grad_a, as_array(grad_wt)), weight_t.shape[0], work)
