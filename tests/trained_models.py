"""Tiny models trained offline on scikit-learn's 8x8 digits, once per process (cached builders).

Tests get them through the fixtures of conftest.py; only code that runs outside pytest's fixture system
(the worker processes of the sharding test) calls these builders directly.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from topkconv.layers import StochasticActivationPruning, TopKLinear


@functools.lru_cache(maxsize=None)
def digits_split():
    """(x_train, y_train, x_test, y_test): 1,400 training and 300 test images in [0, 1], shape (N, 1, 8, 8)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    train, test = order[:1400], order[1400:1700]
    return x[train], y[train], x[test], y[test]


def eval_data():
    return digits_split()[2:]


def fit(model: nn.Module, steps: int = 150, lr: float = 1e-2, seed: int = 0) -> nn.Module:
    """Full-batch Adam on the training split; returns the model in eval mode."""
    torch.manual_seed(seed)
    x, y, _, _ = digits_split()
    optimiser = torch.optim.Adam(model.parameters(), lr)
    model.train()
    for _ in range(steps):
        optimiser.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimiser.step()
    return model.eval()


@functools.lru_cache(maxsize=None)
def trained_mlp() -> nn.Module:
    torch.manual_seed(0)
    return fit(nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)))


@functools.lru_cache(maxsize=None)
def trained_surrogate() -> nn.Module:
    """A second plain model (other seed, other width): the 'undefended baseline' for transfer."""
    torch.manual_seed(1)
    return fit(nn.Sequential(nn.Flatten(), nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 10)), seed=1)


@functools.lru_cache(maxsize=None)
def trained_cnn() -> nn.Module:
    """A plain CNN: two 3x3 convs (the second with stride 2) and a linear head."""
    torch.manual_seed(4)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1, stride=2),
                          nn.ReLU(), nn.Flatten(), nn.Linear(16 * 4 * 4, 10))
    return fit(model, steps=120, seed=4)


@functools.lru_cache(maxsize=None)
def trained_sap() -> nn.Module:
    """MLP with SAP after its hidden ReLU (SAP acts in eval mode only, so it trains as a plain MLP)."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(),
                          StochasticActivationPruning(frac=0.3), nn.Linear(64, 10))
    return fit(model, seed=2)


@functools.lru_cache(maxsize=None)
def trained_routing() -> nn.Module:
    """Dynamic-k MLP: the plain MLP's hidden layer as a TopKLinear (k = 16 of 64 products per unit),
    fine-tuned briefly (the top-k layer is the slow part to train on a CPU)."""
    base = trained_mlp()
    routed = TopKLinear(64, 64, k=16)
    routed.load_state_dict(base[1].state_dict())
    head = nn.Linear(64, 10)
    head.load_state_dict(base[3].state_dict())
    return fit(nn.Sequential(nn.Flatten(), routed, nn.ReLU(), head), steps=30, seed=3)
