"""Fast exact TopKConv kernel (Algorithm 2) that never builds the B x out x in x H x W maps A.

Per chunk of samples (sized by the memory budget) the input is unfolded once into patch columns
(n, in * kh * kw, L). From them:

* ``sum`` score: the spatial sum of A[b, c, i] is ``sum_j W[c, i, j] S[b, i, j]`` with S the window
  sums of the columns, a tiny batched matmul.
* ``max`` score: for each sample and a cache-sized block of input channels, the maps of all output
  channels at once, ``patches_i (L, kh*kw) @ W[:, i]^T (kh*kw, out)``, reduced by a max over L
  before the next block. Only (n, out, in) scores leave the block.
* Output: the per-sample masked weight ``W * mask[b]`` (n, out, in * kh * kw) times the columns.

Backward recomputes the columns chunk by chunk from the saved input and rebuilds the mask from the
saved (B, out, k) indices: ``grad_x`` folds ``(W * mask)^T @ g``; ``grad_w`` sums the masked
per-sample outer products ``(g @ cols^T) * mask`` over the batch.
"""

from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from ._budget import chunks, units_per_chunk

# One block of maps for the max score is meant to stay in cache.
_CACHE_BLOCK_BYTES = 4 * 2**20


def conv_output_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def _pair(v) -> Tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def _max_scores(cols: torch.Tensor, weight_t: torch.Tensor, in_ch: int, taps: int) -> torch.Tensor:
    """(n, out, in) spatial maxima of the maps A from the columns (n, in * taps, L)."""
    n, _, positions = cols.shape
    out_ch = weight_t.shape[2]
    patches = cols.view(n, in_ch, taps, positions).transpose(2, 3)  # (n, in, L, taps)
    scores = cols.new_empty(n, in_ch, out_ch)
    per_channel = positions * out_ch * cols.element_size()
    block = units_per_chunk(per_channel, in_ch, _CACHE_BLOCK_BYTES if cols.device.type == "cpu" else None)
    for b in range(n):
        for i0, i1 in chunks(in_ch, block):
            maps = torch.matmul(patches[b, i0:i1], weight_t[i0:i1])  # (block, L, out)
            torch.amax(maps, dim=1, out=scores[b, i0:i1])
    return scores.transpose(1, 2)


def _sum_scores(cols: torch.Tensor, weight_3: torch.Tensor, in_ch: int, taps: int) -> torch.Tensor:
    """(n, out, in) spatial sums of the maps A: window sums contracted with the filter taps."""
    n = cols.shape[0]
    window_sums = cols.view(n, in_ch, taps, -1).sum(-1)  # (n, in, taps)
    # per input channel: (n, taps) @ (taps, out)
    per_channel = torch.bmm(window_sums.transpose(0, 1), weight_3.permute(1, 2, 0))  # (in, n, out)
    return per_channel.permute(1, 2, 0)


def _masks(indices: torch.Tensor, in_ch: int, dtype) -> torch.Tensor:
    n, out_ch, _ = indices.shape
    return torch.zeros(n, out_ch, in_ch, dtype=dtype, device=indices.device).scatter_(2, indices.long(), 1.0)


class TopKConv2dFunction(torch.autograd.Function):
    """TopKConv forward and backward; saves x, W and the (B, out, k) selected input channels."""

    @staticmethod
    def forward(ctx, x, weight, bias, k, criterion, stride, padding, dilation):
        batch, in_ch, height, width = x.shape
        out_ch, _, kh, kw = weight.shape
        taps = kh * kw
        stride, padding, dilation = _pair(stride), _pair(padding), _pair(dilation)
        oh = conv_output_size(height, kh, stride[0], padding[0], dilation[0])
        ow = conv_output_size(width, kw, stride[1], padding[1], dilation[1])
        positions = oh * ow
        out = x.new_empty(batch, out_ch, positions)
        indices = torch.empty(batch, out_ch, k, dtype=torch.int32, device=x.device)
        weight_3 = weight.reshape(out_ch, in_ch, taps)
        weight_t = weight_3.permute(1, 2, 0).contiguous() if criterion == "max" else None  # (in, taps, out)
        elem = x.element_size()
        # Per sample: columns, masked weight, scores and mask.
        per_sample = (in_ch * taps * positions + out_ch * in_ch * taps + 3 * out_ch * in_ch) * elem
        for b0, b1 in chunks(batch, units_per_chunk(per_sample, batch)):
            cols = F.unfold(x[b0:b1], (kh, kw), dilation, padding, stride)  # (n, in * taps, L)
            if criterion == "max":
                scores = _max_scores(cols, weight_t, in_ch, taps)
            else:
                scores = _sum_scores(cols, weight_3, in_ch, taps)
            idx = scores.topk(k, dim=2, sorted=False).indices
            indices[b0:b1] = idx
            masked = (weight_3 * _masks(idx, in_ch, x.dtype)[..., None]).view(b1 - b0, out_ch, in_ch * taps)
            torch.bmm(masked, cols, out=out[b0:b1])
        if bias is not None:
            out += bias[:, None]
        ctx.save_for_backward(x, weight, indices)
        ctx.geometry = (stride, padding, dilation)
        ctx.has_bias = bias is not None
        return out.view(batch, out_ch, oh, ow)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, weight, indices = ctx.saved_tensors
        stride, padding, dilation = ctx.geometry
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        batch, in_ch, height, width = x.shape
        out_ch, _, kh, kw = weight.shape
        taps = kh * kw
        g_all = grad_out.reshape(batch, out_ch, -1)
        positions = g_all.shape[2]
        weight_3 = weight.reshape(out_ch, in_ch, taps)
        grad_x = torch.empty_like(x) if need_x else None
        grad_w = torch.zeros(out_ch, in_ch, taps, dtype=weight.dtype, device=weight.device) if need_w else None
        elem = x.element_size()
        # Per sample: columns and their gradient, masked weight, weight gradient and mask.
        per_sample = (2 * in_ch * taps * positions + 2 * out_ch * in_ch * taps + out_ch * in_ch) * elem
        for b0, b1 in chunks(batch, units_per_chunk(per_sample, batch)):
            n = b1 - b0
            mask = _masks(indices[b0:b1], in_ch, x.dtype)[..., None]  # (n, out, in, 1)
            g = g_all[b0:b1]
            if need_x:
                masked = (weight_3 * mask).view(n, out_ch, in_ch * taps)
                grad_cols = torch.bmm(masked.transpose(1, 2), g)
                grad_x[b0:b1] = F.fold(grad_cols, (height, width), (kh, kw), dilation, padding, stride)
            if need_w:
                cols = F.unfold(x[b0:b1], (kh, kw), dilation, padding, stride)
                per_sample_grad = torch.bmm(g, cols.transpose(1, 2)).view(n, out_ch, in_ch, taps)
                grad_w += (per_sample_grad * mask).sum(0)
        grad_b = g_all.sum((0, 2)) if (ctx.has_bias and need_b) else None
        grad_w = grad_w.view_as(weight) if need_w else None
        return grad_x, grad_w, grad_b, None, None, None, None, None
