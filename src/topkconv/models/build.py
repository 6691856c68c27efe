"""Build a model from a :class:`~topkconv.config.ModelConfig`: one branch per defence.

A defence only swaps layers; the key names stay those of the standard model (convs at torchvision's
``features`` indices when there is no BatchNorm, FC layers at ``classifier.0`` and ``classifier.3``), so dense weights, pretrained
weights and pruning masks load into every variant.
"""

from __future__ import annotations

from torch import nn

from ..config import DefenseConfig, ModelConfig
from ..layers import StochasticActivationPruning, TopKConv2d, TopKLinear, TopKNeuronConv2d, resolve_k
from .normalize import Normalize
from .vgg import PLANS, VGG, feature_shape, init_weights, scale_plan

DEFENSES = ("standard", "dropout", "dynamic_k", "topk_conv", "tkc_neuron", "sap", "pruned")
ROUTED_FC = {"final": 1, "final2": 2}


def build_model(cfg: ModelConfig) -> VGG:
    """The model for ``cfg``, freshly initialised (pretrained weights are loaded by the trainer)."""
    if cfg.arch not in PLANS:
        raise ValueError(f"model.arch must be one of {sorted(PLANS)}, got {cfg.arch!r}")
    defense = cfg.defense
    if defense.kind not in DEFENSES:
        raise ValueError(f"defense.kind must be one of {DEFENSES}, got {defense.kind!r}")
    if len(cfg.mean) != cfg.in_channels or len(cfg.std) != cfg.in_channels:
        raise ValueError(f"model.mean and model.std need model.in_channels={cfg.in_channels} values, "
                         f"got {cfg.mean} and {cfg.std}")
    plan = PLANS[cfg.arch] if cfg.arch == "vgg16" else scale_plan(PLANS[cfg.arch], cfg.width)
    channels, height, width = feature_shape(plan, cfg.image_size)
    features = _features(plan, cfg.in_channels, defense, uses_batch_norm(cfg))
    classifier = _classifier(channels * height * width, cfg.hidden, cfg.num_classes, defense)
    model = VGG(Normalize(cfg.mean, cfg.std), features, classifier)
    init_weights(model)
    return model


def uses_batch_norm(cfg: ModelConfig) -> bool:
    """vgg16 follows torchvision's BatchNorm-free VGG16 (its ImageNet weights); vgg-small, trained from
    scratch, has BatchNorm, without which SGD sits on a plateau for epochs and Dynamic-k barely learns."""
    if cfg.batch_norm is None:
        return cfg.arch == "vgg-small"
    if not isinstance(cfg.batch_norm, bool):
        raise ValueError(f"model.batch_norm must be true, false or unset, got {cfg.batch_norm!r}")
    return cfg.batch_norm


def _features(plan, in_channels: int, defense: DefenseConfig, batch_norm: bool) -> nn.Sequential:
    conv_count = sum(1 for v in plan if v != "M")
    routed_from = conv_count  # index (among convs) of the first routed conv
    if defense.kind in ("topk_conv", "tkc_neuron"):
        if not isinstance(defense.conv_layers, int) or not 1 <= defense.conv_layers <= conv_count:
            raise ValueError(f"defense.conv_layers must lie in 1..{conv_count}, got {defense.conv_layers!r}")
        routed_from = conv_count - defense.conv_layers
    layers: list[nn.Module] = []
    conv_index = 0
    for v in plan:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            continue
        if conv_index >= routed_from:
            layers.append(_routed_conv(in_channels, v, defense))
        else:
            layers.append(nn.Conv2d(in_channels, v, kernel_size=3, padding=1))
        if batch_norm:
            layers.append(nn.BatchNorm2d(v))
        layers.append(_relu(defense))
        in_channels = v
        conv_index += 1
    return nn.Sequential(*layers)


def _routed_conv(in_channels: int, out_channels: int, defense: DefenseConfig) -> nn.Conv2d:
    layer = TopKConv2d if defense.kind == "topk_conv" else TopKNeuronConv2d
    fan = in_channels if defense.kind == "topk_conv" else out_channels
    try:
        resolve_k(defense.conv_k, fan, "defense.conv_k")
    except ValueError as err:
        raise ValueError(f"{err} (for {layer.__name__} {in_channels}->{out_channels})") from None
    return layer(in_channels, out_channels, kernel_size=3, k=defense.conv_k, criterion=defense.criterion,
                 padding=1)


def _relu(defense: DefenseConfig) -> nn.Module:
    if defense.kind != "sap":
        return nn.ReLU()
    # ReLU and SAP share one slot, so a SAP model keeps the standard model's parameter names.
    return nn.Sequential(nn.ReLU(), StochasticActivationPruning(defense.sap_frac))


def _classifier(flat: int, hidden: int, num_classes: int, defense: DefenseConfig) -> nn.Sequential:
    """``[FC, ReLU, Dropout-or-Identity, FC]``: the FC layers sit at indices 0 and 3 whatever the defence."""
    fans = [(flat, hidden), (hidden, num_classes)]
    ks = _fc_ks(fans, defense)
    fcs = []
    for (fan_in, fan_out), k in zip(fans, ks):
        if k is None:
            fcs.append(nn.Linear(fan_in, fan_out))
        else:
            fcs.append(TopKLinear(fan_in, fan_out, k=k, positive_only=defense.positive_only))
    middle = nn.Dropout(defense.dropout_p) if defense.kind == "dropout" else nn.Identity()
    if defense.kind == "dropout" and not 0.0 <= defense.dropout_p < 1.0:
        raise ValueError(f"defense.dropout_p must lie in [0, 1), got {defense.dropout_p!r}")
    return nn.Sequential(fcs[0], _relu(defense), middle, fcs[1])


def _fc_ks(fans, defense: DefenseConfig) -> list:
    """k per FC layer (None = dense). Dynamic-k also backs TopKConv and TKC-neuron, as in the paper."""
    if defense.kind not in ("dynamic_k", "topk_conv", "tkc_neuron"):
        return [None] * len(fans)
    if defense.fc_scope not in ROUTED_FC:
        raise ValueError(f"defense.fc_scope must be one of {sorted(ROUTED_FC)}, got {defense.fc_scope!r}")
    routed = ROUTED_FC[defense.fc_scope]
    fc_k = list(defense.fc_k)
    # fc_k has one entry per FC layer; with scope "final" a single entry (for the last layer) also works.
    if len(fc_k) == len(fans):
        fc_k = fc_k[len(fans) - routed:]
    if len(fc_k) != routed:
        raise ValueError(f"defense.fc_k needs {len(fans)} values (one per FC layer) or {routed} for "
                         f"fc_scope={defense.fc_scope!r}, got {defense.fc_k}")
    ks = [None] * (len(fans) - routed) + fc_k
    for i, ((fan_in, _), k) in enumerate(zip(fans, ks)):
        if k is None:
            continue
        try:
            resolve_k(k, fan_in, f"defense.fc_k[{i}]")
        except ValueError as err:
            raise ValueError(f"{err}; FC layer {i} has {fan_in} inputs: give a count up to {fan_in} or a "
                             f"fraction (the paper keeps 250 of 25088, about 0.01)") from None
    return ks
