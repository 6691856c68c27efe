from __future__ import annotations

from ._routed_conv import RoutedConv2d


class TopKNeuronConv2d(RoutedConv2d):
    """TKC-neuron: a dense convolution that keeps, per sample, only the ``k`` output channels with the
    largest spatial max (or sum) and zeroes the rest. ``k`` counts output channels.

    Same constructor as :class:`TopKConv2d`. ``impl``: ``"auto"``/``"fast"`` mask the convolution's
    output in place (only the mask is saved for backward); ``"reference"`` multiplies out of place."""

    k_counts = "out"
    routing = "topk_neuron_conv2d"
