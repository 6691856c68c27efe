"""Fast exact Dynamic-k (TopKLinear) kernel.

Forward, per block of (sample, output row) pairs small enough to stay in cache, it forms the
products ``W[c, :] * x[b, :]`` and finds the k largest without a full ``topk`` over the fan-in:

1. Split the fan-in into G groups (strided, so the group maxima are a vectorised reduction) of g
   elements and take each group's maximum.
2. Every one of the k largest products lies in one of the k groups with the largest maxima: a
   product's group can be outranked only by groups holding a larger product, and at most k - 1
   products are larger than a top-k product.
3. ``topk`` over the G maxima, then over the g * k products of the chosen groups.

Choosing g near sqrt(fan_in / k) makes both ``topk`` calls small (about 5,000 instead of 25,088
elements per row for the paper's 25088 -> 512, k = 250 layer). The selection is the same as a
full ``topk`` (ties aside) and the output sums the same values.

Backward uses only the saved indices (B, out, k): the gradients are gathers and scatter-adds over
the selected pairs, ``grad_w[c, i] = sum_b g[b, c] x[b, i] sel[b, c, i]`` and
``grad_x[b, i] = sum_c g[b, c] w[c, i] sel[b, c, i]``.
"""

from __future__ import annotations

import math

import torch
from torch.autograd.function import once_differentiable

from . import _numba_kernels as compiled_kernels
from ._budget import chunks, units_per_chunk

# One block of products is meant to stay in the L3 cache (measured best among 2-16 MiB on a 32 MiB
# L3: bigger blocks mean fewer op calls); the memory budget can only lower it.
_CACHE_BLOCK_BYTES = 8 * 2**20
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


def _forward(x: torch.Tensor, weight: torch.Tensor, k: int, positive_only: bool):
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


class TopKLinearFunction(torch.autograd.Function):
    """y[b, c] = sum of the k largest W[c, i] x[b, i] (+ bias); saves x, W and the (B, out, k) indices.

    ``compiled``: use the numba CPU loops (``_numba_kernels.py``) instead of the torch-level blocks."""

    @staticmethod
    def forward(ctx, x, weight, bias, k, positive_only, compiled=False):
        out, indices = (compiled_kernels.linear_forward if compiled else _forward)(x, weight, k, positive_only)
        if bias is not None:
            out += bias
        ctx.save_for_backward(x, weight, indices)
        ctx.positive_only = positive_only
        ctx.has_bias = bias is not None
        ctx.compiled = compiled
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, weight, indices = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        grad_b = grad_out.sum(0) if (ctx.has_bias and need_b) else None
        if ctx.compiled:
            grad_x, grad_w = compiled_kernels.linear_backward(x, weight, indices, grad_out, ctx.positive_only,
                                                             need_x, need_w)
            return grad_x, grad_w, grad_b, None, None, None
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
            if ctx.positive_only:  # clamped products (<= 0) pass no gradient
                g = g * (x_sel * w_sel > 0)
            if need_x:
                grad_x[b0:b1].scatter_add_(1, idx.view(n, -1), (g * w_sel).view(n, -1))
            if need_w:
                grad_w.scatter_add_(1, idx.transpose(0, 1).reshape(fan_out, n * k),
                                    (g * x_sel).transpose(0, 1).reshape(fan_out, n * k))
        return grad_x, grad_w, grad_b, None, None, None
