"""TopKConv (Algorithm 2 of the paper): its functional form, the channel maps and scores it routes by,
its autograd Function and its module."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from ._args import check_criterion, check_impl, resolve_k
from ._routed_conv import RoutedConv2d
from .bpda import checkpointed_chunks, needs_autograd, route_gradients, soft_gate
from .kernels import backends


def channel_maps(x, weight, stride=1, padding=0, dilation=1):
    """A[b, c, i] = conv(x[b, i], weight[c, i]): shape (B, out, in, H', W'). Memory-hungry by nature."""
    out_ch, in_ch, kh, kw = weight.shape
    depthwise = weight.transpose(0, 1).reshape(in_ch * out_ch, 1, kh, kw)
    a = F.conv2d(x, depthwise, None, stride, padding, dilation, groups=in_ch)
    return a.reshape(x.shape[0], in_ch, out_ch, a.shape[-2], a.shape[-1]).transpose(1, 2)


def channel_scores(a: torch.Tensor, criterion: str) -> torch.Tensor:
    """The spatial max or sum of maps (..., H, W): the score a channel is routed by."""
    return a.amax(dim=(-2, -1)) if criterion == "max" else a.sum(dim=(-2, -1))


class TopKConv2dFunction(torch.autograd.Function):
    """TopKConv forward and backward; saves x, W and the (B, out, k) selected input channels.

    ``backend``: a kernel backend from :mod:`.kernels.backends` (torch-level blocks or numba loops)."""

    @staticmethod
    def forward(ctx, x, weight, bias, k, criterion, stride, padding, dilation, backend):
        out, indices = backend.conv_forward(x, weight, k, criterion, stride, padding, dilation)
        if bias is not None:
            out += bias.view(1, -1, 1, 1)
        ctx.save_for_backward(x, weight, indices)
        ctx.geometry = (stride, padding, dilation)
        ctx.has_bias = bias is not None
        ctx.backend = backend
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, weight, indices = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        grad_x, grad_w = ctx.backend.conv_backward(x, weight, indices, grad_out, *ctx.geometry, need_x, need_w)
        grad_b = grad_out.sum((0, 2, 3)) if (ctx.has_bias and need_b) else None
        return grad_x, grad_w, grad_b, None, None, None, None, None, None


def _topk_conv2d_reference(x, weight, bias, k, criterion, stride, padding, dilation):
    a = channel_maps(x, weight, stride, padding, dilation)
    selected = channel_scores(a.detach(), criterion).topk(k, dim=2, sorted=False).indices
    mask = torch.zeros(a.shape[:3], dtype=a.dtype, device=a.device).scatter_(2, selected, 1.0)
    out = (a * mask[..., None, None]).sum(2)
    return out if bias is None else out + bias.view(1, -1, 1, 1)


def _soft_topk_conv2d(x, weight, bias, k, criterion, stride, padding, dilation, tau):
    """The soft relaxation: ``sum_i sigmoid((s_i - t) / tau) A_i`` over each (sample, output channel)
    row of channel maps A and their scores s, in checkpointed chunks of samples."""
    def samples(xs, w):
        a = channel_maps(xs, w, stride, padding, dilation)
        return (a * soft_gate(channel_scores(a, criterion), k, tau)[..., None, None]).sum(2)

    # maps, gated maps and their gradient, per sample (the input's size standing in for the output's)
    per_sample = 3 * weight.shape[0] * weight.shape[1] * x.shape[-2] * x.shape[-1] * x.element_size()
    out = checkpointed_chunks(samples, x, per_sample, weight)
    return out if bias is None else out + bias.view(1, -1, 1, 1)


def topk_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, k=1,
                criterion: str = "max", stride=1, padding=0, dilation=1, impl: str = "auto") -> torch.Tensor:
    """TopKConv: per sample and output channel, sum the k input-channel maps with the best score.

    ``impl``: see :mod:`topkconv.functional`. Under :func:`~topkconv.layers.dense_gradients` or
    :func:`~topkconv.layers.soft_gradients` the value is the same, the gradient that of the stand-in."""
    impl = check_impl(impl)
    check_criterion(criterion)
    k = resolve_k(k, weight.shape[1])

    def exact():
        if impl == "reference" or isinstance(padding, str):  # string padding: only the reference handles it
            return _topk_conv2d_reference(x, weight, bias, k, criterion, stride, padding, dilation)
        if k == weight.shape[1]:
            return F.conv2d(x, weight, bias, stride, padding, dilation)  # every map is kept
        backend = backends.resolve(impl, x, weight)
        if not needs_autograd(x, weight, bias):  # forward only: no Function, nothing saved
            out = backend.conv_forward(x.contiguous(), weight.contiguous(), k, criterion, stride, padding, dilation)[0]
            return out if bias is None else out.add_(bias.view(1, -1, 1, 1))
        return TopKConv2dFunction.apply(x.contiguous(), weight.contiguous(), bias, k, criterion, stride, padding,
                                        dilation, backend)

    return route_gradients(
        exact, lambda: F.conv2d(x, weight, bias, stride, padding, dilation),
        lambda tau: _soft_topk_conv2d(x, weight, bias, k, criterion, stride, padding, dilation, tau),
        x, weight, bias)


def topk_conv2d_selection(x: torch.Tensor, weight: torch.Tensor, k=1, criterion: str = "max", stride=1, padding=0,
                          dilation=1, impl: str = "auto") -> torch.Tensor:
    """The (B, out, k) input channels that :func:`topk_conv2d` sums for ``x``, any order within a row;
    found by the same kernel as the forward pass."""
    impl = check_impl(impl)
    check_criterion(criterion)
    k = resolve_k(k, weight.shape[1])
    batch, (out_ch, in_ch) = x.shape[0], weight.shape[:2]
    with torch.no_grad():
        if impl == "reference" or isinstance(padding, str):
            scores = channel_scores(channel_maps(x, weight, stride, padding, dilation), criterion)
            return scores.topk(k, dim=2, sorted=False).indices
        if k == in_ch:
            return torch.arange(k, device=x.device).expand(batch, out_ch, k)
        x, weight = x.contiguous(), weight.contiguous()
        backend = backends.resolve(impl, x, weight)
        return backend.conv_forward(x, weight, k, criterion, stride, padding, dilation)[1].long()


class TopKConv2d(RoutedConv2d):
    """TopKConv (Algorithm 2): channel-wise Dynamic-k routing inside a convolution.

    ``TopKConv2d(in_channels, out_channels, kernel_size, k, criterion="max", stride=1, padding=0,
    dilation=1, bias=True, impl="auto")``. For each sample and output channel c, the map
    ``A[c, i] = conv(x[i], weight[c, i])`` of every input channel i is scored by its spatial max
    (``criterion="max"``) or sum (``"sum"``); the ``k`` best maps are summed and the bias added. ``k``
    counts input channels (or is a fraction of them). With ``k = in_channels`` it equals ``nn.Conv2d``.
    ``TopKConv2d.from_conv(conv, k)`` converts a dense ``nn.Conv2d``, sharing its parameters.

    ``impl``: ``"auto"`` (default) runs the numba loops on CPU float32/float64 tensors and the
    chunked torch-level kernels elsewhere (CUDA, half precision, numba missing); ``"torch"`` always
    the torch-level kernels, ``"numba"`` always the loops; all are bounded by
    :func:`topkconv.functional.set_memory_budget`. ``"reference"`` is the materialising formula.
    """

    k_counts = "in"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return topk_conv2d(x, self.weight, self.bias, self.k, self.criterion, self.stride, self.padding,
                           self.dilation, self.impl)

    def selection(self, x: torch.Tensor) -> torch.Tensor:
        """(B, out, k) indices of the input channels summed per sample and output channel."""
        return topk_conv2d_selection(x, self.weight, self.k, self.criterion, self.stride, self.padding,
                                     self.dilation, self.impl)

    def selection_mask(self, x: torch.Tensor) -> torch.Tensor:
        """(B, out, in) True where an input channel's map is summed into an output channel."""
        mask = torch.zeros(x.shape[0], self.out_channels, self.in_channels, dtype=torch.bool, device=x.device)
        return mask.scatter_(2, self.selection(x), True)
