"""Fashion-MNIST (Xiao, Rasul and Vollgraf 2017) from its four IDX files, gzipped or not.

60,000 training and 10,000 test 28x28 grey-scale photos of 10 kinds of clothing. The files are read
with numpy (nothing is pickled) and held in memory as one uint8 tensor per split. Without ``data.root``
they are looked for where Debian's ``dataset-fashion-mnist`` package installs them.

Two names share the loader:

* ``fashion-mnist``: the 60,000 training images, tested on the 10,000 test images (reported numbers);
* ``fashion-mnist-val``: the training images less a fixed validation split of :data:`VALIDATION_SIZE`
  (stratified, drawn with ``data.split_seed``), tested on that split. Tuning runs use this one, so the
  test set is touched only by the reported numbers.

The 28 px images are zero-padded (their background is black) to ``image_size``, up to 32 px, the
classic LeNet convention that keeps every stroke of the image; above 32 px they are padded to 32 and
then resized, below 28 px resized down.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..config import DataConfig
from .splits import DataSplits, TensorSplit, channel_stats, validation_split

DEBIAN_ROOT = Path("/usr/share/datasets/fashion-mnist")  # `dpkg -L dataset-fashion-mnist`
RELEASE = "github.com/zalandoresearch/fashion-mnist"
FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
         "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
IMAGE_MAGIC, LABEL_MAGIC = 2051, 2049   # IDX: unsigned bytes (0x08) in 3 and in 1 dimensions
SIDE = 28                               # pixels per side of every Fashion-MNIST image
PAD_TO = 32                             # padding beyond this would only shrink the clothes in the frame
VALIDATION_SIZE = 5000                  # held out of the 60,000 training images for tuning


def load_fashion_mnist(cfg: DataConfig) -> DataSplits:
    """``fashion-mnist``: train on the 60,000 training images, test on the 10,000 test images."""
    root = fashion_root(cfg)
    train_x, train_y = read_pair(root, "train")
    test_x, test_y = read_pair(root, "test")
    return _splits(cfg, "fashion-mnist", root, (train_x, train_y), (test_x, test_y), "the test set")


def load_fashion_mnist_validation(cfg: DataConfig) -> DataSplits:
    """``fashion-mnist-val``: train on the training images less the validation split, test on that split."""
    root = fashion_root(cfg)
    images, labels = read_pair(root, "train")
    size = min(VALIDATION_SIZE, len(labels) // 2)  # small hand-written files in tests hold fewer images
    train_idx, val_idx = validation_split(labels, size, cfg.split_seed)
    return _splits(cfg, "fashion-mnist-val", root, (images[train_idx], labels[train_idx]),
                   (images[val_idx], labels[val_idx]),
                   f"the validation split ({len(val_idx)} training images held out, split_seed {cfg.split_seed})")


def _splits(cfg: DataConfig, name: str, root: Path, train: tuple, test: tuple, tested_on: str) -> DataSplits:
    train_x, train_y = fit_to_size(train[0][:cfg.limit_train], cfg.image_size), train[1][:cfg.limit_train]
    test_x, test_y = fit_to_size(test[0][:cfg.limit_test], cfg.image_size), test[1][:cfg.limit_test]
    mean, std = channel_stats(train_x)  # of the padded images, as the model sees them
    return DataSplits(name=name, classes=list(CLASSES), in_channels=1, mean=mean, std=std,
                      image_size=cfg.image_size, train=TensorSplit(train_x, train_y, cfg.image_size),
                      test=TensorSplit(test_x, test_y, cfg.image_size),
                      info={"root": str(root), "tested_on": tested_on})


def fashion_root(cfg: DataConfig) -> Path:
    """``data.root`` (or Debian's folder) holding all four files; else one line naming them and their sources."""
    root = Path(cfg.root) if cfg.root else DEBIAN_ROOT
    missing = [stem for stems in FILES.values() for stem in stems if find_idx(root, stem) is None]
    if missing:
        where = "data.root" if cfg.root else "the default folder, as no data.root was given"
        raise FileNotFoundError(
            f"Fashion-MNIST files not found in {root} ({where}): looked for {', '.join(missing)} (each .gz or not); "
            f"install Debian's package (apt-get install dataset-fashion-mnist, which puts them in {DEBIAN_ROOT}) "
            f"or download the four files of the public release ({RELEASE}) into a folder DIR and set data.root "
            f"(train --data-root DIR, reproduce --data DIR)")
    return root


def find_idx(root: Path, stem: str):
    """``root/stem.gz`` or ``root/stem``, whichever exists (gzipped first, as released); None if neither."""
    for path in (root / f"{stem}.gz", root / stem):
        if path.is_file():
            return path
    return None


def read_pair(root: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """One split's images as uint8 (N, 1, 28, 28) and labels as long (N,); mismatches name the files."""
    image_path, label_path = (find_idx(root, stem) for stem in FILES[split])
    images = read_idx(image_path, IMAGE_MAGIC, 3)
    labels = read_idx(label_path, LABEL_MAGIC, 1)
    if images.shape[1:] != (SIDE, SIDE):
        raise ValueError(f"{image_path}: expected {SIDE}x{SIDE} images, the header says {images.shape[1]}x{images.shape[2]}")
    if len(labels) != len(images):
        raise ValueError(f"{label_path}: holds {len(labels)} labels but {image_path.name} holds {len(images)} images")
    if len(labels) and labels.max() >= len(CLASSES):
        raise ValueError(f"{label_path}: labels must lie in 0..{len(CLASSES) - 1}, found {labels.max()}")
    return torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))


def read_idx(path: Path, magic: int, ndim: int) -> np.ndarray:
    """An IDX file of unsigned bytes: a big-endian header (``magic``, then ``ndim`` sizes), then the data."""
    raw = _read_bytes(path)
    header = 4 * (1 + ndim)
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX file: {len(raw)} bytes, shorter than its {header}-byte header")
    found = int.from_bytes(raw[:4], "big")
    if found != magic:
        raise ValueError(f"{path}: not an IDX file of {ndim}-dimensional unsigned bytes: magic number {found}, "
                         f"expected {magic}")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(dims, dtype=np.int64))
    if len(raw) - header != expected:
        kind = "truncated IDX file" if len(raw) - header < expected else "IDX file longer than its header says"
        raise ValueError(f"{path}: {kind}: the header {dims} needs {expected} data bytes, found {len(raw) - header}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _read_bytes(path: Path) -> bytes:
    """The file's bytes, decompressed when it starts with gzip's magic; a broken gzip names the file."""
    raw = path.read_bytes()
    if raw[:2] != b"\x1f\x8b":
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as err:  # BadGzipFile is an OSError; a cut stream is an EOFError
        raise ValueError(f"{path}: truncated or corrupt gzip file ({type(err).__name__}: {err})") from None


def fit_to_size(images: torch.Tensor, image_size: int) -> torch.Tensor:
    """28 px images zero-padded (centred) to ``min(image_size, 32)``; smaller sizes are left to the resize."""
    target = min(image_size, PAD_TO)
    if target <= images.shape[-1]:
        return images
    before = (target - images.shape[-1]) // 2
    after = target - images.shape[-1] - before
    return F.pad(images, (before, after, before, after))
