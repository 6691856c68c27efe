"""Models: VGG16 (the paper's variant), a small VGG for 32 px CPU runs and any torchvision classifier
(``torchvision:NAME``, the optional ``vision`` extra), each with every registered defence.

``build_model(cfg)`` is the base architecture (``Normalize`` first: the input is in [0, 1]) with
``cfg.defense`` applied by :mod:`topkconv.defenses`.
``load_pretrained_vgg16(model, path)`` loads torchvision's ImageNet weights into ``features``.
"""

from .build import ARCHITECTURES, base_model, build_model
from .normalize import Normalize
from .pretrained import load_pretrained_vgg16
from .vgg import PLANS, VGG, VGG16_PLAN, VGG_SMALL_PLAN, feature_shape

__all__ = ["build_model", "base_model", "ARCHITECTURES", "load_pretrained_vgg16", "Normalize", "VGG", "PLANS",
           "VGG16_PLAN", "VGG_SMALL_PLAN", "feature_shape"]
