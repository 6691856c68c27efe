"""``torchvision:NAME`` architectures: any torchvision classifier, built with ``weights=None``.

torchvision is the optional ``vision`` extra (``pip install topkconv[vision]``). The classifier gets
``num_classes`` from the spec and sits behind the project's :class:`Normalize` (inputs in [0, 1]); a
one-channel data set (digits) is repeated to the three channels torchvision's models expect.
"""

from __future__ import annotations

import torch
from torch import nn

from .normalize import Normalize

TORCHVISION_PREFIX = "torchvision:"


class TorchvisionClassifier(nn.Module):
    """``Normalize -> (channel repeat) -> net``; keys ``normalize.*`` and ``net.*``."""

    def __init__(self, normalize: Normalize, net: nn.Module, repeat_channels: int = 1):
        super().__init__()
        self.normalize = normalize
        self.net = net
        self.repeat_channels = repeat_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.normalize(x)
        if self.repeat_channels > 1:
            x = x.expand(-1, self.repeat_channels, -1, -1)
        return self.net(x)


def build_torchvision(name: str, cfg) -> nn.Module:
    """torchvision's classifier ``name`` (e.g. ``resnet18``), freshly initialised, with ``cfg.num_classes``."""
    try:
        import torchvision
    except ImportError:
        raise ValueError(f"model.arch={cfg.arch!r} needs torchvision: pip install 'topkconv[vision]'") from None
    names = torchvision.models.list_models(module=torchvision.models)
    if name not in names:
        raise ValueError(f"model.arch={cfg.arch!r}: torchvision has no classifier {name!r} "
                         f"(e.g. {', '.join(sorted(names)[:8])} ...)")
    if cfg.in_channels not in (1, 3):
        raise ValueError(f"model.arch={cfg.arch!r}: torchvision classifiers take 3 channels (1 is repeated), "
                         f"got model.in_channels={cfg.in_channels}")
    net = torchvision.models.get_model(name, weights=None, num_classes=cfg.num_classes)
    return TorchvisionClassifier(Normalize(cfg.mean, cfg.std), net, repeat_channels=3 if cfg.in_channels == 1 else 1)
