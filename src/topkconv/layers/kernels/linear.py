"""The torch-level Dynamic-k (TopKLinear) kernel: torch ops only, so it runs on any device and dtype.

Forward, per block of (sample, output row) pairs small enough to stay in cache, it forms the
products ``W[c, :] * x[b, :]`` and selects the k largest with the two-stage search of
:func:`.selection.select_topk`; the output sums their values. Only the (B, out, k) indices are kept.

Backward uses only the saved indices: the gradients are gathers and scatter-adds over the selected
pairs, ``grad_w[c, i] = sum_b g[b, c] x[b, i] sel[b, c, i]`` and
``grad_x[b, i] = sum_c g[b, c] w[c, i] sel[b, c, i]``.
"""

from __future__ import annotations

import math

import torch

from .budget import chunks, units_per_chunk
from .selection import group_size, select_topk

# One block of products is meant to stay in the L3 cache (measured best among 2-16 MiB on a 32 MiB
# L3: bigger blocks mean fewer op calls); the memory budget can only lower it.
_CACHE_BLOCK_BYTES = 8 * 2**20


def forward(x: torch.Tensor, weight: torch.Tensor, k: int, positive_only: bool):
    """Dynamic-k forward: (out, indices) with out[b, c] the sum of the k largest weight[c, i] * x[b, i]
    and indices[b, c] (int32) their i."""
    batch, fan_in = x.shape
    fan_out = weight.shape[0]
    g = group_size(fan_in, k)
    width = g * math.ceil(fan_in / g)
    elem = x.element_size()
    out = x.new_empty(batch, fan_out)
    indices = torch.empty(batch, fan_out, k, dtype=torch.int32, device=x.device)
    # Temporaries per product row: the padded products, the gathered candidates and the group maxima.
    row_bytes = (width + g * k + width // g) * elem + 16 * k
    rows = units_per_chunk(row_bytes, batch * fan_out, _CACHE_BLOCK_BYTES if x.device.type == "cpu" else None)
    if rows >= fan_out:
        samples_per_block, rows = max(1, rows // fan_out), fan_out
    else:
        samples_per_block = 1
    buffer = x.new_full((samples_per_block, rows, width), float("-inf"))
    workspace = x.new_empty(samples_per_block * rows * (width // g + g * k))
    for b0, b1 in chunks(batch, samples_per_block):
        for r0, r1 in chunks(fan_out, rows):
            block = buffer[: b1 - b0, : r1 - r0]
            real = block[..., :fan_in]
            torch.mul(x[b0:b1, None, :], weight[None, r0:r1, :], out=real)
            if positive_only:  # only positive products count; the -inf padding must stay -inf
                real.clamp_(min=0)
            values, idx = select_topk(block.reshape(-1, width), k, g, workspace)
            out[b0:b1, r0:r1] = values.sum(1).view(b1 - b0, r1 - r0)
            indices[b0:b1, r0:r1] = idx.view(b1 - b0, r1 - r0, k)
    return out, indices


def backward(x, weight, indices, grad_out, positive_only: bool, need_x: bool, need_w: bool):
    """(grad_x, grad_w) of :func:`forward` from its saved (B, out, k) indices (None where not needed)."""
    batch, fan_in = x.shape
    fan_out, k = indices.shape[1], indices.shape[2]
    grad_x = torch.zeros_like(x) if need_x else None
    grad_w = torch.zeros_like(weight) if need_w else None
    # Per sample the gathered tensors are (out, k): a few of them per chunk.
    per_sample = fan_out * k * (8 + 4 * x.element_size())
    for b0, b1 in chunks(batch, units_per_chunk(per_sample, batch)):
        n = b1 - b0
        idx = indices[b0:b1].long()  # (n, out, k)
        x_sel = x[b0:b1].gather(1, idx.view(n, -1)).view(n, fan_out, k)
        w_sel = weight.unsqueeze(0).expand(n, fan_out, fan_in).gather(2, idx)
        g = grad_out[b0:b1].unsqueeze(2)  # (n, out, 1)
        if positive_only:  # clamped products (<= 0) pass no gradient
            g = g * (x_sel * w_sel > 0)
        if need_x:
            grad_x[b0:b1].scatter_add_(1, idx.view(n, -1), (g * w_sel).view(n, -1))
        if need_w:
            grad_w.scatter_add_(1, idx.transpose(0, 1).reshape(fan_out, n * k),
                                (g * x_sel).transpose(0, 1).reshape(fan_out, n * k))
    return grad_x, grad_w
