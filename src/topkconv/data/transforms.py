"""Batched image transforms on tensors: resizing, and the training augmentation.

Augmentation runs on a whole batch at once (as in airbench), driven by an explicit ``torch.Generator``
so a training run, and a resumed one, draws exactly the same crops and flips.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 0..255 or float images -> float32 in [0, 1]."""
    if images.dtype == torch.uint8:
        return images.float().div_(255.0)
    return images.float()


def resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize of (N, C, H, W) float images to size x size (antialiased when shrinking)."""
    if images.shape[-2:] == (size, size):
        return images
    shrinking = images.shape[-1] > size or images.shape[-2] > size
    out = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=shrinking)
    return out.clamp_(0.0, 1.0)


class AugmentParams:
    """Random crop offsets and flips drawn for a whole (global) batch; ``select`` takes one rank's share.

    Drawing for the global batch and slicing makes a run on N processes augment every image exactly as a
    run on one process does.
    """

    def __init__(self, n: int, image_size: int, generator: Optional[torch.Generator], flip: bool = True):
        self.pad = max(1, image_size // 8)
        self.dy = torch.randint(0, 2 * self.pad + 1, (n,), generator=generator)
        self.dx = torch.randint(0, 2 * self.pad + 1, (n,), generator=generator)
        self.flip = (torch.rand(n, generator=generator) < 0.5) if flip else torch.zeros(n, dtype=torch.bool)

    def select(self, positions: torch.Tensor) -> "AugmentParams":
        part = AugmentParams.__new__(AugmentParams)
        part.pad, part.dy, part.dx, part.flip = self.pad, self.dy[positions], self.dx[positions], self.flip[positions]
        return part

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        """Pad each image by ``pad`` pixels (reflected), crop back at its offset, flip where drawn."""
        if images.shape[0] != self.dy.shape[0]:
            raise ValueError(f"augmentation drawn for {self.dy.shape[0]} images, got {images.shape[0]}")
        n, _, h, w = images.shape
        mode = "reflect" if self.pad < min(h, w) else "replicate"  # reflection needs pad < size
        padded = F.pad(images, (self.pad, self.pad, self.pad, self.pad), mode=mode)
        device = images.device
        rows = (self.dy[:, None] + torch.arange(h)).to(device)  # (n, h)
        cols = (self.dx[:, None] + torch.arange(w)).to(device)  # (n, w)
        cols = torch.where(self.flip[:, None].to(device), cols.flip(-1), cols)
        batch = torch.arange(n, device=device)[:, None, None]
        # Advanced indexing puts the indexed dims first: (n, h, w, C), then back to (n, C, h, w).
        out = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]
        return out.permute(0, 3, 1, 2).contiguous()
