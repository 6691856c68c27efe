"""VGG plans and the model shell: ``Normalize -> features -> flatten -> classifier``.

``features`` follows torchvision's layout exactly (a flat Sequential of conv, ReLU and max-pool), so
torchvision's ImageNet weights load by key (``features.0.weight`` ... ``features.28.bias``). There is no
average pool: the paper flattens the 512x7x7 map of a 224 px input straight into 25088 features.
"""

from __future__ import annotations

import math
from statistics import NormalDist
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
    """He init (fan-in, ReLU gain) for every conv and the hidden FC layer, PyTorch's default for the last;
    then Dynamic-k layers are scaled down by :func:`topk_sum_gain`.

    Without BatchNorm (vgg16) the init alone keeps the signal alive through the depth. torchvision's
    fan-out conv init with N(0, 0.01) FC layers shrinks the logits of a 32 px digits model to ~0.05 and
    SGD barely moves it.
    """
    from ..layers import TopKLinear

    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    for module in model.modules():
        if isinstance(module, nn.Conv2d) or (isinstance(module, nn.Linear) and module is not linears[-1]):
            nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
            nn.init.zeros_(module.bias)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, TopKLinear):
                module.weight.div_(topk_sum_gain(module.k, module.in_features))


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
