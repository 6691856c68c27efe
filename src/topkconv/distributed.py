"""Data-parallel training under ``torchrun``: the process context, process-group setup, and small collectives.

``torchrun --nproc_per_node=N -m topkconv.cli train ...`` sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``.
:func:`context` is the one place that reads them; everything else receives the :class:`Context` it returns
(or the one :func:`setup` returns, which adds the device and joins the group with gloo on the CPU or nccl on
CUDA). Without them it is a single process and every helper here is a no-op. Only rank 0 writes files
(:attr:`Context.is_main`).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

ENV_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE")


@dataclass(frozen=True)
class Context:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    owns_group: bool = False          # this process created the group, so it tears it down

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def context() -> Context:
    """This process's place in a torchrun job (rank, local_rank, world_size, is_main), read from the environment.

    A single process (no torchrun) is rank 0 of 1. A malformed variable is an error naming it.
    """
    values = {}
    for name, default in zip(ENV_VARIABLES, ("0", "0", "1")):
        text = os.environ.get(name, default)
        try:
            values[name] = int(text)
        except ValueError:
            raise ValueError(f"environment variable {name}={text!r}: expected an integer (set by torchrun)") from None
    if values["WORLD_SIZE"] < 1 or not 0 <= values["RANK"] < values["WORLD_SIZE"]:
        raise ValueError(f"environment: RANK={values['RANK']} and WORLD_SIZE={values['WORLD_SIZE']} do not fit "
                         f"(expected 0 <= RANK < WORLD_SIZE)")
    return Context(rank=values["RANK"], local_rank=values["LOCAL_RANK"], world_size=values["WORLD_SIZE"])


def pick_device(preference: str, local_rank: int = 0) -> torch.device:
    """``auto`` -> CUDA when present, else CPU; ``cuda`` without a GPU is an error, not a silent fallback."""
    if preference not in ("auto", "cpu", "cuda"):
        raise ValueError(f"train.device must be auto, cpu or cuda, got {preference!r}")
    if preference == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device='cuda' but no CUDA device is available")
    if preference == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", local_rank)


def setup(device_preference: str = "auto", ctx: Context | None = None) -> Context:
    """Join the torchrun process group if the context (default :func:`context`) describes one.

    Returns the context with its device (and ``owns_group`` when this call created the group).
    """
    ctx = ctx or context()
    device = pick_device(device_preference, ctx.local_rank)
    if not ctx.distributed:
        return dataclasses.replace(ctx, device=device)
    owns_group = False
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend)
        owns_group = True
    return dataclasses.replace(ctx, device=device, owns_group=owns_group)


def teardown(ctx: Context) -> None:
    if ctx.owns_group and dist.is_initialized():
        # every rank reaches this point before any destroys the group: a rank that tears gloo down while the
        # other still finishes its last writes was seen to abort ("terminate called without an active
        # exception") on a loaded 2-core machine
        dist.barrier()
        dist.destroy_process_group()


def wrap(model: nn.Module, ctx: Context) -> nn.Module:
    """DistributedDataParallel around ``model`` when there are several processes; else ``model`` itself.

    On CUDA, BatchNorm becomes SyncBatchNorm, so batch statistics span the global batch as in one
    process. SyncBatchNorm has no CPU kernel: on the CPU each process normalises with its own share's
    statistics, a (small) difference from a one-process run.
    """
    if not ctx.distributed:
        return model
    if ctx.device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        return nn.parallel.DistributedDataParallel(model, device_ids=[ctx.device.index])
    return nn.parallel.DistributedDataParallel(model)


def all_reduce_sum(values: torch.Tensor, ctx: Context) -> torch.Tensor:
    """Sum ``values`` over all processes (in place) and return it."""
    if ctx.distributed:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def barrier(ctx: Context) -> None:
    if ctx.distributed:
        dist.barrier()


def all_ok(ok: bool, ctx: Context) -> bool:
    """Whether ``ok`` holds on every process: lets rank 0 fail a check (a locked folder) without the others
    waiting for it at the next collective."""
    if not ctx.distributed:
        return ok
    flag = torch.tensor([0.0 if ok else 1.0], device=ctx.device)
    dist.all_reduce(flag, op=dist.ReduceOp.SUM)
    return flag.item() == 0
