"""Build a model from a :class:`~topkconv.config.ModelConfig`: the base architecture, then the defence.

``build_model(cfg)`` = ``base_model(cfg)`` (vgg-small | vgg16 | ``torchvision:NAME``, freshly initialised)
then ``REGISTRY[cfg.defense.kind].apply(model, cfg.defense)``. A defence only swaps layers for subclasses
sharing their parameters (or wraps a ReLU in a Sequential slot), so the key names stay those of the
standard model (convs at torchvision's ``features`` indices when there is no BatchNorm, FC layers at
``classifier.0`` and ``classifier.3``): dense weights, pretrained weights and pruning masks load into every
variant.
"""

from __future__ import annotations

from torch import nn

from .. import defenses
from ..config import ModelConfig
from .normalize import Normalize
from .torchvision_arch import TORCHVISION_PREFIX, build_torchvision
from .vgg import PLANS, VGG, feature_shape, init_weights, scale_plan

ARCHITECTURES = tuple(PLANS) + (f"{TORCHVISION_PREFIX}NAME",)


def build_model(cfg: ModelConfig) -> nn.Module:
    """The model for ``cfg``, freshly initialised (pretrained weights are loaded by the trainer)."""
    defense = defenses.get(cfg.defense.kind)
    return defense.apply(base_model(cfg), cfg.defense)


def base_model(cfg: ModelConfig) -> nn.Module:
    """The undefended architecture ``cfg.arch``, initialised."""
    if len(cfg.mean) != cfg.in_channels or len(cfg.std) != cfg.in_channels:
        raise ValueError(f"model.mean and model.std need model.in_channels={cfg.in_channels} values, "
                         f"got {cfg.mean} and {cfg.std}")
    if isinstance(cfg.arch, str) and cfg.arch.startswith(TORCHVISION_PREFIX):
        return build_torchvision(cfg.arch[len(TORCHVISION_PREFIX):], cfg)
    if cfg.arch not in PLANS:
        raise ValueError(f"model.arch must be one of {', '.join(ARCHITECTURES)}, got {cfg.arch!r}")
    if not isinstance(cfg.hidden, int) or cfg.hidden < 1:
        raise ValueError(f"model.hidden (the penultimate FC layer's width) must be a count >= 1, got {cfg.hidden!r}")
    if not cfg.width > 0:
        raise ValueError(f"model.width (the channel width multiplier) must be > 0, got {cfg.width!r}")
    plan = PLANS[cfg.arch] if cfg.arch == "vgg16" else scale_plan(PLANS[cfg.arch], cfg.width)
    channels, height, width = feature_shape(plan, cfg.image_size)
    features = _features(plan, cfg.in_channels, uses_batch_norm(cfg))
    classifier = _classifier(channels * height * width, cfg.hidden, cfg.num_classes)
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


def _features(plan, in_channels: int, batch_norm: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    for v in plan:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            continue
        layers.append(nn.Conv2d(in_channels, v, kernel_size=3, padding=1))
        if batch_norm:
            layers.append(nn.BatchNorm2d(v))
        layers.append(nn.ReLU())
        in_channels = v
    return nn.Sequential(*layers)


def _classifier(flat: int, hidden: int, num_classes: int) -> nn.Sequential:
    """``[FC, ReLU, Identity, FC]``: the FC layers sit at indices 0 and 3, the keys every checkpoint has
    (index 2 held the dropout of earlier versions; the dropout defence now rides on the final FC layer)."""
    return nn.Sequential(nn.Linear(flat, hidden), nn.ReLU(), nn.Identity(), nn.Linear(hidden, num_classes))
