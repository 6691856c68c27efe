"""The run and evaluation cache of a reproduction, as one object: :class:`Workspace`.

Layout under ``out``: ``runs/<spec hash>/`` holds one trained model (``model.safetensors``, ``run.json``)
and its evaluations (``eval.json`` for the paper's attacks, ``eval-strong-<eps>.json`` for each strong
suite); ``reports/`` holds what the drivers write. A run counts as trained when its ``run.json`` exists
(the trainer writes it last), and an evaluation is reused when its file records the same attack config,
data and weights. A killed job therefore leaves nothing that counts: the next call redoes it.

:meth:`Workspace.plan` turns studies into :class:`Job` s (only the missing ones), ordered so that every
job comes after the jobs it needs; :func:`execute` runs one job, in this process or in a worker.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..checkpoint import EVAL_FILE, MODEL_FILE, is_complete, run_lock
from ..config import AttackConfig, spec_from_dict
from .spec import Study

TRAIN, PRUNE, EVALUATE = "train", "prune", "evaluate"
RANK_STRONG, RANK_TRAIN, RANK_PAPER = 3, 2, 1   # measured on table3-quick: strong suite > training > paper attacks


@dataclass(frozen=True)
class Job:
    """One independent piece of work: train or prune one run, or run one suite of attacks on it."""
    step: str                             # train | prune | evaluate
    key: str                              # unique: the run folder's name, or "<run>/<eval file>"
    title: str                            # what the progress line says: "Baseline, seed 1: paper attacks"
    spec: dict                            # the run's RunSpec as a dict (picklable, for a worker)
    run_dir: str
    needs: tuple = ()                     # keys of the jobs that must finish first
    source_dir: Optional[str] = None      # prune: the trained run it starts from
    eval_file: Optional[str] = None       # evaluate: where the result goes
    attack: Optional[dict] = None         # evaluate: the AttackConfig as a dict
    surrogate_dir: Optional[str] = None   # evaluate: the transfer attack's source model
    test_limit: Optional[int] = None      # evaluate: test images to load
    rank: int = 0                         # workers take the ready job of highest rank first (the longest kind),
                                          # so the last minutes are not one long job beside an idle worker


class Workspace:
    """``out/runs`` (trained models and their evaluations) and ``out/reports``, and what is cached there."""

    def __init__(self, out=".", force: bool = False):
        self.out = Path(out)
        self.runs = self.out / "runs"
        self.reports = self.out / "reports"
        self.force = bool(force)

    # ------------------------------------------------------------ where things live
    def run_dir(self, spec) -> Path:
        return self.runs / spec.hash()

    @staticmethod
    def eval_file(run_dir: Path, name: str) -> Path:
        """``eval.json`` for the paper's attacks, ``eval-strong-<eps>.json`` for a strong suite."""
        return Path(run_dir) / (EVAL_FILE if name == "paper" else f"eval-{name.replace('@', '-')}.json")

    @staticmethod
    def is_trained(run_dir: Path) -> bool:
        return is_complete(run_dir)

    # ------------------------------------------------------------ planning
    def plan(self, studies: list, evaluations: bool = True) -> tuple[list, list]:
        """The jobs that ``studies`` still need (with ``evaluations=False``: only the trainings), in an order
        where each comes after what it needs, and a log entry for every cached step. A run shared by two
        studies is planned once."""
        jobs: dict[str, Job] = {}
        cached: list = []
        for study in studies:
            for seed in range(study.seeds):
                for label in study.table.reproduced_labels:
                    self._plan_run(study, label, seed, jobs, cached)
            for seed in range(study.seeds if evaluations else 0):
                for label in study.table.reproduced_labels:
                    self._plan_evaluations(study, label, seed, jobs, cached)
        order = [j for j in jobs.values() if j.step != EVALUATE] + [j for j in jobs.values() if j.step == EVALUATE]
        return order, cached

    def _plan_run(self, study: Study, label: str, seed: int, jobs: dict, cached: list) -> str:
        column = study.table.column(label)
        spec = study.run_spec(label, seed)
        run_dir = self.run_dir(spec)
        key = run_dir.name
        if key in jobs or any(entry["run"] == key and entry["action"] == "cached" for entry in cached):
            return key
        title = f"{study.name} {label}, seed {seed}: " + ("pruning" if column.prune_from else "training")
        needs: tuple = ()
        source = None
        if column.prune_from is not None:
            source_key = self._plan_run(study, column.prune_from, seed, jobs, cached)
            source = str(self.runs / source_key)
            needs = (source_key,) if source_key in jobs else ()
        if self.is_trained(run_dir) and not self.force and not needs:
            cached.append({"column": label, "seed": seed, "run": key, "action": "cached"})
            return key
        jobs[key] = Job(PRUNE if source else TRAIN, key, title, spec.to_dict(), str(run_dir), needs,
                        source_dir=source, rank=RANK_TRAIN)
        return key

    def _plan_evaluations(self, study: Study, label: str, seed: int, jobs: dict, cached: list) -> None:
        spec = study.run_spec(label, seed)
        run_dir = self.run_dir(spec)
        surrogate = self.surrogate(study, label, seed)
        for name, cfg in study.attack_configs(spec).items():
            path = self.eval_file(run_dir, name)
            key = f"{run_dir.name}/{path.name}"
            if key in jobs:
                continue
            surrogate_dir = surrogate if name != "paper" else None
            needs = tuple(k for k in (run_dir.name, Path(surrogate_dir).name if surrogate_dir else None)
                          if k is not None and k in jobs)
            if not needs and not self.force and self.cached_evaluation(path, cfg, spec, surrogate_dir) is not None:
                cached.append({"column": label, "seed": seed, "run": run_dir.name, "action": f"{name} cached"})
                continue
            jobs[key] = Job(EVALUATE, key, f"{study.name} {label}, seed {seed}: {name} attacks", spec.to_dict(),
                            str(run_dir), needs, eval_file=str(path), attack=dataclasses.asdict(cfg),
                            surrogate_dir=surrogate_dir, test_limit=study.test_limit(),
                            rank=RANK_STRONG if name != "paper" else RANK_PAPER)

    def surrogate(self, study: Study, label: str, seed: int) -> Optional[str]:
        """The transfer attack's source: the same seed's Baseline, when the table has one."""
        if "Baseline" not in study.table.reproduced_labels or label == "Baseline":
            return None
        return str(self.run_dir(study.run_spec("Baseline", seed)))

    # ------------------------------------------------------------ reading the cache
    @staticmethod
    def cached_evaluation(path: Path, cfg: AttackConfig, spec, surrogate_dir: Optional[str]) -> Optional[dict]:
        """The evaluation in ``path`` if it was made with this attack config, data and weights."""
        run_dir = Path(path).parent
        if not Workspace.is_trained(run_dir) or (surrogate_dir and not Workspace.is_trained(Path(surrogate_dir))):
            return None
        result = _read_json(Path(path))
        if result is None or result.get("reproduce_key") != evaluation_key(cfg, spec, run_dir, surrogate_dir):
            return None
        return result

    def results(self, study: Study) -> dict:
        """``{label: [per seed: {"paper": eval dict, "strong": {eps: eval dict}}]}`` for a finished study."""
        out: dict = {}
        for label in study.table.reproduced_labels:
            seeds = []
            for seed in range(study.seeds):
                spec = study.run_spec(label, seed)
                run_dir = self.run_dir(spec)
                entry: dict = {"run": run_dir.name, "paper": None, "strong": {}}
                for name, cfg in study.attack_configs(spec).items():
                    path = self.eval_file(run_dir, name)
                    result = self.cached_evaluation(path, cfg, spec, self.surrogate(study, label, seed)
                                                    if name != "paper" else None)
                    if result is None:
                        raise RuntimeError(f"{path}: missing or stale after the jobs ran; run the command again")
                    if name == "paper":
                        entry["paper"] = result
                    else:
                        entry["strong"][name.split("@", 1)[1]] = result
                seeds.append(entry)
            out[label] = seeds
        return out


def evaluation_key(cfg: AttackConfig, spec, run_dir: Path, surrogate_dir: Optional[str]) -> dict:
    """What an evaluation depends on: a retrained model (or surrogate) invalidates it."""
    return {"attack": dataclasses.asdict(cfg), "data": dataclasses.asdict(spec.data),
            "surrogate": _weights_id(Path(surrogate_dir)) if surrogate_dir else None,
            "model": _weights_id(Path(run_dir))}


def _weights_id(run_dir: Path) -> list:
    stat = (run_dir / MODEL_FILE).stat()
    return [run_dir.name, stat.st_size, stat.st_mtime_ns]


def _read_json(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return None


# ---------------------------------------------------------------- running one job

_TEST_CACHE: dict = {}


def test_tensors(spec, limit: Optional[int] = None) -> tuple:
    """The first ``limit`` test images as tensors in [0, 1] and the splits, loaded once per process."""
    key = (json.dumps(dataclasses.asdict(spec.data), sort_keys=True), limit)
    if key not in _TEST_CACHE:
        from ..data import load_data

        splits = load_data(spec.data)
        _TEST_CACHE[key] = (splits.test_tensors(limit=limit), splits)
    (x, y), splits = _TEST_CACHE[key]
    return x, y, splits


def execute(job: Job) -> dict:
    """Run ``job`` here; returns a small summary. Every file it writes is written atomically."""
    import time

    start = time.perf_counter()
    spec = spec_from_dict(job.spec)
    run_dir = Path(job.run_dir)
    if job.step == TRAIN:
        from ..train import fit

        with run_lock(run_dir):  # a second topkconv process gets RunLockedError naming this folder
            fit(spec, run_dir, progress=False, force=is_complete(run_dir))  # complete here only under --force
    elif job.step == PRUNE:
        from ..pruning import prune_run

        with run_lock(run_dir):
            prune_run(job.source_dir, spec, run_dir, progress=False)
    elif job.step == EVALUATE:
        _evaluate(job, spec, run_dir)
    else:
        raise ValueError(f"job {job.key}: unknown step {job.step!r}")
    return {"key": job.key, "step": job.step, "seconds": round(time.perf_counter() - start, 1)}


def _evaluate(job: Job, spec, run_dir: Path) -> None:
    from .. import distributed
    from ..checkpoint import load_checkpoint
    from ..evaluate import evaluate, write_results
    from ..io import atomic_write_json

    cfg = AttackConfig(**job.attack)
    device = str(distributed.pick_device(spec.train.device, distributed.context().local_rank))
    model = load_checkpoint(run_dir, device=device)[0]
    surrogate = load_checkpoint(job.surrogate_dir, device=device)[0] if job.surrogate_dir else None
    x, y, _ = test_tensors(spec, job.test_limit)
    result = evaluate(model, x, y, cfg, surrogate=surrogate, progress=False)
    result["reproduce_key"] = evaluation_key(cfg, spec, run_dir, job.surrogate_dir)
    result["run"] = {"dir": str(run_dir), "name": spec.name, "hash": spec.hash(), "seed": spec.train.seed}
    if distributed.context().is_main:
        path = Path(job.eval_file)
        if path.name == EVAL_FILE:
            write_results(result, path, title=job.title)
        else:
            atomic_write_json(path, result)
