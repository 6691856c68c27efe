"""The undefended model: the architecture as it is built."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from .registry import Defense, register


@dataclass
class StandardConfig:
    kind: str = field(default="standard", init=False)


def apply(model: nn.Module, cfg: StandardConfig) -> nn.Module:
    return model


STANDARD = register(Defense("standard", StandardConfig, apply, description="no defence"))
