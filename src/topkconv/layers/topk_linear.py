"""Dynamic-k (TopKDense, Algorithm 1 of the paper): its functional form, autograd Function and module."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from ._args import KSpec, check_impl, resolve_k
from .bpda import gate_parameters, needs_autograd, route_gradients
from .kernels.budget import chunks, units_per_chunk
from .kernels import backends


class TopKLinearFunction(torch.autograd.Function):
    """y[b, c] = sum of the k largest W[c, i] x[b, i] (+ bias); saves x, W and the (B, out, k) indices.

    ``backend``: a kernel backend from :mod:`.kernels.backends` (torch-level blocks or numba loops)."""

    @staticmethod
    def forward(ctx, x, weight, bias, k, positive_only, backend):
        out, indices = backend.linear_forward(x, weight, k, positive_only)
        if bias is not None:
            out += bias
        ctx.save_for_backward(x, weight, indices)
        ctx.positive_only = positive_only
        ctx.has_bias = bias is not None
        ctx.backend = backend
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, weight, indices = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        grad_b = grad_out.sum(0) if (ctx.has_bias and need_b) else None
        grad_x, grad_w = ctx.backend.linear_backward(x, weight, indices, grad_out, ctx.positive_only, need_x, need_w)
        return grad_x, grad_w, grad_b, None, None, None


def _products(x, weight, positive_only):
    """(B, out, in) products; with ``positive_only`` the non-positive ones are 0 and pass no gradient
    (unlike clamp's, a zero product's gradient is 0 too)."""
    products = x.unsqueeze(1) * weight.unsqueeze(0)
    if positive_only:
        products = torch.where(products > 0, products, torch.zeros_like(products))
    return products


def _topk_linear_reference(x, weight, bias, k, positive_only):
    out = _products(x, weight, positive_only).topk(k, dim=-1, sorted=False).values.sum(-1)
    return out if bias is None else out + bias


class SoftTopKLinearFunction(torch.autograd.Function):
    """The soft relaxation of Dynamic-k and its analytic gradient, block of (samples, output rows) by
    block (each block's temporaries within the memory budget, so they stay in cache and no (B, out, in)
    tensor is ever built); backward recomputes the products rather than saving them.

    ``y[b, c] = sum_i s_i p_i`` with ``p_i = weight[c, i] x[b, i]`` (zeroed where not positive under
    ``positive_only``: a hard gate, as in the exact layer) and ``s_i = sigmoid((p_i - t) / tau)``,
    (t, tau) per row from :func:`~.bpda.gate_parameters` and held fixed, so
    ``dy / dp_i = s_i + s_i (1 - s_i) p_i / tau``."""

    @staticmethod
    def forward(ctx, x, weight, k, positive_only, tau):
        batch, fan_out = x.shape[0], weight.shape[0]
        out = x.new_empty(batch, fan_out)
        thresholds = x.new_empty(batch, fan_out, 1)
        taus = x.new_empty(batch, fan_out, 1)
        for b0, b1, r0, r1 in _soft_blocks(x, weight):
            products = _products(x[b0:b1], weight[r0:r1], positive_only)
            threshold, row_tau = gate_parameters(products, k, tau)
            gate = torch.sub(products, threshold).div_(row_tau).sigmoid_()
            out[b0:b1, r0:r1] = gate.mul_(products).sum(-1)
            thresholds[b0:b1, r0:r1], taus[b0:b1, r0:r1] = threshold, row_tau
        ctx.save_for_backward(x, weight, thresholds, taus)
        ctx.positive_only = positive_only
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, weight, thresholds, taus = ctx.saved_tensors
        need_x, need_w = ctx.needs_input_grad[:2]
        grad_x = torch.zeros_like(x) if need_x else None
        grad_w = torch.zeros_like(weight) if need_w else None
        for b0, b1, r0, r1 in _soft_blocks(x, weight):
            raw = x[b0:b1, None, :] * weight[None, r0:r1]
            products = torch.where(raw > 0, raw, torch.zeros_like(raw)) if ctx.positive_only else raw
            tau = taus[b0:b1, r0:r1]
            gate = torch.sub(products, thresholds[b0:b1, r0:r1]).div_(tau).sigmoid_()
            slope = (1 - gate).mul_(gate).mul_(products).div_(tau).add_(gate)  # dy/dp, (n, rows, in)
            if ctx.positive_only:
                slope.mul_(raw > 0)
            slope.mul_(grad_out[b0:b1, r0:r1, None])
            if need_w:
                grad_w[r0:r1] += (slope * x[b0:b1, None, :]).sum(0)
            if need_x:
                grad_x[b0:b1] += slope.mul_(weight[None, r0:r1]).sum(1)
        return grad_x, grad_w, None, None, None


def _soft_blocks(x, weight):
    """(b0, b1, r0, r1) blocks of samples and output rows whose products, gate and slope fit the budget."""
    batch, (fan_out, fan_in) = x.shape[0], weight.shape
    rows = units_per_chunk(4 * fan_in * x.element_size(), batch * fan_out)
    samples, rows = (max(1, rows // fan_out), fan_out) if rows >= fan_out else (1, rows)
    for b0, b1 in chunks(batch, samples):
        for r0, r1 in chunks(fan_out, rows):
            yield b0, b1, r0, r1


def _soft_topk_linear(x, weight, bias, k, positive_only, tau):
    """The soft relaxation (:class:`SoftTopKLinearFunction`) plus the bias."""
    out = SoftTopKLinearFunction.apply(x.contiguous(), weight.contiguous(), k, positive_only, tau)
    return out if bias is None else out + bias


def topk_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, k=1,
                positive_only: bool = False, impl: str = "auto") -> torch.Tensor:
    """Dynamic-k: ``y[b, c] = sum of the k largest weight[c, i] * x[b, i]`` (+ bias[c]).

    With ``positive_only`` only positive products count (Algorithm 1's ``|R| <= k`` reading).
    ``impl``: see :mod:`topkconv.functional`. Under :func:`~topkconv.layers.dense_gradients` or
    :func:`~topkconv.layers.soft_gradients` the value is the same, the gradient that of the stand-in.
    """
    impl = check_impl(impl)
    k = resolve_k(k, weight.shape[1])
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])

    def exact():
        if impl == "reference":
            return _topk_linear_reference(x2, weight, bias, k, positive_only)
        if k == weight.shape[1] and not positive_only:
            return F.linear(x2, weight, bias)  # every product is kept
        backend = backends.resolve(impl, x2, weight)
        if not needs_autograd(x2, weight, bias):  # forward only: no Function, nothing saved
            out = backend.linear_values(x2.contiguous(), weight.contiguous(), k, positive_only)
            return out if bias is None else out.add_(bias)
        return TopKLinearFunction.apply(x2.contiguous(), weight.contiguous(), bias, k, positive_only, backend)

    out = route_gradients(exact, lambda: F.linear(x2, weight, bias),
                          lambda tau: _soft_topk_linear(x2, weight, bias, k, positive_only, tau), x2, weight, bias)
    return out.reshape(*lead, weight.shape[0])


def topk_linear_selection(x: torch.Tensor, weight: torch.Tensor, k=1, positive_only: bool = False,
                          impl: str = "auto") -> torch.Tensor:
    """The (B, out, k) input indices that :func:`topk_linear` sums for ``x`` (B, in), any order
    within a row; found by the same kernel as the forward pass."""
    impl = check_impl(impl)
    k = resolve_k(k, weight.shape[1])
    with torch.no_grad():
        if impl == "reference":
            return _products(x, weight, positive_only).topk(k, dim=-1, sorted=False).indices
        if k == weight.shape[1]:
            return torch.arange(k, device=x.device).expand(x.shape[0], weight.shape[0], k)
        x, weight = x.contiguous(), weight.contiguous()
        return backends.resolve(impl, x, weight).linear_forward(x, weight, k, positive_only)[1].long()


class TopKLinear(nn.Linear):
    """Dynamic-k fully connected layer (Sun, Ravi and Singh 2019; Algorithm 1 of the paper).

    Per sample and output unit, the sum of the ``k`` largest signed products ``weight[c, i] * x[i]``
    plus the bias. ``k`` is a count in 1..in_features or a fraction in (0, 1]. Exactly ``k`` products
    are summed, as in the original code; ``positive_only=True`` keeps only positive ones (``|R| <= k``).
    Parameters are those of ``nn.Linear``, so a dense state_dict loads as it is.

    ``impl``: ``"auto"`` (default) runs the numba loops on CPU float32/float64 tensors and the
    chunked torch-level kernels elsewhere (CUDA, half precision, numba missing); ``"torch"`` always
    the torch-level kernels, ``"numba"`` always the loops; all are bounded by
    :func:`topkconv.functional.set_memory_budget`. ``"reference"`` is the materialising formula.
    """

    def __init__(self, in_features: int, out_features: int, k: KSpec, bias: bool = True,
                 positive_only: bool = False, impl: str = "auto", device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.k = resolve_k(k, in_features)
        self.positive_only = positive_only
        self.impl = check_impl(impl)

    @classmethod
    def from_dense(cls, layer: nn.Linear, k: KSpec, positive_only: bool = False, impl: str = "auto") -> "TopKLinear":
        """A TopKLinear that shares ``layer``'s weight and bias Parameters (no copy: same device and
        dtype, and training one trains the other), with k a count or a fraction of its in_features."""
        if not isinstance(layer, nn.Linear):
            raise ValueError(f"{cls.__name__}.from_dense needs an nn.Linear, got {type(layer).__name__}")
        routed = cls(layer.in_features, layer.out_features, k, bias=layer.bias is not None,
                     positive_only=positive_only, impl=impl, device="meta", dtype=layer.weight.dtype)
        routed.weight = layer.weight
        if layer.bias is not None:
            routed.bias = layer.bias
        return routed.train(layer.training)

    from_linear = from_dense

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return topk_linear(x, self.weight, self.bias, self.k, self.positive_only, self.impl)

    def selection(self, x: torch.Tensor) -> torch.Tensor:
        """(B, out, k) indices of the input features summed per sample and output unit (leading dims
        of ``x`` flattened into B). Under ``positive_only`` some may carry a zero product."""
        return topk_linear_selection(x.reshape(-1, self.in_features), self.weight, self.k, self.positive_only,
                                     self.impl)

    def selection_mask(self, x: torch.Tensor) -> torch.Tensor:
        """(B, out, in) True where a product is routed; under ``positive_only`` only the positive
        selected products (those that really reach the output)."""
        x2 = x.reshape(-1, self.in_features)
        chosen = self.selection(x2)
        mask = torch.zeros(x2.shape[0], self.out_features, self.in_features, dtype=torch.bool, device=x.device)
        mask.scatter_(2, chosen, True)
        if self.positive_only:
            with torch.no_grad():
                mask &= _products(x2, self.weight, False) > 0
        return mask

    def extra_repr(self) -> str:
        extra = ", positive_only=True" if self.positive_only else ""
        return f"{super().extra_repr()}, k={self.k}{extra}"
