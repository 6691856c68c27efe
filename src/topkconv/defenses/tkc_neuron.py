"""TKC-neuron: the last convolutions keep only their k strongest output channels, on top of Dynamic-k."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from ..layers import TopKNeuronConv2d
from .registry import register
from .topk_conv import TopKConvConfig, conv_routing_defense


@dataclass
class TKCNeuronConfig(TopKConvConfig):
    """TopKConv's options; ``conv_k`` counts output channels."""

    kind: str = field(default="tkc_neuron", init=False)


def _out_channels(conv: nn.Conv2d) -> int:
    return conv.out_channels


TKC_NEURON = register(conv_routing_defense(
    "tkc_neuron", TKCNeuronConfig, TopKNeuronConv2d, _out_channels,
    "TKC-neuron in the last convs (k of the output channels), on top of Dynamic-k"))
