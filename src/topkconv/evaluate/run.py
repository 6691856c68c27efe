"""Run: every planned attack on every chunk of examples, giving per-example robust masks and timings.

The examples are cut into fixed chunks of ``cfg.batch_size``; under ``torchrun`` rank r attacks chunks
r, r + world, ... and the per-example masks are gathered with ``all_gather_object``. Every random draw of
an attack on a chunk is seeded from ``(cfg.seed, chunk, attack)``, so the numbers do not depend on the
number of processes or on the order the chunks run in.
"""

from __future__ import annotations

import time
import zlib
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from ..attacks.common import correct, model_device, recording_traces, seeded
from ..attacks.registry import Role
from ..config import AttackConfig
from ..progress import Progress
from .plan import Plan, PlannedAttack


@dataclass
class Outcomes:
    """What the attacks left: per chunk index ``{row: robust mask}``, seconds per row, and how many examples
    each cascaded attack ran on."""
    masks: dict = field(default_factory=dict)
    seconds: dict = field(default_factory=dict)
    attacked: dict = field(default_factory=dict)
    draws: dict = field(default_factory=dict)   # a random model: per chunk {row: (draws, B) robust masks}
    traces: dict = field(default_factory=dict)  # row -> [trace records (:func:`_trace_record`)], first examples only


def attack_seed(base: int, chunk: int, name: str) -> int:
    return zlib.crc32(f"{base}/{chunk}/{name}".encode()) & 0x7FFFFFFF


def world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def chunk_order(n_chunks: int, rank: int, world_size: int) -> list[int]:
    """The chunks rank ``rank`` attacks, in order: r, r + world, ... Results must not depend on it."""
    return list(range(rank, n_chunks, world_size))


def all_gather(obj) -> list:
    import torch.distributed as dist

    if world()[1] == 1:
        return [obj]
    gathered = [None] * world()[1]
    dist.all_gather_object(gathered, obj)
    return gathered


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Draws:
    """Judging a random model's final examples over ``count`` draws of its randomness. Draw r is seeded alike
    for every attack of a chunk (the same draw of the defence for all of them), so the per-example worst case
    across attacks is taken within each draw."""

    def __init__(self, model: nn.Module, count: int, seed: int, index: int):
        self.model, self.count, self.seeds = model, count, [attack_seed(seed, index, f"draw/{r}") for r in range(count)]

    def correct(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """(count, B): whether each draw classifies ``x`` as ``y``."""
        rows = []
        for seed in self.seeds:
            with seeded(self.model, seed):
                rows.append(correct(self.model, x, y))
        return torch.stack(rows)


def _examples_in_chunk(attack: PlannedAttack, size: int, offset: int) -> int:
    """How many examples of a chunk of ``size`` starting at ``offset`` lie before ``attack.examples``."""
    return size if attack.examples is None else max(0, min(size, attack.examples - offset))


def _trace_record(traces: list, fooled: torch.Tensor, index: torch.Tensor) -> Optional[dict]:
    """One attack run's loss traces as ``{"loss": (T, b), "fooled": (T, b), "returned_fooled": (b,), "index":
    (b,)}`` (the examples' indices in x; several calls on these examples joined along T); None without one."""
    runs = [trace for trace in traces if trace and trace[0]["loss"].shape[0] == index.numel()]
    if not runs:
        return None
    return {"loss": torch.cat([torch.stack([t["loss"] for t in run]) for run in runs]),
            "fooled": torch.cat([torch.stack([t["fooled"] for t in run]) for run in runs]),
            "returned_fooled": fooled.cpu(), "index": index.cpu()}


def _run_traced(attack: PlannedAttack, x, y, generator, seed, record: Optional[list]):
    """``attack.run``; with ``record`` (a list) the loss traces of its iterative attacks come back too."""
    if record is None:
        return attack.run(x, y, generator, seed), []
    with recording_traces() as traces:
        return attack.run(x, y, generator, seed), traces


def _keep(record: Optional[list], traces: list, fooled: torch.Tensor, index: torch.Tensor) -> None:
    found = _trace_record(traces, fooled, index) if record is not None and index.numel() else None
    if found is not None:
        record.append(found)


def _run_on_first(model, attack: PlannedAttack, xs, ys, clean, offset: int, generator, seed,
                  record: Optional[list] = None) -> torch.Tensor:
    """Robust mask of the attack on a chunk starting at example ``offset``; with ``attack.examples`` only the
    examples before that index are attacked, the others count as they are. With ``clean`` a :class:`Judged`,
    the mask is ``(robust, robust per draw)``. With ``record``, the attack's loss traces are kept in it."""
    take = _examples_in_chunk(attack, len(xs), offset)
    x_adv, traces = xs.clone(), []
    if take:
        x_adv[:take], traces = _run_traced(attack, xs[:take], ys[:take], generator, seed, record)
    still = correct(model, x_adv, ys)
    _keep(record, traces, ~still[:take], torch.arange(offset, offset + take))
    robust = still & clean.once
    return robust, (clean.draws.correct(x_adv, ys) & clean.per_draw if clean.draws else None)


@dataclass
class Judged:
    """The clean mask of a chunk (one draw) and, on a random model, its draws and the mask per draw."""
    once: torch.Tensor
    draws: Optional[Draws] = None
    per_draw: Optional[torch.Tensor] = None


def _run_on_survivors(model, attack: PlannedAttack, xs, ys, survivors, offset: int, generator,
                      seed, record: Optional[list] = None) -> tuple[torch.Tensor, int]:
    """A cascaded attack on the examples of the chunk that ``survivors`` marks (and, with ``attack.examples``,
    only those before that index): its row is robust where the example survived the reference attacks and
    this one. Unattacked survivors count as surviving it, as in :func:`_run_on_first`."""
    take = survivors.once.clone()
    take[_examples_in_chunk(attack, len(xs), offset):] = False
    robust = survivors.once.clone()
    per_draw = survivors.per_draw.clone() if survivors.draws else None
    index = take.nonzero().squeeze(1)
    if index.numel():
        x_adv, traces = _run_traced(attack, xs[index], ys[index], generator, seed, record)
        robust[index] = correct(model, x_adv, ys[index])
        _keep(record, traces, ~robust[index], index.cpu() + offset)
        if per_draw is not None:
            per_draw[:, index] &= survivors.draws.correct(x_adv, ys[index])
    return (robust, per_draw), index.numel()


def _timed(outcomes: Outcomes, name: str, device, work):
    tic = time.perf_counter()
    value = work()
    sync(device)
    outcomes.seconds[name] = outcomes.seconds.get(name, 0.0) + time.perf_counter() - tic
    return value


def _clean(model, plan: Plan, cfg: AttackConfig, index: int, xs, ys) -> Judged:
    with seeded(model, attack_seed(cfg.seed, index, "clean")):
        once = correct(model, xs, ys)
    if not plan.draws:
        return Judged(once)
    draws = Draws(model, plan.draws, cfg.seed, index)
    return Judged(once, draws, draws.correct(xs, ys))


def _traced(attack: PlannedAttack, plan: Plan, cfg: AttackConfig, offset: int) -> bool:
    """Whether the attack's loss traces are kept on the chunk at ``offset``: in the full suite, for the attacks at
    the main eps (those that enter the worst case), on chunks holding some of the indicators' first examples. Not
    for the transfer attack: its trace is the surrogate's loss, not the model's."""
    return (cfg.suite == "full" and attack.eps == plan.eps and attack.entry.role != Role.TRANSFER
            and offset < cfg.indicators.examples)


def _attack_chunk(model, plan: Plan, cfg: AttackConfig, index: int, xs, ys, outcomes: Outcomes,
                  bar: Progress) -> dict:
    device = model_device(model)
    offset = index * cfg.batch_size
    clean = _timed(outcomes, "clean", device, lambda: _clean(model, plan, cfg, index, xs, ys))
    result, base = {"clean": clean.once.cpu()}, set(plan.cascade_base())
    survivors = Judged(clean.once.clone(), clean.draws, None if clean.per_draw is None else clean.per_draw.clone())
    drawn = outcomes.draws.setdefault(index, {"clean": clean.per_draw.cpu()}) if plan.draws else None
    bar.step("clean")
    for attack in plan.attacks:
        seed = attack_seed(cfg.seed, index, attack.name)
        record = outcomes.traces.setdefault(attack.name, []) if _traced(attack, plan, cfg, offset) else None
        with seeded(model, seed) as generator:
            if attack.cascade:
                robust, count = _timed(outcomes, attack.name, device, lambda: _run_on_survivors(
                    model, attack, xs, ys, survivors, offset, generator, seed, record))
                outcomes.attacked[attack.name] = outcomes.attacked.get(attack.name, 0) + count
            else:
                robust = _timed(outcomes, attack.name, device, lambda: _run_on_first(
                    model, attack, xs, ys, clean, offset, generator, seed, record))
        robust, per_draw = robust
        if attack.name in base:
            survivors.once &= robust
            survivors.per_draw = None if per_draw is None else survivors.per_draw & per_draw
        result[attack.name] = robust.cpu()
        if drawn is not None:
            drawn[attack.name] = per_draw.cpu()
        bar.step(attack.name)
    return result


def run_plan(model: nn.Module, x: torch.Tensor, y: torch.Tensor, plan: Plan, cfg: AttackConfig,
             progress: bool = True) -> Outcomes:
    """Every attack of ``plan`` on this rank's chunks of ``(x, y)``; the masks of every rank, gathered.
    ``progress``: a bar on a terminal, a line per attack in a log (rank 0 only)."""
    device = model_device(model)
    chunks = list(range(0, x.shape[0], cfg.batch_size))
    rank, world_size = world()
    mine = chunk_order(len(chunks), rank, world_size)
    outcomes = Outcomes(seconds=dict.fromkeys(["clean"] + [a.name for a in plan.attacks], 0.0),
                        attacked={a.name: 0 for a in plan.attacks if a.cascade})
    bar = Progress(len(mine) * (len(plan.attacks) + 1), "evaluate", unit="attack", enabled=progress and rank == 0)
    for index in mine:
        xs = x[chunks[index]:chunks[index] + cfg.batch_size].to(device)
        ys = y[chunks[index]:chunks[index] + cfg.batch_size].to(device)
        outcomes.masks[index] = _attack_chunk(model, plan, cfg, index, xs, ys, outcomes, bar)
    bar.close()
    return outcomes


def gather(outcomes: Outcomes, indicators: dict) -> tuple[Outcomes, dict]:
    """Every rank's outcomes merged (ranks run side by side: the slowest sets an attack's time), and the
    indicators measured on rank 0."""
    merged = Outcomes(dict(outcomes.masks), dict(outcomes.seconds), dict.fromkeys(outcomes.attacked, 0),
                      dict(outcomes.draws))
    parts = all_gather({"masks": outcomes.masks, "seconds": outcomes.seconds, "indicators": indicators,
                        "attacked": outcomes.attacked, "draws": outcomes.draws, "traces": outcomes.traces})
    for part in parts:
        merged.masks.update(part["masks"])
        merged.draws.update(part["draws"])
        for name, records in part["traces"].items():
            merged.traces[name] = merged.traces.get(name, []) + records
        indicators = indicators or part["indicators"]
        for name, count in part["attacked"].items():
            merged.attacked[name] += count
        for name, value in part["seconds"].items():
            merged.seconds[name] = max(merged.seconds[name], value)
    return merged, indicators
