from __future__ import annotations

import torch
from torch import nn

from .. import functional as TF
from ._args import KSpec, check_criterion, resolve_k


class TopKConv2d(nn.Conv2d):
    """TopKConv (Algorithm 2): channel-wise Dynamic-k routing inside a convolution.

    For each sample and output channel c, the map ``A[c, i] = conv(x[i], weight[c, i])`` of every
    input channel i is scored by its spatial max (``criterion="max"``) or sum (``"sum"``); the ``k``
    best maps are summed and the bias added. With ``k = in_channels`` it equals ``nn.Conv2d``.

    ``impl``: ``"auto"`` (default) and ``"fast"`` use the chunked exact kernels, bounded by
    :func:`topkconv.functional.set_memory_budget`; ``"reference"`` is the materialising formula.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, k: KSpec, criterion: str = "max",
                 stride=1, padding=0, dilation=1, bias: bool = True, impl: str = "auto",
                 device=None, dtype=None):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                         dilation=dilation, bias=bias, device=device, dtype=dtype)
        if not isinstance(padding, (int, tuple)):
            raise ValueError(f"padding must be an int or a tuple, got {padding!r}")
        self.k = resolve_k(k, in_channels)
        self.criterion = check_criterion(criterion)
        self.impl = TF._check_impl(impl)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return TF.topk_conv2d(x, self.weight, self.bias, self.k, self.criterion,
                              self.stride, self.padding, self.dilation, self.impl)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, k={self.k}, criterion={self.criterion!r}"
