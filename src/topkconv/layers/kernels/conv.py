"""The chunked TopKConv kernel (Algorithm 2) that never builds the B x out x in x H x W maps A.

Per chunk of samples (the chunk sized by the memory budget) the input is unfolded into patch
columns (n, kh * kw * in, L), tap-major so that per-sample masks over ``in`` broadcast along
contiguous memory, in a workspace reused across chunks. From them the (n, out, in) channel scores:

* ``sum`` score: the spatial sum of A[b, c, i] is ``sum_j W[c, i, j] S[b, i, j]``, with S the window
  sums (the columns summed over L); the contraction is a tiny batched matmul.
* ``max`` score: per input channel one matmul ``(samples * L, kh*kw) @ (kh*kw, out)`` gives that
  channel's maps for a cache-sized group of samples and every output channel, reduced by a max
  over L at once. Only the (n, out, in) scores leave the block.

What is done with the selected channels is a *router*'s job (one per backend):

* :data:`MASKED` (torch ops only, any device): the per-sample masked weight (n, out, in * kh * kw),
  unselected input channels zeroed, times the columns (one batched matmul). Backward rebuilds the
  columns and masked weights chunk by chunk from the saved input and (B, out, k) indices:
  ``grad_x`` folds ``masked^T @ g`` back onto the input; ``grad_w`` adds the per-sample weight
  gradients ``g @ cols^T`` times each sample's mask.
* :data:`COMPILED` (numba, CPU): selection by :func:`.selection.topk_rows`, output and gradients by
  the loops of :mod:`.numba_loops`, which touch only the k selected channels.
"""

from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F

from . import numba_loops
from .budget import chunks, get_memory_budget, units_per_chunk
from .selection import topk_rows

# One block of maps for the max score is meant to stay in the L2 cache.
_CACHE_BLOCK_BYTES = 2**20
_MIN_OUTPUT_BLOCK = 64


def conv_output_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def pair(v) -> Tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


class _Columns:
    """Reusable workspace that unfolds chunks of samples into tap-major patch columns
    (n, kh * kw * in, L), and folds column gradients back.

    ``F.unfold`` allocates (and page-faults) a fresh tensor for every chunk; copying through a
    strided view of a padded buffer that lives for the whole call costs a fraction of that."""

    def __init__(self, x: torch.Tensor, chunk: int, kernel, stride, padding, dilation):
        (self.kh, self.kw), self.stride, self.padding, self.dilation = kernel, stride, padding, dilation
        _, self.in_ch, self.height, self.width = x.shape
        self.oh = conv_output_size(self.height, self.kh, stride[0], padding[0], dilation[0])
        self.ow = conv_output_size(self.width, self.kw, stride[1], padding[1], dilation[1])
        ph, pw = padding
        self.padded = x.new_zeros(chunk, self.in_ch, self.height + 2 * ph, self.width + 2 * pw)
        self.cols = None

    def _interior(self, n: int) -> torch.Tensor:
        ph, pw = self.padding
        return self.padded[:n, :, ph:ph + self.height, pw:pw + self.width]

    def _windows(self, n: int) -> torch.Tensor:
        """(n, kh, kw, in, oh, ow) view of the padded buffer: what every tap sees at every position."""
        padded = self.padded[:n]
        s_b, s_c, s_h, s_w = padded.stride()
        return padded.as_strided(
            (n, self.kh, self.kw, self.in_ch, self.oh, self.ow),
            (s_b, self.dilation[0] * s_h, self.dilation[1] * s_w, s_c, self.stride[0] * s_h, self.stride[1] * s_w))

    def unfold(self, xs: torch.Tensor) -> torch.Tensor:
        n = xs.shape[0]
        if self.cols is None:
            self.cols = xs.new_empty(self.padded.shape[0], self.kh * self.kw * self.in_ch, self.oh * self.ow)
        self._interior(n).copy_(xs)
        cols = self.cols[:n]
        cols.view(n, self.kh, self.kw, self.in_ch, self.oh, self.ow).copy_(self._windows(n))
        return cols

    def fold(self, grad_cols: torch.Tensor) -> torch.Tensor:
        """Adjoint of :meth:`unfold`: sum every column gradient back onto the input position it came from."""
        n = grad_cols.shape[0]
        self.padded[:n].zero_()
        windows = self._windows(n)
        per_tap = grad_cols.view(n, self.kh, self.kw, self.in_ch, self.oh, self.ow)
        for u in range(self.kh):  # taps may overlap: add them one at a time
            for v in range(self.kw):
                windows[:, u, v].add_(per_tap[:, u, v])
        out = self._interior(n).clone()
        self.padded[:n].zero_()  # the borders must be zero again for the next unfold
        return out


class _MaskedWeights:
    """Reusable per-sample weights with the unselected input channels zeroed, (n, out block, taps * in),
    and the (n, out block, in) masks they come from. One buffer serves every chunk of a call."""

    def __init__(self, weight_tap_major: torch.Tensor, chunk: int, block: int):
        _, taps, in_ch = weight_tap_major.shape
        self.weight = weight_tap_major
        self.masks = weight_tap_major.new_empty(chunk, block, in_ch)
        self.buffer = weight_tap_major.new_empty(chunk, block, taps, in_ch)

    def fill(self, indices: torch.Tensor, o0: int, o1: int) -> torch.Tensor:
        """Masked weights of output channels o0:o1 for the samples whose (n, o1 - o0, k) indices are given."""
        n, rows = indices.shape[0], o1 - o0
        masks = self.masks[:n, :rows].zero_().scatter_(2, indices.long(), 1.0)
        masked = torch.mul(self.weight[o0:o1], masks[:, :, None, :], out=self.buffer[:n, :rows])
        return masked.view(n, rows, -1)


def _plan(batch: int, out_ch: int, fixed_per_sample: int, per_sample_per_output: int):
    """(samples per chunk, output channels per block) whose temporaries fit the memory budget.

    Whole samples first; when one sample does not fit, its output channels are split into blocks."""
    whole = fixed_per_sample + out_ch * per_sample_per_output
    if whole <= get_memory_budget() or per_sample_per_output == 0:
        return units_per_chunk(whole, batch), out_ch
    # Below a few dozen output channels per block the matmuls stop paying for their calls; the
    # budget yields to that floor (measured: 1-channel blocks made the 512-channel layer 3x slower).
    floor = min(out_ch, _MIN_OUTPUT_BLOCK)
    return 1, max(floor, min(out_ch, (get_memory_budget() - fixed_per_sample) // per_sample_per_output))


def _max_scores(cols: torch.Tensor, weight_t: torch.Tensor) -> torch.Tensor:
    """(n, out, in) spatial maxima of the maps A, from the tap-major columns (n, taps * in, L).

    Per input channel a matmul ``(samples * L, taps) @ (taps, out)`` gives that channel's maps for a
    group of samples and every output channel; a few channels at once (one batched matmul) fill a
    cache-sized block, reduced by a max over L before the next block."""
    n, _, positions = cols.shape
    in_ch, taps, out_ch = weight_t.shape
    scores = cols.new_empty(in_ch, n, out_ch)
    cap = _CACHE_BLOCK_BYTES if cols.device.type == "cpu" else None
    per_sample = positions * out_ch * cols.element_size()
    group = units_per_chunk(per_sample, n, cap)
    channels = units_per_chunk(group * per_sample, in_ch, cap)
    maps = cols.new_empty(channels, group * positions, out_ch)
    for s0, s1 in chunks(n, group):
        # (in, samples * L, taps): one contiguous patch matrix per input channel
        patches = cols[s0:s1].view(s1 - s0, taps, in_ch, positions).permute(2, 0, 3, 1).reshape(in_ch, -1, taps)
        rows = patches.shape[1]
        for i0, i1 in chunks(in_ch, channels):
            block = torch.bmm(patches[i0:i1], weight_t[i0:i1], out=maps[: i1 - i0, :rows])
            torch.amax(block.view(i1 - i0, s1 - s0, positions, out_ch), dim=2, out=scores[i0:i1, s0:s1])
    return scores.permute(1, 2, 0)


def _sum_scores(cols: torch.Tensor, weight_tap_major: torch.Tensor) -> torch.Tensor:
    """(n, out, in) spatial sums of the maps A: window sums contracted with the filter taps."""
    n = cols.shape[0]
    out_ch, taps, in_ch = weight_tap_major.shape
    sums = cols.view(n, taps, in_ch, -1).sum(-1)  # S[b, j, i]: what tap j of channel i sees, summed
    scores = cols.new_zeros(n, out_ch, in_ch)
    for j in range(taps):  # a few long vectorised multiply-adds beat a batch of tiny matmuls
        scores.addcmul_(sums[:, None, j, :], weight_tap_major[None, :, j, :])
    return scores


def _tap_major(cols: torch.Tensor, taps: int) -> torch.Tensor:
    """(n, taps, in, L) view of tap-major columns (n, taps * in, L)."""
    n, rows, positions = cols.shape
    return cols.view(n, taps, rows // taps, positions)


def _backward_masked(x, weight_tm, indices, g_all, columns: _Columns, chunk: int, block: int, need_x: bool,
                     need_w: bool):
    """Input and (out, taps, in) weight gradients from per-sample masked-weight matmuls, chunk by chunk."""
    out_ch, taps, in_ch = weight_tm.shape
    positions = g_all.shape[2]
    masked = _MaskedWeights(weight_tm, chunk, block)
    grad_x = torch.empty_like(x) if need_x else None
    grad_tm = torch.zeros_like(weight_tm) if need_w else None
    grad_cols = x.new_empty(chunk, taps * in_ch, positions) if need_x else None
    per_sample_grad = x.new_empty(chunk, block, taps * in_ch) if need_w else None
    for b0, b1 in chunks(x.shape[0], chunk):
        n = b1 - b0
        cols = columns.unfold(x[b0:b1]) if need_w else None
        for o0, o1 in chunks(out_ch, block):
            masked_weight = masked.fill(indices[b0:b1, o0:o1], o0, o1)
            g = g_all[b0:b1, o0:o1]
            if need_w:
                psg = torch.bmm(g, cols.transpose(1, 2), out=per_sample_grad[:n, : o1 - o0])
                for b in range(n):  # in place: only the selected slices of each sample's gradient count
                    grad_tm[o0:o1].addcmul_(psg[b].view(o1 - o0, taps, in_ch), masked.masks[b, : o1 - o0, None, :])
            if need_x:
                if o0 == 0:
                    torch.bmm(masked_weight.transpose(1, 2), g, out=grad_cols[:n])
                else:
                    grad_cols[:n].baddbmm_(masked_weight.transpose(1, 2), g)
        if need_x:  # after the columns are used: fold reuses the padded buffer
            grad_x[b0:b1] = columns.fold(grad_cols[:n])
    return grad_x, grad_tm


def _backward_compiled(x, weight_tm, indices, g_all, columns: _Columns, chunk: int, need_x: bool, need_w: bool):
    """Input and (out, taps, in) weight gradients from the numba loops, chunk by chunk."""
    taps, in_ch = weight_tm.shape[1:]
    positions = g_all.shape[2]
    grad_x = torch.empty_like(x) if need_x else None
    grad_tm = torch.zeros_like(weight_tm) if need_w else None
    grad_cols = x.new_empty(chunk, taps, in_ch, positions) if need_x else None
    for b0, b1 in chunks(x.shape[0], chunk):
        n = b1 - b0
        cols = _tap_major(columns.unfold(x[b0:b1]), taps) if need_w else None
        if need_x:
            grad_cols[:n].zero_()
        numba_loops.conv_backward(cols, weight_tm, indices[b0:b1], g_all[b0:b1],
                                       grad_cols[:n] if need_x else None, grad_tm)
        if need_x:  # after the columns are used: fold reuses the padded buffer
            grad_x[b0:b1] = columns.fold(grad_cols[:n].view(n, taps * in_ch, positions))
    return grad_x, grad_tm



class _MaskedRouter:
    """Torch-level routing: per-sample masked weights times the columns."""

    def forward_bytes_per_output(self, in_ch: int, taps: int, elem: int) -> int:
        return in_ch * (taps + 1) * elem  # mask and masked weight

    def backward_bytes_per_output(self, in_ch: int, taps: int, elem: int) -> int:
        return in_ch * (2 * taps + 1) * elem  # mask, masked weight and the per-sample weight gradient

    def start(self, weight_tm: torch.Tensor, chunk: int, block: int):
        masked = _MaskedWeights(weight_tm, chunk, block)

        def route(cols, scores, k, indices, out):
            idx = scores.topk(k, dim=2, sorted=False).indices
            indices.copy_(idx)
            for o0, o1 in chunks(out.shape[1], block):
                out[:, o0:o1] = torch.bmm(masked.fill(idx[:, o0:o1], o0, o1), cols)
        return route

    def backward(self, x, weight_tm, indices, g_all, columns, chunk, block, need_x, need_w):
        return _backward_masked(x, weight_tm, indices, g_all, columns, chunk, block, need_x, need_w)


class _CompiledRouter:
    """numba routing: selection and the sparse loops over the k selected channels (CPU only)."""

    def forward_bytes_per_output(self, in_ch: int, taps: int, elem: int) -> int:
        return 0  # the loops need no masks or masked weights: only the columns and the scores

    backward_bytes_per_output = forward_bytes_per_output

    def start(self, weight_tm: torch.Tensor, chunk: int, block: int):
        taps = weight_tm.shape[1]

        def route(cols, scores, k, indices, out):
            topk_rows(scores.reshape(-1, scores.shape[2]), k, indices.view(-1, k))
            numba_loops.conv_output(_tap_major(cols, taps), weight_tm, indices, out)
        return route

    def backward(self, x, weight_tm, indices, g_all, columns, chunk, block, need_x, need_w):
        return _backward_compiled(x, weight_tm, indices, g_all, columns, chunk, need_x, need_w)


MASKED = _MaskedRouter()
COMPILED = _CompiledRouter()


def forward(x, weight, k: int, criterion: str, stride, padding, dilation, router=MASKED):
    """TopKConv forward: (out (B, out, H', W'), indices (B, out, k) int32 of the selected input channels)."""
    batch, in_ch, height, width = x.shape
    out_ch, _, kh, kw = weight.shape
    taps = kh * kw
    geometry = ((kh, kw), pair(stride), pair(padding), pair(dilation))
    elem = x.element_size()
    oh = conv_output_size(height, kh, geometry[1][0], geometry[2][0], geometry[3][0])
    ow = conv_output_size(width, kw, geometry[1][1], geometry[2][1], geometry[3][1])
    # Per sample: padded input, columns, their per-channel copy (max) and scores; per sample and
    # output channel: what the router needs.
    chunk, block = _plan(batch, out_ch, (x[:1].numel() * 2 + in_ch * taps * oh * ow * 2 + out_ch * in_ch) * elem,
                         router.forward_bytes_per_output(in_ch, taps, elem))
    weight_tm = weight.reshape(out_ch, in_ch, taps).transpose(1, 2).contiguous()  # (out, taps, in)
    weight_t = weight_tm.permute(2, 1, 0).contiguous() if criterion == "max" else None  # (in, taps, out)
    columns = _Columns(x, chunk, *geometry)
    route = router.start(weight_tm, chunk, block)
    out = x.new_empty(batch, out_ch, oh * ow)
    indices = torch.empty(batch, out_ch, k, dtype=torch.int32, device=x.device)
    for b0, b1 in chunks(batch, chunk):
        cols = columns.unfold(x[b0:b1])
        scores = _max_scores(cols, weight_t) if criterion == "max" else _sum_scores(cols, weight_tm)
        route(cols, scores, k, indices[b0:b1], out[b0:b1])
    return out.view(batch, out_ch, oh, ow), indices


def backward(x, weight, indices, grad_out, stride, padding, dilation, need_x: bool, need_w: bool, router=MASKED):
    """(grad_x, grad_w) of :func:`forward` from the saved input and indices (None where not needed)."""
    batch, in_ch = x.shape[:2]
    out_ch, _, kh, kw = weight.shape
    taps = kh * kw
    geometry = ((kh, kw), pair(stride), pair(padding), pair(dilation))
    g_all = grad_out.reshape(batch, out_ch, grad_out.shape[2] * grad_out.shape[3])
    positions = g_all.shape[2]
    elem = x.element_size()
    # Per sample: padded input, columns and column gradient; per sample and output channel: the router's.
    chunk, block = _plan(batch, out_ch, (x[:1].numel() + in_ch * taps * positions * 2) * elem,
                         router.backward_bytes_per_output(in_ch, taps, elem))
    weight_tm = weight.reshape(out_ch, in_ch, taps).transpose(1, 2).contiguous()
    columns = _Columns(x, chunk, *geometry)
    grad_x, grad_tm = router.backward(x, weight_tm, indices, g_all, columns, chunk, block, need_x, need_w)
    grad_w = grad_tm.transpose(1, 2).reshape_as(weight) if need_w else None
    return grad_x, grad_w


# ---------------------------------------------------------------- dense-order loops (numba): small problems, large k

# From this share of the input channels on (k / in), the dense-order loops (every map, the output
# channels innermost, vectorised) beat the sparse router's k / in of the FLOPs in scalar loops over
# the few output positions; below it the chunked driver keeps the sparse router.
DENSE_LOOPS_MIN_SHARE = 0.25


def _loop_geometry(x, weight, stride, padding, dilation) -> tuple:
    """(kh, kw, sh, sw, dh, dw, oh, ow): what the dense-order loops need of the convolution's geometry."""
    (kh, kw), stride, padding, dilation = weight.shape[2:], pair(stride), pair(padding), pair(dilation)
    oh = conv_output_size(x.shape[2], kh, stride[0], padding[0], dilation[0])
    ow = conv_output_size(x.shape[3], kw, stride[1], padding[1], dilation[1])
    return (kh, kw, *stride, *dilation, oh, ow)


def _column_bytes(x, weight, stride, padding, dilation) -> int:
    """Bytes of one sample's patch columns."""
    kh, kw, _, _, _, _, oh, ow = _loop_geometry(x, weight, stride, padding, dilation)
    return x.shape[1] * kh * kw * oh * ow * x.element_size()


def dense_loops_win(x: torch.Tensor, weight: torch.Tensor, k: int, stride, padding, dilation) -> bool:
    """Whether :func:`forward_dense_loops` / :func:`backward_dense_loops` serve (numba backend): when the
    whole batch's patch columns would fit the memory budget (a small problem: one compiled loop per call
    beats the chunked driver's machinery; the loops themselves never build the columns), or when k is a
    large share of the channels; and never when one sample's maps exceed the budget."""
    columns = _column_bytes(x, weight, stride, padding, dilation)
    # per thread, one sample's maps (in, L, out) for the max score: they must fit the budget too
    maps = columns // (weight.shape[2] * weight.shape[3]) * weight.shape[0]
    if maps > get_memory_budget():
        return False
    return x.shape[0] * columns <= get_memory_budget() or k >= DENSE_LOOPS_MIN_SHARE * weight.shape[1]


def _padded(x: torch.Tensor, padding) -> torch.Tensor:
    """The input with its zero padding (contiguous): what the dense-order loops read their windows from."""
    ph, pw = padding
    return F.pad(x, (pw, pw, ph, ph)) if ph or pw else x.contiguous()


def _channels_last(weight: torch.Tensor) -> torch.Tensor:
    """(in, taps, out): the weight with the output channels innermost, as the dense-order loops read it."""
    return weight.reshape(weight.shape[0], weight.shape[1], -1).permute(1, 2, 0).contiguous()


def forward_dense_loops(x, weight, k: int, criterion: str, stride, padding, dilation):
    """:func:`forward` by the dense-order loops (numba backend), from the zero-padded input."""
    batch, out_ch = x.shape[0], weight.shape[0]
    geometry = _loop_geometry(x, weight, stride, padding, dilation)
    oh, ow = geometry[6:]
    out = x.new_empty(batch, out_ch, oh * ow)
    indices = torch.empty(batch, out_ch, k, dtype=torch.int32)
    numba_loops.conv_forward_whole(_padded(x, pair(padding)), geometry, _channels_last(weight), k, criterion, out,
                                   indices)
    return out.view(batch, out_ch, oh, ow), indices


def backward_dense_loops(x, weight, indices, grad_out, stride, padding, dilation, need_x: bool, need_w: bool):
    """:func:`backward` by the dense-order loops (numba backend): the input gradient summed onto a padded
    plane, then its interior; every weight-gradient entry sums over the samples in order."""
    (batch, in_ch, height, width), out_ch = x.shape, weight.shape[0]
    padding = pair(padding)
    geometry = _loop_geometry(x, weight, stride, padding, dilation)
    g_all = grad_out.reshape(batch, out_ch, geometry[6] * geometry[7])
    grad_padded = x.new_zeros(batch, in_ch, height + 2 * padding[0], width + 2 * padding[1]) if need_x else None
    grad_wt = weight.new_zeros(in_ch, geometry[0] * geometry[1], out_ch) if need_w else None
    numba_loops.conv_backward_whole(_padded(x, padding) if need_w else None, geometry, _channels_last(weight),
                                    indices, g_all, grad_padded, grad_wt)
    grad_x = grad_padded[:, :, padding[0]:padding[0] + height, padding[1]:padding[1] + width].contiguous() \
        if need_x else None
    grad_w = grad_wt.permute(2, 0, 1).reshape_as(weight) if need_w else None
    return grad_x, grad_w
