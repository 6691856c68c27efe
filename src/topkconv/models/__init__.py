"""Models: VGG16 (the paper's variant) and a small VGG for 32 px CPU runs, each with every defence.

``build_model(cfg)`` returns ``Normalize -> features -> flatten -> classifier``; the input is in [0, 1].
``load_pretrained_vgg16(model, path)`` loads torchvision's ImageNet weights into ``features``.
"""

from .build import DEFENSES, build_model
from .normalize import Normalize
from .pretrained import load_pretrained_vgg16
from .vgg import PLANS, VGG, VGG16_PLAN, VGG_SMALL_PLAN, feature_shape

__all__ = ["build_model", "load_pretrained_vgg16", "Normalize", "VGG", "PLANS", "VGG16_PLAN", "VGG_SMALL_PLAN",
           "DEFENSES", "feature_shape"]
