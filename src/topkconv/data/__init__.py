"""Data sets for training and evaluation: ``load_data(cfg) -> DataSplits``.

| name | source |
| --- | --- |
| ``digits`` | scikit-learn's handwritten digits (embedded; 1 channel, upsampled to ``image_size``) |
| ``fashion-mnist`` | the four IDX files of Fashion-MNIST (``data.root``, else Debian's ``dataset-fashion-mnist``), in memory |
| ``fashion-mnist-val`` | the same training images less a fixed 5,000-image validation split, tested on that split |
| ``cifar10`` | a local "python version" folder (``data_batch_1..5``, ``test_batch``), held in memory |
| ``cinic10`` | ``root/{train,test}/<class>/*.png``, streamed with DataLoader workers |
| ``imagefolder`` | ``root/<class>/*`` (split 80/20) or ``root/{train,test}/<class>/*``, streamed |

Every split has ``batches(batch_size, shuffle=, augment=, generator=, rank=, world_size=)`` yielding float
images in [0, 1] at ``image_size`` with long labels, ``tensors(limit)`` and ``num_batches(batch_size)``.
"""

from __future__ import annotations

from ..config import DataConfig
from .cifar10 import load_cifar10
from .digits import load_digits
from .fashion_mnist import load_fashion_mnist, load_fashion_mnist_validation
from .folders import load_cinic10, load_imagefolder
from .splits import DataSplits, FileSplit, TensorSplit, channel_stats, plan_epoch, validation_split
from .transforms import AugmentParams, resize

LOADERS = {"digits": load_digits, "fashion-mnist": load_fashion_mnist, "fashion-mnist-val": load_fashion_mnist_validation,
           "cifar10": load_cifar10, "cinic10": load_cinic10, "imagefolder": load_imagefolder}


def load_data(cfg: DataConfig) -> DataSplits:
    if cfg.name not in LOADERS:
        raise ValueError(f"data.name must be one of {sorted(LOADERS)}, got {cfg.name!r}")
    if not isinstance(cfg.image_size, int) or cfg.image_size < 1:
        raise ValueError(f"data.image_size must be a positive int, got {cfg.image_size!r}")
    for key in ("limit_train", "limit_test"):
        value = getattr(cfg, key)
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f"data.{key} must be a positive int or None, got {value!r}")
    if not isinstance(cfg.workers, int) or isinstance(cfg.workers, bool) or cfg.workers < 0:
        raise ValueError(f"data.workers must be 0 (load in this process) or more, got {cfg.workers!r}")
    return LOADERS[cfg.name](cfg)


__all__ = ["load_data", "DataSplits", "TensorSplit", "FileSplit", "AugmentParams", "plan_epoch", "resize",
           "channel_stats", "validation_split", "LOADERS"]
