"""TKC-neuron: a dense convolution that keeps the k best output channels per sample. Its functional
form and its module (autograd of the dense convolution and a mask does the rest)."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ._args import check_criterion, check_impl, resolve_k
from ._routed_conv import RoutedConv2d
from .bpda import gradient_mode, route_gradients, soft_gate
from .topk_conv import channel_scores


def topk_channel_selection(y: torch.Tensor, k: int, criterion: str = "max") -> torch.Tensor:
    """Per sample, the (B, k) output channels of ``y`` with the best spatial score."""
    return channel_scores(y.detach(), criterion).topk(k, dim=1, sorted=False).indices


def topk_channel_mask(y: torch.Tensor, k: int, criterion: str = "max") -> torch.Tensor:
    """Per sample, 1 for the k output channels of ``y`` with the best spatial score, else 0."""
    selected = topk_channel_selection(y, k, criterion)
    return torch.zeros(y.shape[:2], dtype=y.dtype, device=y.device).scatter_(1, selected, 1.0)


def topk_neuron_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, k=1,
                       criterion: str = "max", stride=1, padding=0, dilation=1,
                       impl: str = "auto") -> torch.Tensor:
    """TKC-neuron: a dense convolution whose output keeps only the k best channels per sample.

    Soft relaxation (:func:`~topkconv.layers.soft_gradients`): ``dense * sigmoid((s_c - t) / tau)``
    with s_c the spatial score of output channel c."""
    impl = check_impl(impl)
    check_criterion(criterion)
    k = resolve_k(k, weight.shape[0])
    dense = F.conv2d(x, weight, bias, stride, padding, dilation)
    mask = topk_channel_mask(dense, k, criterion)[..., None, None]

    # In place (exact gradients only: the stand-ins need ``dense`` itself afterwards): the convolution's
    # backward does not need its output, and the product saves only the (B, out) mask, so no second
    # output-sized tensor is kept or even allocated.
    in_place = impl != "reference" and gradient_mode() == "exact"

    def soft(tau):
        return dense * soft_gate(channel_scores(dense, criterion), k, tau)[..., None, None]

    return route_gradients(lambda: dense.mul_(mask) if in_place else dense * mask, lambda: dense, soft,
                           x, weight, bias)


class TopKNeuronConv2d(RoutedConv2d):
    """TKC-neuron: a dense convolution that keeps, per sample, only the ``k`` output channels with the
    largest spatial max (or sum) and zeroes the rest. ``k`` counts output channels.

    Same constructor as :class:`~topkconv.layers.TopKConv2d`, and ``TopKNeuronConv2d.from_conv(conv, k)``.
    ``impl``: ``"auto"``/``"numba"``/``"torch"`` mask the convolution's output in place (only the mask
    is saved for backward; there is no kernel to choose); ``"reference"`` multiplies out of place."""

    k_counts = "out"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return topk_neuron_conv2d(x, self.weight, self.bias, self.k, self.criterion, self.stride, self.padding,
                                  self.dilation, self.impl)

    def selection(self, x: torch.Tensor) -> torch.Tensor:
        """(B, k) indices of the output channels kept per sample."""
        with torch.no_grad():
            dense = F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation)
            return topk_channel_selection(dense, self.k, self.criterion)

    def selection_mask(self, x: torch.Tensor) -> torch.Tensor:
        """(B, out) True for the output channels kept per sample."""
        chosen = self.selection(x)
        return torch.zeros(x.shape[0], self.out_channels, dtype=torch.bool, device=x.device).scatter_(1, chosen, True)
