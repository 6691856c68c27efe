"""Training: ``fit(spec, run_dir)`` and the pieces it is built from, for reuse (pruning's fine-tuning).

High level
    :func:`fit` trains ``spec`` into ``run_dir`` and returns ``(model, summary)``. It writes
    ``model.safetensors`` and the training state after every epoch, ``metrics.jsonl`` (one line per
    epoch: loss, train and test accuracy, lr, seconds) and, when the last epoch is done, ``run.json``
    (:mod:`topkconv.checkpoint`). ``resume=True`` continues a killed run from its last finished epoch and
    ends with the same weights as an uninterrupted run; with more ``train.epochs`` it extends a finished
    run. A finished run is never replaced unless ``force=True``, and then only once the new run has
    finished its first epoch. Rank 0 holds the folder's lock throughout. Under ``torchrun`` it trains
    data-parallel (:mod:`topkconv.distributed`); only rank 0 writes.

Reusable pieces
    * :func:`resolve_spec` fills the model fields the data decides (channels, classes, size, mean/std).
    * :func:`make_optimizer` (SGD, momentum, weight decay) and :func:`make_scheduler` (cosine or step,
      stepped once per batch) from a :class:`~topkconv.config.TrainConfig`.
    * :func:`epoch_generator` gives the seeded generator that shuffles and augments one epoch.
    * :func:`train_one_epoch` runs one pass over an iterable of ``(x, y)`` batches and returns
      ``{"loss", "train_acc", "n", "steps"}``; it raises :class:`NonFiniteLossError` on a NaN/inf loss.
    * :func:`evaluate_accuracy` scores a split (or ``(x, y)`` tensors) in eval mode.
    * :func:`train_epochs` is the checkpoint-free loop (e.g. fine-tuning selected parameters):
      ``train_epochs(model, splits, train_cfg, params=..., lr=..., epochs=..., augment=...)``.

Scale-out
    One machine, N GPUs (or N CPU processes with gloo)::

        torchrun --nproc_per_node=N -m topkconv.cli train --spec src/topkconv/experiments/... --out runs/x

    Several machines: the same on every node, with ``--nnodes=M --node_rank=i
    --rdzv_backend=c10d --rdzv_endpoint=HOST:PORT`` (the run folder on a shared file system for
    ``--resume``). ``train.batch_size`` is the global batch; each process takes every N-th image of
    each global batch (and its crop and flip), so with a BatchNorm-free model N processes reproduce a
    one-process run; on CUDA BatchNorm becomes SyncBatchNorm. ``train.amp`` turns on bf16 autocast (CUDA).

Determinism and resume
    Nothing draws from hidden random state across epochs: epoch ``e`` shuffles and augments with
    ``epoch_generator(seed, e)`` and reseeds the global generator (dropout) from ``(seed, e, rank)``.
    So the random state at an epoch boundary is a function of the seed and the epoch, and the saved
    state (weights, optimizer, scheduler, epoch) is all a resume needs. The state is stored without
    pickle: tensors in ``state/epoch-NNNN.safetensors``, the rest in ``train_state.json``, which is
    written last and so commits the epoch.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import contextlib
import math
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Iterable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import distributed
from .checkpoint import (METRICS_FILE, MODEL_FILE, RUN_FILE, STAGING_DIR, STATE_DIR, STATE_FILE, clear_run,
                         is_complete, replace_run, run_files, run_lock, save_checkpoint, save_weights, unwrap)
from .config import RunSpec, TrainConfig
from .errors import UserError
from .io import append_jsonl, atomic_save_safetensors, atomic_write_json, atomic_write_text, read_json

SCHEDULES = ("cosine", "step")


class NonFiniteLossError(ValueError):
    """The loss became NaN or infinite; the last good checkpoint is left as it was."""


# ---------------------------------------------------------------- building blocks

def resolve_spec(spec: RunSpec, splits) -> RunSpec:
    """``spec`` with the model fields that the data decides: in_channels, num_classes, image_size, mean, std."""
    model = dataclasses.replace(spec.model, in_channels=splits.in_channels, num_classes=splits.num_classes,
                                image_size=splits.image_size, mean=list(splits.mean), std=list(splits.std))
    return dataclasses.replace(spec, model=model)


def check_train_config(cfg: TrainConfig) -> None:
    if cfg.schedule not in SCHEDULES:
        raise ValueError(f"train.schedule must be one of {SCHEDULES}, got {cfg.schedule!r}")
    for key in ("epochs", "batch_size"):
        value = getattr(cfg, key)
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"train.{key} must be a positive int, got {value!r}")
    if not cfg.lr > 0 or not math.isfinite(cfg.lr):
        raise ValueError(f"train.lr must be a positive number, got {cfg.lr!r}")
    if cfg.schedule == "step" and cfg.step_size < 1:
        raise ValueError(f"train.step_size must be at least 1, got {cfg.step_size!r}")
    if not cfg.warmup_epochs >= 0 or not math.isfinite(cfg.warmup_epochs):
        raise ValueError(f"train.warmup_epochs must be 0 or more, got {cfg.warmup_epochs!r}")


def make_optimizer(params, cfg: TrainConfig, lr: Optional[float] = None) -> torch.optim.SGD:
    """SGD with the config's momentum and weight decay (``lr`` overrides ``cfg.lr``)."""
    return torch.optim.SGD(params, lr=cfg.lr if lr is None else lr, momentum=cfg.momentum,
                           weight_decay=cfg.weight_decay, nesterov=False)


def lr_factor(cfg: TrainConfig, step: int, steps_per_epoch: int, epochs: Optional[int] = None) -> float:
    """The learning-rate multiplier at batch ``step``: linear warm-up, then cosine to 0 or step decay."""
    epochs = cfg.epochs if epochs is None else epochs
    total = max(1, epochs * steps_per_epoch)
    warmup = min(total - 1, int(round(cfg.warmup_epochs * steps_per_epoch)))
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if cfg.schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))
    return cfg.gamma ** ((step // steps_per_epoch) // cfg.step_size)


def make_scheduler(optimizer, cfg: TrainConfig, steps_per_epoch: int, epochs: Optional[int] = None):
    """A per-batch LambdaLR following :func:`lr_factor`."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(cfg, step, steps_per_epoch, epochs))


def epoch_seed(seed: int, *parts: int) -> int:
    """A 63-bit seed derived from ``seed`` and ``parts``; independent streams for different epochs and ranks."""
    digest = hashlib.sha256(json.dumps([seed, *parts]).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The generator that shuffles and augments epoch ``epoch`` (the same on every rank)."""
    return torch.Generator().manual_seed(epoch_seed(seed, epoch))


def _criterion(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), labels)


def train_one_epoch(model: nn.Module, batches: Iterable, optimizer, scheduler=None, *, device="cpu",
                    amp: bool = False, epoch: int = 0, ctx: Optional[distributed.Context] = None,
                    progress: bool = False, total: Optional[int] = None, desc: str = "train") -> dict:
    """One pass of SGD over ``batches`` (``(x, y)`` pairs); returns ``{"loss", "train_acc", "n", "steps"}``.

    The scheduler, when given, steps after every batch. ``epoch`` only labels errors and the progress bar.
    Under DDP the loss and accuracy are summed over all processes every step, so every rank sees a
    non-finite loss at the same step and stops together.
    """
    from tqdm import tqdm

    ctx = ctx or distributed.Context(device=torch.device(device))
    device = torch.device(device)
    model.train()
    totals = torch.zeros(3, dtype=torch.float64)  # loss sum, correct, count
    steps = 0
    bar = tqdm(batches, total=total, desc=desc, disable=not progress, leave=False, file=sys.stderr)
    for step, (x, y) in enumerate(bar):
        x = x.to(device, non_blocking=True)
        y = y.to(device, non_blocking=True)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(x)
        loss = _criterion(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        stats = torch.stack([loss.detach().double() * len(y), (logits.argmax(1) == y).sum().double(),
                             torch.tensor(float(len(y)), dtype=torch.float64, device=loss.device)])
        stats = distributed.all_reduce_sum(stats.to(ctx.device), ctx).cpu()
        if not torch.isfinite(stats[0]):
            raise NonFiniteLossError(f"epoch {epoch + 1}, step {step + 1}: the training loss is "
                                     f"{float(stats[0] / stats[2])}; stopping (lower train.lr?)")
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        totals += stats
        steps += 1
        if progress:
            bar.set_postfix(loss=f"{float(totals[0] / totals[2]):.3f}", acc=f"{float(totals[1] / totals[2]):.3f}")
    if steps == 0:
        raise ValueError("no training batches: the training split is empty or smaller than the number of processes")
    return {"loss": float(totals[0] / totals[2]), "train_acc": float(totals[1] / totals[2]),
            "n": int(totals[2]), "steps": steps}


@torch.no_grad()
def evaluate_accuracy(model: nn.Module, data, *, batch_size: int = 256, device="cpu", limit: Optional[int] = None,
                      ctx: Optional[distributed.Context] = None, amp: bool = False) -> float:
    """Accuracy of ``model`` (in eval mode; its mode is restored) on a split or on ``(x, y)`` tensors.

    Under DDP each process scores its share of every batch and the counts are summed.
    """
    ctx = ctx or distributed.Context(device=torch.device(device))
    device = torch.device(device)
    was_training = model.training
    model.eval()
    if isinstance(data, (tuple, list)):
        batches = _shares(data[0], data[1], limit, batch_size, ctx)
    elif limit is not None and limit < len(data):
        batches = _shares(*data.tensors(limit), None, batch_size, ctx)
    else:  # stream the split (it may not fit in memory); each process takes its share of every batch
        global_batch = max(ctx.world_size, batch_size - batch_size % ctx.world_size)
        batches = data.batches(global_batch, rank=ctx.rank, world_size=ctx.world_size, even=False)
    counts = torch.zeros(2, dtype=torch.float64)
    for x, y in batches:
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(x.to(device))
        counts += torch.tensor([float((logits.argmax(1).cpu() == y).sum()), float(len(y))], dtype=torch.float64)
    counts = distributed.all_reduce_sum(counts.to(ctx.device), ctx).cpu()
    model.train(was_training)
    if counts[1] == 0:
        raise ValueError("no test images to evaluate")
    return float(counts[0] / counts[1])


def _shares(x: torch.Tensor, y: torch.Tensor, limit: Optional[int], batch_size: int, ctx: distributed.Context):
    """This process's share (every world_size-th image) of the first ``limit`` images, in batches."""
    x, y = x[:limit][ctx.rank::ctx.world_size], y[:limit][ctx.rank::ctx.world_size]
    return zip(x.split(batch_size), y.split(batch_size))


def train_epochs(model: nn.Module, splits, cfg: TrainConfig, *, params=None, lr: Optional[float] = None,
                 epochs: Optional[int] = None, augment: bool = True, device="cpu", progress: bool = False,
                 eval_limit: Optional[int] = None, on_epoch=None, first_epoch: int = 0) -> list[dict]:
    """A plain loop without checkpoints: SGD + schedule from ``cfg`` over ``params`` (default: all).

    Epoch ``e`` uses ``epoch_generator(cfg.seed, first_epoch + e)``. Returns one metrics dict per epoch
    (``loss``, ``train_acc``, ``test_acc``, ``lr``, ``seconds``); ``on_epoch(record)`` is called after each.
    """
    check_train_config(cfg)
    epochs = cfg.epochs if epochs is None else epochs
    params = [p for p in (model.parameters() if params is None else params) if p.requires_grad]
    optimizer = make_optimizer(params, cfg, lr)
    steps = splits.train.num_batches(cfg.batch_size)
    scheduler = make_scheduler(optimizer, cfg, steps, epochs)
    history = []
    for e in range(epochs):
        start = time.perf_counter()
        generator = epoch_generator(cfg.seed, first_epoch + e)
        torch.manual_seed(epoch_seed(cfg.seed, first_epoch + e, 0))
        lr_now = optimizer.param_groups[0]["lr"]
        batches = splits.train.batches(cfg.batch_size, shuffle=True, augment=augment, generator=generator)
        stats = train_one_epoch(model, batches, optimizer, scheduler, device=device, epoch=e, progress=progress,
                                total=steps, desc=f"epoch {e + 1}/{epochs}")
        stats["test_acc"] = evaluate_accuracy(model, splits.test, batch_size=cfg.batch_size, device=device,
                                              limit=eval_limit)
        record = {"epoch": e + 1, "lr": lr_now, "seconds": round(time.perf_counter() - start, 3), **stats}
        history.append(record)
        if on_epoch is not None:
            on_epoch(record)
    return history


# ---------------------------------------------------------------- the training state on disk

def _encode(obj, prefix: str, tensors: dict):
    """JSON-able form of a nested state dict; tensors go to ``tensors`` under a path-like key."""
    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj
        return {"__tensor__": prefix}
    if isinstance(obj, dict):
        # JSON keys are strings; optimizer state is keyed by int parameter ids, so keep the key types.
        return {"__items__": [[k, _encode(v, f"{prefix}.{k}", tensors)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return [_encode(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)]
    if isinstance(obj, float) and not math.isfinite(obj):
        return {"__float__": repr(obj)}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} at {prefix!r} in the training state")


def _decode(obj, tensors: dict):
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__float__" in obj:
            return float(obj["__float__"])
        return {k: _decode(v, tensors) for k, v in obj["__items__"]}
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    return obj


def save_training_state(run_dir: Path, model: nn.Module, optimizer, scheduler, epoch: int, spec: RunSpec,
                        requested_hash: str, extra: dict) -> None:
    """Commit epoch ``epoch`` (1-based count of finished epochs): tensors first, then the JSON that names them."""
    tensors: dict = {}
    model_state = _encode(unwrap(model).state_dict(), "model", tensors)
    optimizer_state = _encode(optimizer.state_dict(), "optimizer", tensors)
    tensor_file = f"{STATE_DIR}/epoch-{epoch:04d}.safetensors"
    atomic_save_safetensors(run_dir / tensor_file, tensors)
    atomic_write_json(run_dir / STATE_FILE, {
        "epoch": epoch, "hash": requested_hash, "spec": spec.to_dict(), "tensors": tensor_file,
        "model": model_state, "optimizer": optimizer_state, "scheduler": scheduler.state_dict(), **extra})
    for old in (run_dir / STATE_DIR).glob("epoch-*.safetensors"):
        if old.name != Path(tensor_file).name:
            old.unlink(missing_ok=True)


def load_training_state(run_dir: Path) -> Optional[dict]:
    """The committed state of ``run_dir`` with tensors filled in, or None when no epoch was committed.

    A damaged state (bad JSON, a missing or torn tensor file, missing entries) is an error naming the file.
    """
    from safetensors.torch import load_file

    state_file = run_dir / STATE_FILE
    if not state_file.is_file():
        return None
    damaged = "the training state is damaged; start the run again with --force (without --resume)"
    state = read_json(state_file, "training state")
    try:
        tensor_file = run_dir / state["tensors"]
    except (KeyError, TypeError):
        raise UserError(f"{state_file}: no 'tensors' entry; {damaged}") from None
    if not tensor_file.is_file():
        raise FileNotFoundError(f"{tensor_file} not found (named by {state_file}); {damaged}")
    try:
        tensors = load_file(tensor_file)
    except Exception as err:  # safetensors raises its own error types for a torn file
        raise UserError(f"{tensor_file}: cannot read safetensors ({type(err).__name__}: {err}); {damaged}") from None
    missing = [key for key in ("epoch", "hash", "scheduler", "model", "optimizer") if key not in state]
    if missing:
        raise UserError(f"{state_file}: no {', '.join(map(repr, missing))} entry; {damaged}")
    try:
        state["model"] = _decode(state["model"], tensors)
        state["optimizer"] = _decode(state["optimizer"], tensors)
    except (KeyError, TypeError, ValueError) as err:
        raise UserError(f"{state_file}: malformed entry ({type(err).__name__}: {err}); {damaged}") from None
    return state


def hash_ignoring_epochs(spec: RunSpec) -> str:
    """The spec's hash with ``train.epochs`` left out: a run may be extended to more epochs (``--resume``)."""
    return dataclasses.replace(spec, train=dataclasses.replace(spec.train, epochs=0)).hash()


def _truncate_metrics(path: Path, epochs_done: int) -> None:
    """Drop metric lines of epochs after the committed one (a run killed between the two writes)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a torn last line
        if record.get("epoch", 0) <= epochs_done:
            kept.append(line)
    atomic_write_text(path, "".join(f"{line}\n" for line in kept))


# ---------------------------------------------------------------- fit

def fit(spec: RunSpec, run_dir, resume: bool = False, progress: bool = True, splits=None,
        force: bool = False) -> tuple[nn.Module, dict]:
    """Train ``spec`` into ``run_dir``; returns ``(model, summary)``. See the module docstring.

    Rank 0 holds the folder's :func:`~topkconv.checkpoint.run_lock` throughout. A folder that holds a
    complete run is refused unless ``force``; the run files of an earlier run (complete or not) stay as they
    were until the new run has committed its first epoch, and are then all replaced (evaluations and plots
    included). ``resume`` continues the committed epochs; with a larger ``spec.train.epochs`` it extends a
    finished run (the spec must match up to ``epochs``). ``splits`` (a :class:`~topkconv.data.DataSplits`)
    skips loading the data again when the caller has it.
    """
    from .data import load_data
    from .models import build_model, load_pretrained_vgg16

    check_train_config(spec.train)
    run_dir = Path(run_dir)
    ctx = distributed.setup(spec.train.device)
    staging: Optional[Path] = None
    try:
        with contextlib.ExitStack() as held:
            error = None
            if ctx.is_main:  # before any compute: the folder can be written and nobody else writes it
                try:
                    held.enter_context(run_lock(run_dir))
                    _check_target(run_dir, resume, force)
                except Exception as err:  # re-raised below, after telling the other ranks
                    error = err
            if not distributed.all_ok(error is None, ctx):
                raise error or RuntimeError(f"rank 0 could not start the run in {run_dir} (see its message)")
            requested_hash = spec.hash()
            state = load_training_state(run_dir) if resume else None
            extended_from = _check_resume(run_dir, state, spec) if state is not None else None

            amp = spec.train.amp and ctx.device.type == "cuda"
            if spec.train.amp and not amp:
                warnings.warn("train.amp (bf16 autocast) needs CUDA; training in float32 on the CPU", stacklevel=2)
            splits = splits if splits is not None else load_data(spec.data)
            resolved = resolve_spec(spec, splits)

            torch.manual_seed(epoch_seed(spec.train.seed, -1))  # the initial weights
            model = build_model(resolved.model)
            if state is None and resolved.model.pretrained:
                load_pretrained_vgg16(model, resolved.model.pretrained)
            model.to(ctx.device)
            ddp_model = distributed.wrap(model, ctx)
            optimizer = make_optimizer(model.parameters(), spec.train)
            steps = splits.train.num_batches(spec.train.batch_size, ctx.world_size)
            scheduler = make_scheduler(optimizer, spec.train, steps)
            first_epoch, elapsed = 0, 0.0
            if state is not None:
                model.load_state_dict(state["model"])
                optimizer.load_state_dict(state["optimizer"])
                scheduler.load_state_dict(state["scheduler"])
                first_epoch, elapsed = state["epoch"], state.get("seconds", 0.0)
            work_dir = run_dir
            if ctx.is_main:
                if (run_dir / STAGING_DIR).exists():  # left by a killed --force retrain
                    shutil.rmtree(run_dir / STAGING_DIR)
                if state is not None:
                    _truncate_metrics(run_dir / METRICS_FILE, first_epoch)
                elif run_files(run_dir):  # an earlier run stays intact until this one's first epoch is done
                    staging = work_dir = run_dir / STAGING_DIR
                    staging.mkdir()
            distributed.barrier(ctx)

            record: dict = {}
            for epoch in range(first_epoch, spec.train.epochs):
                start = time.perf_counter()
                generator = epoch_generator(spec.train.seed, epoch)
                torch.manual_seed(epoch_seed(spec.train.seed, epoch, ctx.rank))  # dropout masks
                lr_now = optimizer.param_groups[0]["lr"]
                batches = splits.train.batches(spec.train.batch_size, shuffle=True, augment=spec.data.augment,
                                               generator=generator, rank=ctx.rank, world_size=ctx.world_size)
                try:
                    stats = train_one_epoch(ddp_model, batches, optimizer, scheduler, device=ctx.device, amp=amp,
                                            epoch=epoch, ctx=ctx, progress=progress and ctx.is_main, total=steps,
                                            desc=f"epoch {epoch + 1}/{spec.train.epochs}")
                    _check_finite_weights(model, epoch)
                except NonFiniteLossError as err:
                    raise NonFiniteLossError(f"{err}; {_what_is_kept(run_dir, staging, epoch)}") from None
                test_acc = evaluate_accuracy(model, splits.test, batch_size=spec.train.batch_size,
                                             device=ctx.device, limit=spec.train.eval_examples, ctx=ctx, amp=amp)
                seconds = time.perf_counter() - start
                elapsed += seconds
                record = {"epoch": epoch + 1, "loss": stats["loss"], "train_acc": stats["train_acc"],
                          "test_acc": test_acc, "lr": lr_now, "seconds": round(seconds, 3), "steps": stats["steps"],
                          "images": stats["n"]}
                if ctx.is_main:
                    if epoch == first_epoch and work_dir == run_dir:
                        clear_run(run_dir, results_only=True)  # run.json and evaluations of older weights
                    append_jsonl(work_dir / METRICS_FILE, record)
                    save_training_state(work_dir, model, optimizer, scheduler, epoch + 1, resolved, requested_hash,
                                        {"seconds": elapsed, "metrics": record, "requested_spec": spec.to_dict(),
                                         "hash_ignoring_epochs": hash_ignoring_epochs(spec),
                                         "resolved_hash": resolved.hash()})
                    save_weights(work_dir / MODEL_FILE, model, resolved.hash())
                    if staging is not None:
                        replace_run(run_dir, staging)
                        staging = None
                        work_dir = run_dir
                    if progress:
                        print(f"epoch {epoch + 1}/{spec.train.epochs}: loss {record['loss']:.4f}, train acc "
                              f"{record['train_acc']:.4f}, test acc {test_acc:.4f}, {seconds:.1f} s", file=sys.stderr)
                distributed.barrier(ctx)

            if not record and state is not None:
                record = state.get("metrics", {})
            summary = {"epochs": spec.train.epochs, "resumed_from_epoch": first_epoch if state is not None else None,
                       "final": record, "test_acc": record.get("test_acc"), "seconds": round(elapsed, 3),
                       "world_size": ctx.world_size, "device": str(ctx.device), "amp": amp, "seed": spec.train.seed,
                       "complete": True}
            if extended_from is not None:
                summary["extended_from"] = extended_from
            if ctx.is_main:
                save_checkpoint(run_dir, model, resolved, extra={"train": summary}, requested_hash=requested_hash)
            distributed.barrier(ctx)
            return model.eval(), summary
    finally:
        if staging is not None and staging.exists():  # the new run failed before its first epoch was done
            shutil.rmtree(staging, ignore_errors=True)
        distributed.teardown(ctx)


def _check_target(run_dir: Path, resume: bool, force: bool) -> None:
    """Refuse to start a fresh run over a finished one unless ``force``; say both ways forward."""
    if resume and is_complete(run_dir) and not (run_dir / STATE_FILE).is_file():
        raise UserError(f"{run_dir}: nothing to resume (a finished run without a training state); use --force "
                        f"without --resume to train it again")
    if resume or force or not is_complete(run_dir):
        return
    try:
        recorded = read_json(run_dir / RUN_FILE).get("hash", "?")
    except (ValueError, AttributeError):
        recorded = "?"
    raise UserError(f"{run_dir} already holds a finished run (spec {recorded}); to keep it, train into another "
                    f"--out; to replace it, add --force (it stays intact until the new run's first epoch is done); "
                    f"to train it for more epochs, use --resume --epochs N")


def _check_resume(run_dir: Path, state: dict, spec: RunSpec) -> Optional[dict]:
    """Check that ``state`` continues ``spec``; returns ``{"epochs", "hash"}`` of the run being extended, if any."""
    state_file = run_dir / STATE_FILE
    recorded = state.get("hash_ignoring_epochs")
    same = recorded == hash_ignoring_epochs(spec) if recorded is not None else state["hash"] == spec.hash()
    if not same:
        raise UserError(f"{state_file}: this run folder holds spec {state['hash']}, not {spec.hash()}; use another "
                        f"--out, or --force without --resume to replace it")
    if state["epoch"] > spec.train.epochs:
        raise UserError(f"--epochs {spec.train.epochs}: {run_dir} has already trained {state['epoch']} epochs; "
                        f"--resume can only keep or extend a run")
    planned = state.get("requested_spec", {}).get("train", {}).get("epochs", spec.train.epochs)
    if planned != spec.train.epochs:
        return {"epochs": planned, "hash": state["hash"]}
    return None


def _what_is_kept(run_dir: Path, staging: Optional[Path], epoch: int) -> str:
    if staging is not None:
        return f"the earlier run in {run_dir} is left as it was"
    if epoch == 0:
        return f"no epoch was finished, so there is nothing to keep in {run_dir}"
    return (f"the last good epoch ({epoch}) is kept in {run_dir}: evaluate it with "
            f"`topkconv evaluate --allow-unfinished {run_dir}`, or lower train.lr and start again with --force")


def _check_finite_weights(model: nn.Module, epoch: int) -> None:
    for name, param in unwrap(model).named_parameters():
        if not torch.isfinite(param).all():
            raise NonFiniteLossError(f"epoch {epoch + 1}: parameter {name!r} is no longer finite; stopping")


def seconds_per_training_image(model: nn.Module, image_size: int, in_channels: int = 3, batch: int = 2,
                               steps: int = 2, device="cpu") -> float:
    """Measured wall time of one SGD step per image: ``steps`` steps on ``batch`` random images after one
    warm-up step. The model's weights change; pass a throw-away model. Used to state what a run will cost."""
    model = model.to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    x = torch.rand(batch, in_channels, image_size, image_size, device=device)
    y = torch.zeros(batch, dtype=torch.long, device=device)
    for step in range(steps + 1):
        if step == 1:
            start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        _criterion(model(x), y).backward()
        optimizer.step()
    return (time.perf_counter() - start) / (steps * batch)
