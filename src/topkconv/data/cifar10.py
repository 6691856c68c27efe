"""CIFAR-10 from its local "python version" folder (``data_batch_1..5``, ``test_batch``, ``batches.meta``).

The files are pickles by the data set's design, and a pickle can run code. They are read with
:class:`BatchUnpickler`, which rebuilds only what a CIFAR-10 batch holds (dicts, lists, bytes, strings,
numbers, numpy arrays and their dtypes) and refuses any other object, naming the file.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import numpy as np
import torch

from ..config import DataConfig
from .splits import DataSplits, TensorSplit, channel_stats, require_root

TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILE = "test_batch"
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def load_cifar10(cfg: DataConfig) -> DataSplits:
    root = require_root(cfg, "CIFAR-10 (cifar-10-batches-py)", "data_batch_1..5 and test_batch")
    train_x, train_y = _read_batches([root / name for name in TRAIN_FILES])
    test_x, test_y = _read_batches([root / TEST_FILE])
    train_x, train_y = train_x[:cfg.limit_train], train_y[:cfg.limit_train]
    test_x, test_y = test_x[:cfg.limit_test], test_y[:cfg.limit_test]
    mean, std = channel_stats(train_x)
    return DataSplits(name="cifar10", classes=_class_names(root), in_channels=3, mean=mean, std=std,
                      image_size=cfg.image_size, train=TensorSplit(train_x, train_y, cfg.image_size),
                      test=TensorSplit(test_x, test_y, cfg.image_size))


def _read_batches(paths) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = [], []
    for path in paths:
        data, labels = read_batch(path)
        xs.append(data)
        ys.append(labels)
    return torch.cat(xs), torch.cat(ys)


# The only globals a CIFAR-10 pickle names: numpy's array and scalar reconstructors (numpy 1 and 2 paths;
# _frombuffer is how protocol 5 writes an array).
ALLOWED_GLOBALS = frozenset({
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
})


class BatchUnpickler(pickle.Unpickler):
    """An unpickler that resolves only :data:`ALLOWED_GLOBALS`; any other global is refused before it runs."""

    def find_class(self, module: str, name: str):
        if (module, name) in ALLOWED_GLOBALS:
            return super().find_class(module, name)
        if (module, name) == ("_codecs", "encode"):  # how Python 3 writes bytes at protocol 2
            return _latin1_bytes
        raise pickle.UnpicklingError(f"refused to load {module}.{name}: a CIFAR-10 batch holds only dicts, lists, "
                                     f"bytes, strings, numbers and numpy arrays")


def _latin1_bytes(text: str, encoding: str) -> bytes:
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise pickle.UnpicklingError(f"refused to load _codecs.encode with {encoding!r}")
    return text.encode("latin1")


def load_pickle(path: Path, what: str):
    """Unpickle ``path`` with :class:`BatchUnpickler`; any failure is a ValueError naming the file."""
    try:
        return BatchUnpickler(io.BytesIO(path.read_bytes()), encoding="bytes").load()
    except Exception as err:  # unpickling raises many types for a foreign file
        raise ValueError(f"{path}: not a {what} ({type(err).__name__}: {err})") from None


def read_batch(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """One CIFAR-10 pickle -> uint8 (N, 3, 32, 32) images and long labels; a wrong file is named."""
    if not path.is_file():
        raise FileNotFoundError(f"CIFAR-10 file not found: {path}")
    batch = load_pickle(path, "CIFAR-10 pickle")
    if not isinstance(batch, dict):
        raise ValueError(f"{path}: expected a pickled dict with 'data' and 'labels', got {type(batch).__name__}")
    data, labels = _get(batch, "data"), _get(batch, "labels")
    if data is None or labels is None:
        raise ValueError(f"{path}: expected keys 'data' and 'labels', found {sorted(map(str, batch))}")
    data = np.asarray(data)
    labels = np.asarray(labels)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data):
        raise ValueError(f"{path}: expected uint8 data of shape (N, 3072) and N labels, got {data.dtype} "
                         f"{data.shape} and {len(labels)} labels")
    if len(labels) and (labels.min() < 0 or labels.max() >= len(CLASSES)):
        raise ValueError(f"{path}: labels must lie in 0..9, found {labels.min()}..{labels.max()}")
    return torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()), torch.from_numpy(labels.astype(np.int64))


def _get(batch: dict, key: str):
    return batch.get(key.encode(), batch.get(key))


def _class_names(root: Path) -> list:
    meta = root / "batches.meta"
    if not meta.is_file():
        return list(CLASSES)
    record = load_pickle(meta, "CIFAR-10 meta pickle")
    names = _get(record, "label_names") if isinstance(record, dict) else None
    if not names or len(names) != len(CLASSES):
        raise ValueError(f"{meta}: expected 10 'label_names'")
    return [n.decode() if isinstance(n, bytes) else str(n) for n in names]
