"""Image-folder data sets, streamed from disk: CINIC-10 and any ``root/<class>/*.png|jpg`` tree."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import torch

from ..config import DataConfig
from .cifar10 import CLASSES as CINIC_CLASSES
from .splits import DataSplits, FileSplit, channel_stats, require_root

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
# BayesWatch/cinic-10 (see REFERENCE.md).
CINIC_MEAN = [0.47889522, 0.47227842, 0.43047404]
CINIC_STD = [0.24205776, 0.23828046, 0.25874835]
CINIC_TRAIN_IMAGES = 90_000  # train/ (valid/ holds another 90,000, test/ 90,000)
STATS_SAMPLE = 256  # images read to estimate mean and std of an arbitrary folder


def load_cinic10(cfg: DataConfig) -> DataSplits:
    """``root/{train,test}/<10 classes>/*.png`` (``valid/`` is not used). Mean and std are CINIC-10's own."""
    root = require_root(cfg, "CINIC-10", "train/, valid/ and test/ with the class folders")
    train = _split(cfg, scan(root / "train", CINIC_CLASSES), cfg.limit_train)
    test = _split(cfg, scan(root / "test", CINIC_CLASSES), cfg.limit_test)
    return DataSplits(name="cinic10", classes=list(CINIC_CLASSES), in_channels=3, mean=list(CINIC_MEAN),
                      std=list(CINIC_STD), image_size=cfg.image_size, train=train, test=test)


def load_imagefolder(cfg: DataConfig) -> DataSplits:
    """``root/train/<class>`` + ``root/test/<class>``, or ``root/<class>`` split 80/20 (stratified, seeded)."""
    root = require_root(cfg, "image folder")
    if (root / "train").is_dir() and (root / "test").is_dir():
        classes = class_folders(root / "train")
        train_files = scan(root / "train", classes)
        test_files = scan(root / "test", classes)
    else:
        from sklearn.model_selection import train_test_split

        classes = class_folders(root)
        files, labels = scan(root, classes)
        if min(labels.bincount().tolist()) < 2:
            raise ValueError(f"{root}: every class folder needs at least 2 images to split into train and test")
        tr, te = train_test_split(list(range(len(files))), test_size=0.2, stratify=labels.numpy(),
                                  random_state=cfg.split_seed)
        train_files = ([files[i] for i in tr], labels[tr])
        test_files = ([files[i] for i in te], labels[te])
    train = _split(cfg, train_files, cfg.limit_train)
    test = _split(cfg, test_files, cfg.limit_test)
    sample = train.tensors(STATS_SAMPLE)[0]  # the split is already shuffled, so its head is a fair sample
    mean, std = channel_stats(sample)
    return DataSplits(name="imagefolder", classes=classes, in_channels=3, mean=mean, std=std,
                      image_size=cfg.image_size, train=train, test=test)



def class_folders(folder: Path) -> list:
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise ValueError(f"{folder}: no class folders found (expected {folder}/<class>/*.png)")
    return classes


def scan(folder: Path, classes: Sequence[str]) -> tuple[list, torch.Tensor]:
    """All image files under ``folder/<class>``, sorted, with their class index. Errors name the folder."""
    if not folder.is_dir():
        raise FileNotFoundError(f"folder not found: {folder} (expected class folders {list(classes)})")
    files, labels = [], []
    for index, name in enumerate(classes):
        class_dir = folder / name
        if not class_dir.is_dir():
            raise FileNotFoundError(f"class folder not found: {class_dir}")
        images = sorted(p for p in class_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not images:
            raise ValueError(f"class folder is empty: {class_dir} (expected *.png or *.jpg images)")
        files += images
        labels += [index] * len(images)
    return files, torch.tensor(labels, dtype=torch.long)


def _split(cfg: DataConfig, files_labels, limit: Optional[int]) -> FileSplit:
    files, labels = files_labels
    # Files come sorted by class; a seeded shuffle makes any prefix (limit_*) a mix of classes.
    order = torch.randperm(len(files), generator=torch.Generator().manual_seed(cfg.split_seed))[:limit]
    return FileSplit([files[i] for i in order.tolist()], labels[order], cfg.image_size, channels=3,
                     workers=cfg.workers)
