from __future__ import annotations

import torch
from torch import nn

from .. import functional as TF
from ._args import KSpec, check_criterion, resolve_k


class TopKNeuronConv2d(nn.Conv2d):
    """TKC-neuron: a dense convolution that keeps, per sample, only the ``k`` output channels with the
    largest spatial max (or sum) and zeroes the rest. ``k`` counts output channels.

    ``impl``: ``"auto"``/``"fast"`` mask the convolution's output in place (only the mask is saved
    for backward); ``"reference"`` multiplies out of place."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, k: KSpec, criterion: str = "max",
                 stride=1, padding=0, dilation=1, bias: bool = True, impl: str = "auto",
                 device=None, dtype=None):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                         dilation=dilation, bias=bias, device=device, dtype=dtype)
        if not isinstance(padding, (int, tuple)):
            raise ValueError(f"padding must be an int or a tuple, got {padding!r}")
        self.k = resolve_k(k, out_channels)
        self.criterion = check_criterion(criterion)
        self.impl = TF._check_impl(impl)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return TF.topk_neuron_conv2d(x, self.weight, self.bias, self.k, self.criterion,
                                     self.stride, self.padding, self.dilation, self.impl)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, k={self.k}, criterion={self.criterion!r}"
