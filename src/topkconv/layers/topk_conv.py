from __future__ import annotations

from ._routed_conv import RoutedConv2d


class TopKConv2d(RoutedConv2d):
    """TopKConv (Algorithm 2): channel-wise Dynamic-k routing inside a convolution.

    ``TopKConv2d(in_channels, out_channels, kernel_size, k, criterion="max", stride=1, padding=0,
    dilation=1, bias=True, impl="auto")``. For each sample and output channel c, the map
    ``A[c, i] = conv(x[i], weight[c, i])`` of every input channel i is scored by its spatial max
    (``criterion="max"``) or sum (``"sum"``); the ``k`` best maps are summed and the bias added. ``k``
    counts input channels (or is a fraction of them). With ``k = in_channels`` it equals ``nn.Conv2d``.

    ``impl``: ``"auto"`` (default) and ``"fast"`` use the chunked exact kernels, bounded by
    :func:`topkconv.functional.set_memory_budget`; ``"reference"`` is the materialising formula.
    """

    k_counts = "in"
    routing = "topk_conv2d"
