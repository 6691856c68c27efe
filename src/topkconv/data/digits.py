"""The embedded default: scikit-learn's 1,797 real 8x8 handwritten digits, upsampled on the fly."""

from __future__ import annotations

import torch

from ..config import DataConfig
from .splits import DataSplits, TensorSplit, channel_stats
from .transforms import resize

TEST_FRACTION = 0.2


def load_digits(cfg: DataConfig) -> DataSplits:
    from sklearn.datasets import load_digits as sklearn_digits
    from sklearn.model_selection import train_test_split

    bunch = sklearn_digits()
    images = torch.from_numpy(bunch.images).float().div_(16.0).unsqueeze(1)  # 0..16 -> [0, 1], (N, 1, 8, 8)
    labels = torch.from_numpy(bunch.target).long()
    # A fixed, stratified split: every class keeps its share in both halves, whatever the seed.
    train_idx, test_idx = train_test_split(torch.arange(len(labels)).numpy(), test_size=TEST_FRACTION,
                                           stratify=labels.numpy(), random_state=cfg.split_seed)
    train_idx, test_idx = torch.from_numpy(train_idx), torch.from_numpy(test_idx)
    train_idx, test_idx = train_idx[:cfg.limit_train], test_idx[:cfg.limit_test]
    train = TensorSplit(images[train_idx], labels[train_idx], cfg.image_size, flip=False)
    test = TensorSplit(images[test_idx], labels[test_idx], cfg.image_size, flip=False)
    # Statistics of the images as the model sees them (after upsampling, which smooths them).
    mean, std = channel_stats(resize(images[train_idx], cfg.image_size))
    return DataSplits(name="digits", classes=[str(d) for d in range(10)], in_channels=1, mean=mean, std=std,
                      image_size=cfg.image_size, train=train, test=test, flip=False)
