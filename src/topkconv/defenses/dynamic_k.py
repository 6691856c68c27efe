"""Dynamic-k (Sun, Ravi and Singh 2019): top-k routing in the last one or two fully connected layers."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import List, Union

import torch
from torch import nn

from ..layers import TopKLinear
from .layer_swap import convert_layers, layers_in_order
from .options import check_choice, check_k_value
from .registry import Defense, LayerRouting, register

KSpec = Union[int, float]

# fc_scope -> how many of the last linear layers are routed
ROUTED_FC = {"final": 1, "final2": 2}

# The adaptive attacks every routing defence calls for: gradients of a top-k selection are piecewise.
ROUTING_ATTACKS = ("bpda_dense", "bpda_soft")


@dataclass
class DynamicKConfig:
    kind: str = field(default="dynamic_k", init=False)
    fc_k: List[KSpec] = field(default_factory=lambda: [250, 10], metadata={
        "help": "Dynamic-k: k per FC layer, a count or a fraction (paper: 250 10)", "metavar": "K"})
    fc_scope: str = field(default="final2", metadata={
        "help": "Dynamic-k in the last FC layer or the last two", "choices": tuple(ROUTED_FC)})
    positive_only: bool = field(default=False, metadata={
        "help": "Dynamic-k: keep only positive products among the top k (the paper's |R| <= k reading)"})

    def __post_init__(self):
        if not isinstance(self.fc_k, (list, tuple)) or not self.fc_k:
            raise ValueError(f"defense.fc_k must be a non-empty list of k values, got {self.fc_k!r}")
        self.fc_k = [check_k_value(k, f"defense.fc_k[{i}]") for i, k in enumerate(self.fc_k)]
        check_choice(self.fc_scope, tuple(ROUTED_FC), "defense.fc_scope")
        if not isinstance(self.positive_only, bool):
            raise ValueError(f"defense.positive_only must be true or false, got {self.positive_only!r}")


def route_linears(model: nn.Module, cfg: DynamicKConfig) -> list[dict]:
    """Swap the last one or two ``nn.Linear`` layers (``cfg.fc_scope``, definition order) for TopKLinear.

    ``cfg.fc_k`` has one k per linear layer of the model, or one per routed layer.
    """
    routed = ROUTED_FC[cfg.fc_scope]
    linears = layers_in_order(model, nn.Linear)
    if len(linears) < routed:
        raise ValueError(f"defense.fc_scope={cfg.fc_scope!r} routes the last {routed} linear layers; "
                         f"the model has {len(linears)}")
    fc_k = list(cfg.fc_k)
    if len(fc_k) == len(linears):
        fc_k = fc_k[len(linears) - routed:]
    if len(fc_k) != routed:
        raise ValueError(f"defense.fc_k needs {len(linears)} values (one per FC layer) or {routed} for "
                         f"fc_scope={cfg.fc_scope!r}, got {cfg.fc_k}")
    first = len(linears) - routed
    names = [f"defense.fc_k[{first + i}] (the paper keeps 250 of 25088 inputs, about 0.01)" for i in range(routed)]
    return convert_layers(model, linears[first:], fc_k, TopKLinear, _fan_in, names,
                          positive_only=cfg.positive_only)


def apply(model: nn.Module, cfg: DynamicKConfig) -> nn.Module:
    """Route the last FC layers, then give each a dense layer's output scale at init (:func:`topk_sum_gain`).

    ``apply`` builds the defence into a freshly initialised model; ``topkconv.convert`` keeps a trained
    model's weights as they are.
    """
    for entry in route_linears(model, cfg):
        layer = model.get_submodule(entry["name"])
        with torch.no_grad():
            layer.weight.div_(topk_sum_gain(layer.k, layer.in_features))
    return model


def topk_sum_gain(k: int, n: int) -> float:
    """How much larger the sum of the k largest of n products is than a dense layer's output, at init.

    For products ~ N(0, s^2), the top k (a fraction q = k/n) sum to about ``k * s * phi(z) / q`` with
    ``z`` the (1 - q) normal quantile, while all n sum to about ``sqrt(n) * s``. Dynamic-k's sum is biased
    upwards: with the paper's 250 of 25088 it is 4x a dense output, and the logits of a freshly built
    model are so large that SGD diverges. Dividing the weights by this gain (never by less than 1) gives
    a Dynamic-k layer a dense layer's output scale at init.
    """
    q = k / n
    if q >= 1.0:
        return 1.0
    normal = NormalDist()
    z = normal.inv_cdf(1.0 - q)
    return max(1.0, k * normal.pdf(z) / q / math.sqrt(n))


def _fan_in(layer: nn.Linear) -> int:
    return layer.in_features


DYNAMIC_K = register(Defense(
    "dynamic_k", DynamicKConfig, apply, routing=True, layer_types=(TopKLinear,), adaptive_attacks=ROUTING_ATTACKS,
    layer_routing=LayerRouting(nn.Linear, TopKLinear, _fan_in, options=("positive_only",)),
    description="top-k routing in the last FC layers"))
