"""TopKConv (Algorithm 2): channel-wise top-k routing in the last convolutions, on top of Dynamic-k."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Union

from torch import nn

from ..layers import TopKConv2d
from . import dynamic_k
from .layer_swap import convert_layers, layers_in_order
from .options import check_choice, check_count, check_k_value
from .registry import Defense, LayerRouting, register

CRITERIA = ("max", "sum")


@dataclass
class TopKConvConfig(dynamic_k.DynamicKConfig):
    kind: str = field(default="topk_conv", init=False)
    conv_layers: int = field(default=2, metadata={"help": "topk_conv/tkc_neuron: how many of the last convs are routed"})
    conv_k: Union[int, float] = field(default=0.1, metadata={
        "help": "topk_conv/tkc_neuron: k, a count or a fraction of the channels"})
    criterion: str = field(default="max", metadata={"help": "topk_conv/tkc_neuron: channel score",
                                                     "choices": CRITERIA})

    def __post_init__(self):
        super().__post_init__()
        check_count(self.conv_layers, "defense.conv_layers")
        check_k_value(self.conv_k, "defense.conv_k")
        check_choice(self.criterion, CRITERIA, "defense.criterion")


def route_convs(model: nn.Module, cfg: TopKConvConfig, layer_type: type, fan: Callable[[nn.Module], int]) -> None:
    """Swap the last ``cfg.conv_layers`` convs (definition order) for ``layer_type``, then route the FC layers."""
    convs = layers_in_order(model, nn.Conv2d)
    if not 1 <= cfg.conv_layers <= len(convs):
        raise ValueError(f"defense.conv_layers must lie in 1..{len(convs)} (the model's convs), "
                         f"got {cfg.conv_layers!r}")
    chosen = convs[-cfg.conv_layers:]
    convert_layers(model, chosen, [cfg.conv_k] * len(chosen), layer_type, fan, ["defense.conv_k"] * len(chosen),
                   criterion=cfg.criterion)
    dynamic_k.apply(model, cfg)


def conv_routing_defense(name: str, config: type, layer_type: type, fan: Callable[[nn.Module], int],
                         description: str) -> Defense:
    """The registry entry of a conv-routing defence on top of Dynamic-k (TopKConv, TKC-neuron)."""
    def apply(model: nn.Module, cfg) -> nn.Module:
        route_convs(model, cfg, layer_type, fan)
        return model

    return Defense(name, config, apply, routing=True, layer_types=(layer_type,),
                   adaptive_attacks=dynamic_k.ROUTING_ATTACKS,
                   layer_routing=LayerRouting(nn.Conv2d, layer_type, fan, options=("criterion",)),
                   description=description)


def _in_channels(conv: nn.Conv2d) -> int:
    return conv.in_channels


TOPK_CONV = register(conv_routing_defense(
    "topk_conv", TopKConvConfig, TopKConv2d, _in_channels,
    "TopKConv in the last convs (k of the input channels), on top of Dynamic-k"))
