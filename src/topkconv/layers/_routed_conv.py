"""The shared shell of the two routing convolutions: ``nn.Conv2d``'s parameters plus k and a criterion,
and the conversion from a dense ``nn.Conv2d``. Each subclass calls its own functional form."""

from __future__ import annotations

from torch import nn

from ._args import KSpec, check_criterion, check_impl, resolve_k


def _explicit_padding(layer: nn.Conv2d, owner: str):
    """``layer.padding`` as ints: "valid" is 0, "same" the symmetric padding that keeps the size."""
    padding = layer.padding
    if padding == "valid":
        return 0
    if padding == "same":
        total = [d * (k - 1) for d, k in zip(layer.dilation, layer.kernel_size)]
        if any(t % 2 for t in total):
            raise ValueError(f"{owner}: padding='same' of {layer} needs asymmetric padding (an even kernel "
                             f"extent), which the routing kernels do not support; pad the input explicitly")
        return tuple(t // 2 for t in total)
    return padding


class RoutedConv2d(nn.Conv2d):
    """``k_counts``: whether k counts "in" (input) or "out" (output) channels."""

    k_counts = "in"

    def __init__(self, in_channels: int, out_channels: int, kernel_size, k: KSpec, criterion: str = "max",
                 stride=1, padding=0, dilation=1, bias: bool = True, impl: str = "auto",
                 device=None, dtype=None):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                         dilation=dilation, bias=bias, device=device, dtype=dtype)
        if not isinstance(padding, (int, tuple)):
            raise ValueError(f"padding must be an int or a tuple, got {padding!r}")
        self.k = resolve_k(k, in_channels if self.k_counts == "in" else out_channels)
        self.criterion = check_criterion(criterion)
        self.impl = check_impl(impl)

    @classmethod
    def from_dense(cls, layer: nn.Conv2d, k: KSpec, criterion: str = "max", impl: str = "auto"):
        """A routing convolution that shares ``layer``'s weight and bias Parameters (no copy: same
        device and dtype, and training one trains the other) and keeps its kernel size, stride,
        padding and dilation. ``k`` is a count or a fraction of the channels it counts.

        Raises ValueError, naming the layer, for a grouped or depthwise conv (``groups != 1``) or a
        padding mode other than "zeros"."""
        owner = f"{cls.__name__}.from_dense"
        if not isinstance(layer, nn.Conv2d):
            raise ValueError(f"{owner} needs an nn.Conv2d, got {type(layer).__name__}")
        if layer.groups != 1:
            raise ValueError(f"{owner}: {layer} has groups={layer.groups}; top-k routing needs groups=1 "
                             f"(every output channel sees every input channel)")
        if layer.padding_mode != "zeros":
            raise ValueError(f"{owner}: {layer} has padding_mode={layer.padding_mode!r}; only 'zeros' is "
                             f"supported by the routing kernels")
        routed = cls(layer.in_channels, layer.out_channels, layer.kernel_size, k, criterion,
                     stride=layer.stride, padding=_explicit_padding(layer, owner), dilation=layer.dilation,
                     bias=layer.bias is not None, impl=impl, device="meta", dtype=layer.weight.dtype)
        routed.weight = layer.weight
        if layer.bias is not None:
            routed.bias = layer.bias
        return routed.train(layer.training)

    from_conv = from_dense

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, k={self.k}, criterion={self.criterion!r}"
