"""A data set's splits behind one interface, whether held in memory or streamed from files.

Both kinds plan an epoch the same way (:func:`plan_epoch`): one permutation from the epoch's generator,
cut into global batches; under DDP each rank takes every ``world_size``-th image of each global batch,
so N processes see exactly the batches one process would, split N ways.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np
import torch

from .transforms import AugmentParams, resize, to_float


@dataclass
class BatchPlan:
    indices: torch.Tensor                 # this rank's image indices
    augment: Optional[AugmentParams]      # this rank's crops and flips, or None


def plan_epoch(n: int, batch_size: int, *, shuffle: bool, augment: bool, image_size: int, flip: bool,
               generator: Optional[torch.Generator], rank: int = 0, world_size: int = 1,
               even: bool = True) -> list[BatchPlan]:
    """The batches of one epoch for ``rank``.

    With ``even`` (training) the last, short batch is cut to a multiple of ``world_size`` so every rank
    holds the same number of images and averaging gradients over ranks equals the global mean; for
    evaluation (``even=False``) nothing is dropped and a rank may get a smaller, even empty, share.
    """
    if batch_size < world_size or batch_size % world_size:
        raise ValueError(f"train.batch_size={batch_size} must be a multiple of the number of processes ({world_size})")
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    plans = []
    for start in range(0, n, batch_size):
        batch = order[start:start + batch_size]
        if even:
            batch = batch[:len(batch) - len(batch) % world_size]
        if len(batch) == 0:
            continue
        params = AugmentParams(len(batch), image_size, generator, flip) if augment else None
        mine = torch.arange(rank, len(batch), world_size)
        if len(mine) == 0:
            continue
        plans.append(BatchPlan(batch[mine], params.select(mine) if params is not None else None))
    return plans


class TensorSplit:
    """Images held as one tensor (uint8 or float, at their stored size); resized per batch."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, image_size: int, flip: bool = True):
        if images.dim() != 4 or len(images) != len(labels):
            raise ValueError(f"expected (N, C, H, W) images and N labels, got {tuple(images.shape)} and {len(labels)}")
        self.images = images
        self.labels = labels.long()
        self.image_size = image_size
        self.flip = flip

    def __len__(self) -> int:
        return len(self.labels)

    def batches(self, batch_size: int, *, shuffle: bool = False, augment: bool = False,
                generator: Optional[torch.Generator] = None, rank: int = 0, world_size: int = 1,
                even: bool = True) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for plan in plan_epoch(len(self), batch_size, shuffle=shuffle, augment=augment, image_size=self.image_size,
                               flip=self.flip, generator=generator, rank=rank, world_size=world_size, even=even):
            x = resize(to_float(self.images[plan.indices]), self.image_size)
            if plan.augment is not None:
                x = plan.augment.apply(x)
            yield x, self.labels[plan.indices]

    def num_batches(self, batch_size: int, world_size: int = 1) -> int:
        return _num_batches(len(self), batch_size, world_size)

    def tensors(self, limit: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
        n = len(self) if limit is None else min(limit, len(self))
        return resize(to_float(self.images[:n]), self.image_size), self.labels[:n].clone()


class ImageFiles(torch.utils.data.Dataset):
    """Image files read with PIL, as float (C, size, size) tensors in [0, 1]; errors name the file."""

    def __init__(self, files: Sequence[Path], labels: Sequence[int], image_size: int, channels: int = 3):
        self.files = list(files)
        self.labels = torch.as_tensor(list(labels), dtype=torch.long)
        self.image_size = image_size
        self.mode = {1: "L", 3: "RGB"}[channels]

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int):
        return read_image(self.files[index], self.mode, self.image_size), self.labels[index]


def read_image(path: Path, mode: str, image_size: int) -> torch.Tensor:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            array = np.asarray(img.convert(mode), dtype=np.uint8)
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as err:
        raise ValueError(f"{path}: cannot read image ({type(err).__name__}: {err})") from None
    if array.ndim == 2:
        array = array[:, :, None]
    image = torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255.0)
    return resize(image[None], image_size)[0]


class FileSplit:
    """Images streamed from files through a DataLoader with workers; same interface as TensorSplit."""

    def __init__(self, files: Sequence[Path], labels: Sequence[int], image_size: int, channels: int = 3,
                 flip: bool = True, workers: int = 2):
        self.dataset = ImageFiles(files, labels, image_size, channels)
        self.image_size = image_size
        self.flip = flip
        self.workers = workers

    @property
    def labels(self) -> torch.Tensor:
        return self.dataset.labels

    def __len__(self) -> int:
        return len(self.dataset)

    def _loader(self, index_batches: list[torch.Tensor]):
        workers = min(self.workers, os.cpu_count() or 1)
        return torch.utils.data.DataLoader(self.dataset, batch_sampler=[b.tolist() for b in index_batches],
                                           num_workers=workers, persistent_workers=False,
                                           pin_memory=torch.cuda.is_available())

    def batches(self, batch_size: int, *, shuffle: bool = False, augment: bool = False,
                generator: Optional[torch.Generator] = None, rank: int = 0, world_size: int = 1,
                even: bool = True) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        plans = plan_epoch(len(self), batch_size, shuffle=shuffle, augment=augment, image_size=self.image_size,
                           flip=self.flip, generator=generator, rank=rank, world_size=world_size, even=even)
        for plan, (x, y) in zip(plans, worker_errors(self._loader([p.indices for p in plans]))):
            yield (plan.augment.apply(x) if plan.augment is not None else x), y

    def num_batches(self, batch_size: int, world_size: int = 1) -> int:
        return _num_batches(len(self), batch_size, world_size)

    def tensors(self, limit: Optional[int] = None, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
        n = len(self) if limit is None else min(limit, len(self))
        xs, ys = [], []
        for x, y in worker_errors(self._loader(list(torch.arange(n).split(batch_size)))):
            xs.append(x)
            ys.append(y)
        if not xs:
            return torch.empty(0, len(self.dataset.mode), self.image_size, self.image_size), torch.empty(0, dtype=torch.long)
        return torch.cat(xs), torch.cat(ys)


def worker_errors(batches):
    """Iterate a DataLoader; an error raised in a worker reaches the caller as the worker's own message.

    DataLoader re-raises a worker's exception with the worker's whole traceback as its message; the
    original message (which names the file) is its last line, after the exception type.
    """
    try:
        yield from batches
    except Exception as err:
        lines = [line for line in str(err).splitlines() if line.strip()]
        if len(lines) < 2 or "DataLoader worker" not in lines[0]:
            raise
        last = lines[-1]
        prefix = f"{type(err).__name__}: "
        try:
            error = type(err)(last[len(prefix):] if last.startswith(prefix) else last)
        except Exception:  # an exception type that needs other arguments
            raise err from None
        raise error from None


def _num_batches(n: int, batch_size: int, world_size: int) -> int:
    full, rest = divmod(n, batch_size)
    return full + (1 if rest >= world_size else 0)


@dataclass
class DataSplits:
    """A loaded data set: the train and test splits plus what the model needs to know about them."""

    name: str
    classes: list
    in_channels: int
    mean: list
    std: list
    image_size: int
    train: object                        # TensorSplit or FileSplit
    test: object
    flip: bool = True                    # horizontal flips suit photos, not digits
    info: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def test_tensors(self, limit: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Test images as one float tensor in [0, 1] (N, C, H, W) and long labels."""
        return self.test.tensors(limit)


def channel_stats(images: torch.Tensor, chunk: int = 4096) -> tuple[list, list]:
    """Per-channel mean and std of (N, C, H, W) images (uint8 or float in [0, 1]), in float64 chunks."""
    total = torch.zeros(images.shape[1], dtype=torch.float64)
    total_sq = torch.zeros_like(total)
    for part in images.split(chunk):
        part = to_float(part).double()
        total += part.sum(dim=(0, 2, 3))
        total_sq += part.pow(2).sum(dim=(0, 2, 3))
    count = images.shape[0] * images.shape[2] * images.shape[3]
    mean = total / count
    std = (total_sq / count - mean.pow(2)).clamp_min(1e-12).sqrt()
    return [round(v, 6) for v in mean.tolist()], [round(max(v, 1e-3), 6) for v in std.tolist()]


def validation_split(labels: torch.Tensor, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices ``(train, validation)`` of a fixed hold-out of ``size`` examples, stratified by label.

    The same ``labels``, ``size`` and ``seed`` give the same split on every machine (scikit-learn's seeded
    ``train_test_split``, as digits' test split); both halves are sorted, so a ``limit`` keeps file order.
    """
    from sklearn.model_selection import train_test_split

    if not 0 < size < len(labels):
        raise ValueError(f"a validation split needs 0 < size < {len(labels)} examples, got {size}")
    train_idx, val_idx = train_test_split(np.arange(len(labels)), test_size=size, stratify=labels.numpy(),
                                          random_state=seed)
    return torch.from_numpy(np.sort(train_idx)), torch.from_numpy(np.sort(val_idx))


def require_root(cfg, what: str, expected: str = "") -> Path:
    """``cfg.root`` as a Path; a missing setting or folder is an error naming it and what belongs there."""
    if not cfg.root:
        raise ValueError(f"data.root is required for {cfg.name}: the {what} folder")
    root = Path(cfg.root)
    if not root.is_dir():
        raise FileNotFoundError(f"{what} folder not found: {root}" + (f" (expected {expected})" if expected else ""))
    return root
