"""Functional twins of the routing layers in :mod:`topkconv.layers`.

Every function takes plain tensors (``weight`` and ``bias`` shaped as in ``nn.Linear`` / ``nn.Conv2d``)
and an ``impl`` switch:

* ``"reference"``: the paper's formula, written directly. It materialises the full product tensor
  (Dynamic-k) or the per-input-channel maps A (TopKConv) and lets autograd do the rest.
* ``"fast"``: custom autograd kernels (``layers/_linear_kernel.py``, ``layers/_conv_kernel.py``) that
  never build those tensors. They work in chunks bounded by :func:`set_memory_budget` and save only
  the inputs and the selected indices for backward. Same selection (ties aside) and same values.
* ``"numba"``: the same kernels with their selection and their sparse parts (the output and the
  gradients of TopKConv walk only the k selected input channels) as compiled CPU loops
  (``layers/_numba_kernels.py``). CPU tensors of float32 or float64 only.
* ``"auto"``: the default, the fastest exact implementation available for the inputs: ``"numba"``
  where it applies, else ``"fast"`` (CUDA, half precision, or numba not installed).

Inside :func:`topkconv.layers.dense_gradients` every routing function returns its own forward value
but the gradient of the dense layer with the same weights (BPDA).
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.nn.functional as F

from .layers import _numba_kernels
from .layers._args import check_criterion, check_frac, resolve_k
from .layers._budget import get_memory_budget, memory_budget, set_memory_budget
from .layers._conv_kernel import TopKConv2dFunction
from .layers._linear_kernel import TopKLinearFunction
from .layers.bpda import bpda_enabled, straight_through

IMPLS = ("auto", "reference", "fast", "numba")

__all__ = ["topk_linear", "topk_conv2d", "topk_neuron_conv2d", "stochastic_activation_pruning",
           "channel_maps", "channel_scores", "topk_channel_mask", "IMPLS",
           "get_memory_budget", "set_memory_budget", "memory_budget"]


def _check_impl(impl: str) -> str:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    return impl


def _use_compiled(impl: str, *tensors: torch.Tensor) -> bool:
    """Whether the numba loops run: always for impl="numba" (which needs CPU float32/float64 tensors
    and numba installed), where they apply for "auto"."""
    applies = _numba_kernels.AVAILABLE and all(
        t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64) and t.dtype == tensors[0].dtype
        for t in tensors)
    if impl == "numba" and not applies:
        found = ", ".join(f"{t.dtype} on {t.device}" for t in tensors)
        raise ValueError(f"impl='numba' needs numba installed and CPU float32 or float64 tensors of one dtype; "
                         f"got {found}" + ("" if _numba_kernels.AVAILABLE else " (numba is not installed)"))
    return applies and impl in ("auto", "numba")


# ---------------------------------------------------------------- Dynamic-k (TopKDense)

def _topk_linear_reference(x, weight, bias, k, positive_only):
    products = x.unsqueeze(1) * weight.unsqueeze(0)  # (B, out, in): the tensor the fast path avoids
    if positive_only:  # a zero product is not positive: no gradient through it (unlike clamp's)
        products = torch.where(products > 0, products, torch.zeros_like(products))
    out = products.topk(k, dim=-1, sorted=False).values.sum(-1)
    return out if bias is None else out + bias


def topk_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, k=1,
                positive_only: bool = False, impl: str = "auto") -> torch.Tensor:
    """Dynamic-k: ``y[b, c] = sum of the k largest weight[c, i] * x[b, i]`` (+ bias[c]).

    With ``positive_only`` only positive products count (Algorithm 1's ``|R| <= k`` reading).
    """
    _check_impl(impl)
    k = resolve_k(k, weight.shape[1])
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if impl == "reference":
        out = _topk_linear_reference(x2, weight, bias, k, positive_only)
    elif k == weight.shape[1] and not positive_only:
        out = F.linear(x2, weight, bias)  # every product is kept
    else:
        with torch.no_grad() if bpda_enabled() else contextlib.nullcontext():
            out = TopKLinearFunction.apply(x2.contiguous(), weight.contiguous(), bias, k, positive_only,
                                           _use_compiled(impl, x2, weight))
    if bpda_enabled():
        out = straight_through(out, F.linear(x2, weight, bias))
    return out.reshape(*lead, weight.shape[0])


# ---------------------------------------------------------------- TopKConv (Algorithm 2)

def channel_maps(x, weight, stride=1, padding=0, dilation=1):
    """A[b, c, i] = conv(x[b, i], weight[c, i]): shape (B, out, in, H', W'). Memory-hungry by nature."""
    out_ch, in_ch, kh, kw = weight.shape
    depthwise = weight.transpose(0, 1).reshape(in_ch * out_ch, 1, kh, kw)
    a = F.conv2d(x, depthwise, None, stride, padding, dilation, groups=in_ch)
    return a.reshape(x.shape[0], in_ch, out_ch, a.shape[-2], a.shape[-1]).transpose(1, 2)


def channel_scores(a: torch.Tensor, criterion: str) -> torch.Tensor:
    return a.amax(dim=(-2, -1)) if criterion == "max" else a.sum(dim=(-2, -1))


def _topk_conv2d_reference(x, weight, bias, k, criterion, stride, padding, dilation):
    a = channel_maps(x, weight, stride, padding, dilation)
    selected = channel_scores(a.detach(), criterion).topk(k, dim=2, sorted=False).indices
    mask = torch.zeros(a.shape[:3], dtype=a.dtype, device=a.device).scatter_(2, selected, 1.0)
    out = (a * mask[..., None, None]).sum(2)
    return out if bias is None else out + bias.view(1, -1, 1, 1)


def topk_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, k=1,
                criterion: str = "max", stride=1, padding=0, dilation=1, impl: str = "auto") -> torch.Tensor:
    """TopKConv: per sample and output channel, sum the k input-channel maps with the best score."""
    _check_impl(impl)
    check_criterion(criterion)
    k = resolve_k(k, weight.shape[1])
    if impl == "reference" or isinstance(padding, str):  # string padding: only the reference handles it
        out = _topk_conv2d_reference(x, weight, bias, k, criterion, stride, padding, dilation)
    elif k == weight.shape[1]:
        out = F.conv2d(x, weight, bias, stride, padding, dilation)  # every map is kept
    else:
        with torch.no_grad() if bpda_enabled() else contextlib.nullcontext():
            out = TopKConv2dFunction.apply(x.contiguous(), weight.contiguous(), bias, k, criterion,
                                           stride, padding, dilation, _use_compiled(impl, x, weight))
    if bpda_enabled():
        out = straight_through(out, F.conv2d(x, weight, bias, stride, padding, dilation))
    return out


# ---------------------------------------------------------------- TKC-neuron

def topk_channel_mask(y: torch.Tensor, k: int, criterion: str = "max") -> torch.Tensor:
    """Per sample, 1 for the k output channels of ``y`` with the best spatial score, else 0."""
    selected = channel_scores(y.detach(), criterion).topk(k, dim=1, sorted=False).indices
    return torch.zeros(y.shape[:2], dtype=y.dtype, device=y.device).scatter_(1, selected, 1.0)


def topk_neuron_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, k=1,
                       criterion: str = "max", stride=1, padding=0, dilation=1,
                       impl: str = "auto") -> torch.Tensor:
    """TKC-neuron: a dense convolution whose output keeps only the k best channels per sample."""
    _check_impl(impl)
    check_criterion(criterion)
    k = resolve_k(k, weight.shape[0])
    dense = F.conv2d(x, weight, bias, stride, padding, dilation)
    mask = topk_channel_mask(dense, k, criterion)[..., None, None]
    if bpda_enabled():
        return straight_through(dense * mask, dense)
    if impl == "reference":
        return dense * mask
    # In place: the convolution's backward does not need its output, and the product saves only the
    # (B, out) mask, so no second output-sized tensor is kept or even allocated.
    return dense.mul_(mask)


# ---------------------------------------------------------------- SAP

def stochastic_activation_pruning(h: torch.Tensor, frac: float = 0.8,
                                  generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """SAP (Dhillon et al. 2018), per sample: draw ``r = round(frac * n)`` activations with replacement,
    with probability ``|h_j| / sum |h|``; keep the drawn ones, scaled by ``1 / (1 - (1 - p_j)^r)``.

    The expectation of the output equals ``h``. Under BPDA the gradient is the identity's.
    """
    frac = check_frac(frac)
    flat = h.reshape(h.shape[0], -1)
    n = flat.shape[1]
    draws = max(1, round(frac * n))
    magnitude = flat.detach().abs()
    total = magnitude.sum(1, keepdim=True)
    alive = total.squeeze(1) > 0
    p = torch.where(total > 0, magnitude / total.clamp_min(torch.finfo(magnitude.dtype).tiny),
                    torch.full_like(magnitude, 1.0 / n))
    sampled = torch.multinomial(p, draws, replacement=True, generator=generator)
    kept = torch.zeros_like(p, dtype=torch.bool).scatter_(1, sampled, True) & alive[:, None]
    keep_prob = -torch.expm1(draws * torch.log1p(-p.clamp(max=1.0 - 1e-12)))  # 1 - (1 - p)^r, stable
    scale = torch.where(kept, 1.0 / keep_prob.clamp_min(torch.finfo(p.dtype).tiny), torch.zeros_like(p))
    out = (flat * scale).reshape_as(h)
    return straight_through(out, h) if bpda_enabled() else out
