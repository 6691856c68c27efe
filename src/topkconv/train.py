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
      With ``train.adversarial`` enabled it trains on adversarial examples (:mod:`topkconv.adversarial`:
      PGD, TRADES or fast FGSM training), and each epoch's record adds ``test_robust_acc`` (PGD-10 at the
      training radius on ``train.adversarial.check_examples`` test images).
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
from .config import AdversarialConfig, RunSpec, TrainConfig
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
    if not isinstance(cfg.adversarial, AdversarialConfig):
        raise ValueError(f"train.adversarial must be an AdversarialConfig, got {type(cfg.adversarial).__name__}")
    dataclasses.replace(cfg.adversarial)  # re-runs its own checks (errors name e.g. train.adversarial.eps)


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


def _batch_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, amp: bool,
                adversarial: Optional[AdversarialConfig]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss, logits)`` of one batch: plain cross-entropy, or the adversarial-training loss."""
    if adversarial is not None and adversarial.enabled:
        from .adversarial import training_loss

        return training_loss(model, unwrap(model), x, y, adversarial, _criterion, amp)
    with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16, enabled=amp):
        logits = model(x)
    return _criterion(logits, y), logits


def train_one_epoch(model: nn.Module, batches: Iterable, optimizer, scheduler=None, *, device="cpu",
                    amp: bool = False, epoch: int = 0, ctx: Optional[distributed.Context] = None,
                    progress: bool = False, total: Optional[int] = None, desc: str = "train",
                    adversarial: Optional[AdversarialConfig] = None) -> dict:
    """One pass of SGD over ``batches`` (``(x, y)`` pairs); returns ``{"loss", "train_acc", "n", "steps"}``.

    The scheduler, when given, steps after every batch. ``epoch`` only labels errors and the progress bar.
    ``adversarial`` (enabled) trains on adversarial examples (:mod:`topkconv.adversarial`); ``train_acc`` is
    then the accuracy on them. Under DDP the loss and accuracy are summed over all processes every step, so
    every rank sees a non-finite loss at the same step and stops together.
    """
    from tqdm import tqdm

    ctx = ctx or distributed.Context(device=torch.device(device))
    device = torch.device(device)
    model.train()
    totals = torch.zeros(3, dtype=torch.float64)  # loss sum, correct, count
    steps = 0
    # a bar on a terminal only: in a log a bar is a stream of carriage returns; the epoch lines are the log's
    bar = tqdm(batches, total=total, desc=desc, disable=not (progress and sys.stderr.isatty()), leave=False,
               file=sys.stderr)
    for step, (x, y) in enumerate(bar):
        x = x.to(device, non_blocking=True)
        y = y.to(device, non_blocking=True)
        loss, logits = _batch_loss(model, x, y, amp, adversarial)
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
                                total=steps, desc=f"epoch {e + 1}/{epochs}", adversarial=cfg.adversarial)
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

class _Run:
    """What one call of :func:`fit` carries from step to step: the spec, the process, the model and its
    optimiser, the epochs already done, and the folder being written (``staging`` while an earlier run's
    files must stay intact)."""

    def __init__(self, spec: RunSpec, run_dir: Path, ctx: distributed.Context, progress: bool):
        self.spec, self.run_dir, self.ctx, self.progress = spec, run_dir, ctx, progress
        self.requested_hash = spec.hash()
        self.state: Optional[dict] = None
        self.extended_from: Optional[dict] = None
        self.staging: Optional[Path] = None
        self.work_dir = run_dir
        self.first_epoch, self.elapsed = 0, 0.0


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
    check_train_config(spec.train)
    run = _Run(spec, Path(run_dir), distributed.setup(spec.train.device), progress)
    try:
        with contextlib.ExitStack() as held:
            _claim_folder(run, held, resume, force)
            if resume:
                run.state = load_training_state(run.run_dir)
            if run.state is not None:
                run.extended_from = _check_resume(run.run_dir, run.state, spec)
            _build(run, splits)
            _prepare_folder(run)
            record: dict = {}
            for epoch in range(run.first_epoch, spec.train.epochs):
                record = _train_epoch(run, epoch)
                if run.ctx.is_main:
                    _commit_epoch(run, epoch, record)
                distributed.barrier(run.ctx)
            return _finish(run, record)
    finally:
        if run.staging is not None and run.staging.exists():  # the new run failed before its first epoch was done
            shutil.rmtree(run.staging, ignore_errors=True)
        distributed.teardown(run.ctx)


def _claim_folder(run: _Run, held: contextlib.ExitStack, resume: bool, force: bool) -> None:
    """Rank 0 takes the folder's lock and checks it may train there, before any compute; all ranks stop
    together when it may not."""
    error = None
    if run.ctx.is_main:
        try:
            held.enter_context(run_lock(run.run_dir))
            _check_target(run.run_dir, resume, force)
        except Exception as err:  # re-raised below, after telling the other ranks
            error = err
    if not distributed.all_ok(error is None, run.ctx):
        raise error or RuntimeError(f"rank 0 could not start the run in {run.run_dir} (see its message)")


def _build(run: _Run, splits) -> None:
    """Load the data (unless given), build the model on the device, its optimiser and schedule, and restore
    them from the committed state when resuming."""
    from .data import load_data
    from .models import build_model, load_pretrained_vgg16

    spec, ctx, state = run.spec, run.ctx, run.state
    run.amp = spec.train.amp and ctx.device.type == "cuda"
    if spec.train.amp and not run.amp:
        warnings.warn("train.amp (bf16 autocast) needs CUDA; training in float32 on the CPU", stacklevel=3)
    run.splits = splits if splits is not None else load_data(spec.data)
    run.resolved = resolve_spec(spec, run.splits)
    torch.manual_seed(epoch_seed(spec.train.seed, -1))  # the initial weights
    run.model = build_model(run.resolved.model)
    if state is None and run.resolved.model.pretrained:
        load_pretrained_vgg16(run.model, run.resolved.model.pretrained)
    run.model.to(ctx.device)
    run.ddp_model = distributed.wrap(run.model, ctx)
    run.optimizer = make_optimizer(run.model.parameters(), spec.train)
    run.steps = run.splits.train.num_batches(spec.train.batch_size, ctx.world_size)
    run.scheduler = make_scheduler(run.optimizer, spec.train, run.steps)
    if state is not None:
        run.model.load_state_dict(state["model"])
        run.optimizer.load_state_dict(state["optimizer"])
        run.scheduler.load_state_dict(state["scheduler"])
        run.first_epoch, run.elapsed = state["epoch"], state.get("seconds", 0.0)


def _prepare_folder(run: _Run) -> None:
    """Rank 0 clears a killed retrain's staging folder, drops metric lines past the committed epoch, and
    stages a fresh run beside an earlier one, which stays intact until this run's first epoch is done."""
    run_dir = run.run_dir
    if run.ctx.is_main:
        if (run_dir / STAGING_DIR).exists():  # left by a killed --force retrain
            shutil.rmtree(run_dir / STAGING_DIR)
        if run.state is not None:
            _truncate_metrics(run_dir / METRICS_FILE, run.first_epoch)
        elif run_files(run_dir):
            run.staging = run.work_dir = run_dir / STAGING_DIR
            run.staging.mkdir()
    distributed.barrier(run.ctx)


def _train_epoch(run: _Run, epoch: int) -> dict:
    """Train epoch ``epoch`` (0-based) and score it; returns its metrics record."""
    cfg, ctx = run.spec.train, run.ctx
    start = time.perf_counter()
    generator = epoch_generator(cfg.seed, epoch)
    torch.manual_seed(epoch_seed(cfg.seed, epoch, ctx.rank))  # dropout masks and adversarial random starts
    lr_now = run.optimizer.param_groups[0]["lr"]
    batches = run.splits.train.batches(cfg.batch_size, shuffle=True, augment=run.spec.data.augment,
                                       generator=generator, rank=ctx.rank, world_size=ctx.world_size)
    try:
        stats = train_one_epoch(run.ddp_model, batches, run.optimizer, run.scheduler, device=ctx.device, amp=run.amp,
                                epoch=epoch, ctx=ctx, progress=run.progress and ctx.is_main, total=run.steps,
                                desc=f"epoch {epoch + 1}/{cfg.epochs}", adversarial=cfg.adversarial)
        _check_finite_weights(run.model, epoch)
    except NonFiniteLossError as err:
        raise NonFiniteLossError(f"{err}; {_what_is_kept(run.run_dir, run.staging, epoch)}") from None
    test_acc = evaluate_accuracy(run.model, run.splits.test, batch_size=cfg.batch_size, device=ctx.device,
                                 limit=cfg.eval_examples, ctx=ctx, amp=run.amp)
    record = {"epoch": epoch + 1, "loss": stats["loss"], "train_acc": stats["train_acc"], "test_acc": test_acc,
              "lr": lr_now, "seconds": 0.0, "steps": stats["steps"], "images": stats["n"]}
    if cfg.adversarial.enabled and cfg.adversarial.check_examples:
        from .adversarial import robust_accuracy

        x, y = run.splits.test.tensors(cfg.adversarial.check_examples)
        record["test_robust_acc"] = robust_accuracy(run.model, x, y, cfg.adversarial, cfg.batch_size)
    seconds = time.perf_counter() - start
    run.elapsed += seconds
    record["seconds"] = round(seconds, 3)
    return record


def _commit_epoch(run: _Run, epoch: int, record: dict) -> None:
    """Rank 0 writes the epoch: its metrics line, the training state (which commits it) and the weights;
    the first epoch of a staged run then replaces the earlier run's files."""
    spec, run_dir = run.spec, run.run_dir
    if epoch == run.first_epoch and run.work_dir == run_dir:
        clear_run(run_dir, results_only=True)  # run.json and evaluations of older weights
    append_jsonl(run.work_dir / METRICS_FILE, record)
    save_training_state(run.work_dir, run.model, run.optimizer, run.scheduler, epoch + 1, run.resolved,
                        run.requested_hash, {"seconds": run.elapsed, "metrics": record,
                                             "requested_spec": spec.to_dict(),
                                             "hash_ignoring_epochs": hash_ignoring_epochs(spec),
                                             "resolved_hash": run.resolved.hash()})
    save_weights(run.work_dir / MODEL_FILE, run.model, run.resolved.hash())
    if run.staging is not None:
        replace_run(run_dir, run.staging)
        run.staging = None
        run.work_dir = run_dir
    if run.progress:
        robust = f", robust acc {record['test_robust_acc']:.4f}" if "test_robust_acc" in record else ""
        print(f"epoch {epoch + 1}/{spec.train.epochs}: loss {record['loss']:.4f}, train acc "
              f"{record['train_acc']:.4f}, test acc {record['test_acc']:.4f}{robust}, {record['seconds']:.1f} s",
              file=sys.stderr)


def _finish(run: _Run, record: dict) -> tuple[nn.Module, dict]:
    """Write run.json (rank 0), which marks the run complete; returns ``(model in eval mode, summary)``."""
    spec = run.spec
    if not record and run.state is not None:
        record = run.state.get("metrics", {})
    summary = {"epochs": spec.train.epochs, "resumed_from_epoch": run.first_epoch if run.state is not None else None,
               "final": record, "test_acc": record.get("test_acc"), "seconds": round(run.elapsed, 3),
               "world_size": run.ctx.world_size, "device": str(run.ctx.device), "amp": run.amp,
               "seed": spec.train.seed, "complete": True}
    if run.extended_from is not None:
        summary["extended_from"] = run.extended_from
    if run.ctx.is_main:
        save_checkpoint(run.run_dir, run.model, run.resolved, extra={"train": summary},
                        requested_hash=run.requested_hash)
    distributed.barrier(run.ctx)
    return run.model.eval(), summary


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
