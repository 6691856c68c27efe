"""Load torchvision's ImageNet VGG16 weights (``vgg16-397923af.pth``) into a model's ``features``.

The file is a plain state_dict, read with ``weights_only=True`` (no code runs). Only the conv weights
are used: the paper's classifier (25088 -> 512 -> classes) has no ImageNet counterpart. Routed convs
(TopKConv2d, TopKNeuronConv2d) subclass ``nn.Conv2d`` and share its parameter names, so the same file
loads whatever the defence.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn


def load_pretrained_vgg16(model: nn.Module, path) -> list[str]:
    """Copy ``features.*`` conv weights from ``path`` into ``model.features``; returns the keys loaded.

    Raises FileNotFoundError for a missing file and ValueError naming the file and the key for a file
    that is not a state_dict, a key the model needs but the file lacks, or a shape that differs.
    """
    path = Path(os.fspath(path))
    if not path.is_file():
        raise FileNotFoundError(f"pretrained weights file not found: {path} "
                                f"(expected torchvision's vgg16-397923af.pth, a plain state_dict)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for a corrupt or foreign file
        from ..errors import without_unsafe_advice

        raise ValueError(f"{path}: cannot read as a PyTorch state_dict ({without_unsafe_advice(err)})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a plain state_dict of tensors (torchvision's vgg16-397923af.pth)")
    features = getattr(model, "features", None)
    if not isinstance(features, nn.Sequential):
        raise ValueError("the model has no `features` Sequential to load VGG16 weights into")
    wanted = {f"features.{name}": param for name, param in features.state_dict(keep_vars=True).items()
              if isinstance(features[int(name.split(".")[0])], nn.Conv2d)}
    if not wanted:
        raise ValueError("the model's `features` has no conv layers")
    for key, param in wanted.items():
        if key not in state:
            raise ValueError(f"{path}: missing key {key!r} (is the model arch 'vgg16' and the file torchvision's "
                             f"VGG16 without batch norm?)")
        if tuple(state[key].shape) != tuple(param.shape):
            raise ValueError(f"{path}: key {key!r} has shape {tuple(state[key].shape)}, the model expects "
                             f"{tuple(param.shape)}")
    with torch.no_grad():
        for key, param in wanted.items():
            param.copy_(state[key])
    return sorted(wanted)
