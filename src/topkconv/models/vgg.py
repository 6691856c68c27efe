"""VGG plans and the model shell: ``Normalize -> features -> flatten -> classifier``.

``features`` follows torchvision's layout exactly (a flat Sequential of conv, ReLU and max-pool), so
torchvision's ImageNet weights load by key (``features.0.weight`` ... ``features.28.bias``). There is no
average pool: the paper flattens the 512x7x7 map of a 224 px input straight into 25088 features.
"""

from __future__ import annotations

from typing import Sequence, Union

import torch
from torch import nn

from .normalize import Normalize

Plan = Sequence[Union[int, str]]

# torchvision's plan "D" (VGG16): 13 convs at features.{0,2,5,7,10,12,14,17,19,21,24,26,28}.
VGG16_PLAN: Plan = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")

# The CPU model: 8 convs at a quarter of VGG's widths (times ModelConfig.width), 4 pools. At 32 px the
# last two convs still see a 4x4 map, so TopKConv's spatial-max criterion has something to rank, and
# the flatten is 256 x 2 x 2 = 1024 features.
VGG_SMALL_PLAN: Plan = (32, 32, "M", 64, 64, "M", 128, 128, "M", 256, 256, "M")

PLANS = {"vgg16": VGG16_PLAN, "vgg-small": VGG_SMALL_PLAN}


def scale_plan(plan: Plan, width: float) -> list:
    if not width > 0:
        raise ValueError(f"model.width must be positive, got {width!r}")
    return [v if v == "M" else max(1, round(v * width)) for v in plan]


def feature_shape(plan: Plan, image_size: int) -> tuple[int, int, int]:
    """(channels, height, width) of the feature map: 3x3 convs with padding 1 keep the size, pools halve it."""
    size = image_size
    channels = None
    for v in plan:
        if v == "M":
            size //= 2
        else:
            channels = v
    if size < 1:
        pools = sum(1 for v in plan if v == "M")
        raise ValueError(f"model.image_size={image_size} is too small for {pools} max-pools "
                         f"(needs at least {2 ** pools} px)")
    return channels, size, size


class VGG(nn.Module):
    """A VGG with normalisation inside: input images are in [0, 1]."""

    def __init__(self, normalize: Normalize, features: nn.Sequential, classifier: nn.Sequential):
        super().__init__()
        self.normalize = normalize
        self.features = features
        self.classifier = classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(self.normalize(x)), 1))


def init_weights(model: nn.Module) -> None:
    """He init (fan-in, ReLU gain) for every conv and the hidden FC layer, PyTorch's default for the last.

    Without BatchNorm (vgg16) the init alone keeps the signal alive through the depth. torchvision's
    fan-out conv init with N(0, 0.01) FC layers shrinks the logits of a 32 px digits model to ~0.05 and
    SGD barely moves it. (Dynamic-k layers are rescaled by the defence, ``defenses.dynamic_k.topk_sum_gain``.)
    """
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    for module in model.modules():
        if isinstance(module, nn.Conv2d) or (isinstance(module, nn.Linear) and module is not linears[-1]):
            nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
            nn.init.zeros_(module.bias)
