"""The small digits CNN (trained_models.trained_cnn's layout) trained plainly and adversarially, through the
library's own training step (:func:`topkconv.train.train_one_epoch`), once per process: the positive control
for the adversarial-training and binarization tests.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

import trained_models
from topkconv.config import AdversarialConfig
from topkconv.train import train_one_epoch

# Digits sit on a 1/16 grid and are nearly binary: 8/255 barely moves them, so the control is trained and
# attacked at 32/255, where a plain CNN falls far under PGD (measured: 0.19 of 300 test digits left).
EPS = 32.0          # 0-255 units
EPOCHS = 10
BATCH = 100


def small_cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1, stride=2),
                         nn.ReLU(), nn.Flatten(), nn.Linear(16 * 4 * 4, 10))


@functools.lru_cache(maxsize=None)
def trained(method: str = "none", eps: float = EPS, steps: int = 5) -> nn.Module:
    """The CNN after ``EPOCHS`` epochs of Adam (lr 0.01) on the 1,400 training digits, trained on
    ``method``'s adversarial examples ("none": clean images); the same seed for every method."""
    x, y, _, _ = trained_models.digits_split()
    torch.manual_seed(0)
    model = small_cnn()
    optimizer = torch.optim.Adam(model.parameters(), 1e-2)
    adversarial = AdversarialConfig(method=method, eps=eps, steps=steps)
    order_generator = torch.Generator().manual_seed(0)
    for _ in range(EPOCHS):
        order = torch.randperm(len(y), generator=order_generator)
        batches = [(x[index], y[index]) for index in order.split(BATCH)]
        train_one_epoch(model, batches, optimizer, adversarial=adversarial)
    return model.eval()
