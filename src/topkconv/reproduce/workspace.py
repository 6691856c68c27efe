"""The run and evaluation cache of a reproduction, as one object: :class:`Workspace`.

Layout under ``out``: ``runs/<spec hash>/`` holds one trained model (``model.safetensors``, ``run.json``)
and its evaluations (``eval.json`` for the paper's attacks, ``eval-strong-<eps>.json`` for each strong
suite); ``reports/`` holds what the drivers write. A run counts as trained when its ``run.json`` exists
(the trainer writes it last) and its weights can be read; weights that cannot be read are named in the
log and the run is trained again. The cache is content-addressed: an evaluation is reused when it was
made with the same attack config, data and spec, from weights (and a surrogate) with the same SHA-256;
times and sizes of files play no part, so ``touch`` or ``cp -r`` redo nothing. A cached file that does
not parse, or has the wrong shape, is named in the log and redone. A killed job leaves nothing that
counts: the next call redoes it.

:meth:`Workspace.plan` turns studies into :class:`Job` s (only the missing ones), ordered so that every
job comes after the jobs it needs; :func:`execute` runs one job, in this process or in a worker.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from ..checkpoint import EVAL_FILE, MODEL_FILE, is_complete, run_lock
from ..config import AttackConfig, spec_from_dict
from ..test_time import is_test_time_only, standard_twin
from .spec import Study

TRAIN, PRUNE, DERIVE, EVALUATE = "train", "prune", "derive", "evaluate"
# Workers take the ready job of highest priority first; measured on table3-quick: strong suite > training > paper.
PRIORITY_STRONG, PRIORITY_TRAIN, PRIORITY_PAPER = 3, 2, 1


@dataclass(frozen=True)
class Job:
    """One independent piece of work: make one run (train, prune or derive it), or run one suite of attacks on it."""
    step: str                             # train | prune | derive | evaluate
    key: str                              # unique: the run folder's name, or "<run>/<eval file>"
    title: str                            # what the progress line says: "Baseline, seed 1: paper attacks"
    spec: dict                            # the run's RunSpec as a dict (picklable, for a worker)
    run_dir: str
    needs: tuple = ()                     # keys of the jobs that must finish first
    source_dir: Optional[str] = None      # prune, derive: the trained run it starts from
    eval_file: Optional[str] = None       # evaluate: where the result goes
    attack: Optional[dict] = None         # evaluate: the AttackConfig as a dict
    surrogate_dir: Optional[str] = None   # evaluate: the transfer attack's source model
    test_limit: Optional[int] = None      # evaluate: test images to load
    priority: int = 0                     # workers take the ready job of highest priority first (the longest
                                          # kind), so the last minutes are not one long job beside an idle worker
    replace: str = ""                     # train/prune over a finished run, and why: "--force", "unreadable"
                                          # (weights), "source retrained" (a pruned run); decided by the plan


class Workspace:
    """``out/runs`` (trained models and their evaluations) and ``out/reports``, and what is cached there."""

    def __init__(self, out=".", force: bool = False, say: Optional[Callable[[str], None]] = None):
        self.out = Path(out)
        self.runs = self.out / "runs"
        self.reports = self.out / "reports"
        self.force = bool(force)
        self.notes: list = []             # what the plan found wrong in the cache (also said, one line each)
        self._say = say or _say

    def say(self, message: str) -> None:
        self.notes.append(message)
        self._say(message)

    # ------------------------------------------------------------ where things live
    def run_dir(self, spec) -> Path:
        return self.runs / spec.hash()

    @staticmethod
    def eval_file(run_dir: Path, name: str, without_transfer: bool = False) -> Path:
        """``eval.json`` for the paper's attacks, ``eval-strong-<eps>.json`` for a strong suite, and
        ``eval-strong-<eps>-no-transfer.json`` for one run without the table's surrogate (a sweep of some
        columns), so that it never overwrites the table's own."""
        if name == "paper":
            return Path(run_dir) / EVAL_FILE
        return Path(run_dir) / f"eval-{name.replace('@', '-')}{'-no-transfer' if without_transfer else ''}.json"

    def evaluation_file(self, study: Study, label: str, seed: int, name: str) -> tuple[Path, Optional[str]]:
        """(where evaluation ``name`` of (label, seed) goes, the surrogate run folder it uses or None)."""
        run_dir = self.run_dir(study.run_spec(label, seed))
        surrogate = self.surrogate(study, label, seed) if name != "paper" else None
        source = study.table.surrogate
        without = name != "paper" and source not in (None, label) and source not in study.table.reproduced_labels
        return self.eval_file(run_dir, name, without), surrogate

    @staticmethod
    def is_trained(run_dir: Path) -> bool:
        """Finished (``run.json`` written) and its weights readable."""
        return is_complete(run_dir) and weights_problem(run_dir) is None

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
        """Plan column ``label``'s run at ``seed``: trained, pruned from its ``prune_from`` column's run, or
        (a test-time-only defence) derived from its standard twin's run; returns its key."""
        column = study.table.column(label)
        spec = study.run_spec(label, seed)
        where = f"{study.name} {label}, seed {seed}: "
        if column.prune_from is not None:
            source_key = self._plan_run(study, column.prune_from, seed, jobs, cached)
            return self._plan_spec(spec, label, seed, where + "pruning", PRUNE, source_key, jobs, cached)
        if is_test_time_only(spec):
            twin_key = self._plan_spec(standard_twin(spec), label, seed, where + "training (its standard twin)",
                                       TRAIN, None, jobs, cached)
            return self._plan_spec(spec, label, seed, where + "test-time defence on the twin", DERIVE, twin_key,
                                   jobs, cached)
        return self._plan_spec(spec, label, seed, where + "training", TRAIN, None, jobs, cached)

    def _plan_spec(self, spec, label: str, seed: int, title: str, step: str, source_key: Optional[str],
                   jobs: dict, cached: list) -> str:
        """Plan the run of ``spec`` (made from the run ``source_key`` unless it is trained) once."""
        run_dir = self.run_dir(spec)
        key = run_dir.name
        if key in jobs or any(entry["run"] == key and entry["action"] == "cached" for entry in cached):
            return key
        needs = (source_key,) if source_key in jobs else ()
        replace = self._replace_reason(run_dir) or ("source retrained" if needs and is_complete(run_dir) else "")
        if is_complete(run_dir) and not replace:
            cached.append({"column": label, "seed": seed, "run": key, "action": "cached"})
            return key
        source = str(self.runs / source_key) if source_key else None
        jobs[key] = Job(step, key, title, spec.to_dict(), str(run_dir), needs, source_dir=source,
                        priority=PRIORITY_TRAIN, replace=replace)
        return key

    def _replace_reason(self, run_dir: Path) -> str:
        """Why a finished run is trained again ("--force", "unreadable"), or "" (it is not, or not finished)."""
        if not is_complete(run_dir):
            return ""
        problem = weights_problem(run_dir)
        if problem is not None:
            self.say(f"{problem}; the run counts as unfinished and is trained again")
            return "unreadable"
        return "--force" if self.force else ""

    def _plan_evaluations(self, study: Study, label: str, seed: int, jobs: dict, cached: list) -> None:
        spec = study.run_spec(label, seed)
        run_dir = self.run_dir(spec)
        for name, cfg in study.attack_configs(spec, label).items():
            path, surrogate_dir = self.evaluation_file(study, label, seed, name)
            key = f"{run_dir.name}/{path.name}"
            if key in jobs:
                continue
            needs = tuple(k for k in (run_dir.name, Path(surrogate_dir).name if surrogate_dir else None)
                          if k is not None and k in jobs)
            if not needs and not self.force and self.cached_evaluation(path, cfg, spec, surrogate_dir) is not None:
                cached.append({"column": label, "seed": seed, "run": run_dir.name, "action": f"{name} cached"})
                continue
            jobs[key] = Job(EVALUATE, key, f"{study.name} {label}, seed {seed}: {name} attacks", spec.to_dict(),
                            str(run_dir), needs, eval_file=str(path), attack=dataclasses.asdict(cfg),
                            surrogate_dir=surrogate_dir, test_limit=study.test_limit(),
                            priority=PRIORITY_STRONG if name != "paper" else PRIORITY_PAPER)

    def surrogate(self, study: Study, label: str, seed: int) -> Optional[str]:
        """The transfer attack's source: the same seed's model of the spec's ``surrogate`` column, when the
        study holds it."""
        source = study.table.surrogate
        if source is None or label == source or source not in study.table.reproduced_labels:
            return None
        return str(self.run_dir(study.run_spec(source, seed)))

    # ------------------------------------------------------------ reading the cache
    def cached_evaluation(self, path: Path, cfg: AttackConfig, spec, surrogate_dir: Optional[str],
                          quiet: bool = False) -> Optional[dict]:
        """The evaluation in ``path`` if it was made with this attack config, data, spec and weights.

        A file that does not parse, or is not an evaluation, is named in one line (unless ``quiet``) and
        counts as missing, so it is redone."""
        run_dir = Path(path).parent
        if not self.is_trained(run_dir) or (surrogate_dir and not self.is_trained(Path(surrogate_dir))):
            return None
        result, problem = read_evaluation(Path(path))
        if problem is not None:
            if not quiet:
                self.say(f"{path}: {problem}; it is redone")
            return None
        if result is None or result["reproduce_key"] != evaluation_key(cfg, spec, run_dir, surrogate_dir):
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
                for name, cfg in study.attack_configs(spec, label).items():
                    path, surrogate = self.evaluation_file(study, label, seed, name)
                    result = self.cached_evaluation(path, cfg, spec, surrogate, quiet=True)
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
    """What an evaluation depends on, by content: the attack config, the data, the spec, and the SHA-256 of
    the weights (and of the surrogate's). A retrained model (or surrogate) invalidates it; a copy does not."""
    return {"attack": dataclasses.asdict(cfg), "data": dataclasses.asdict(spec.data), "spec": spec.hash(),
            "surrogate": weights_sha256(Path(surrogate_dir)) if surrogate_dir else None,
            "model": weights_sha256(Path(run_dir))}


_DIGESTS: dict = {}


def weights_sha256(run_dir: Path) -> str:
    """The SHA-256 of ``run_dir/model.safetensors``.

    Remembered for the life of the process under the file's inode and change time (``st_ctime``, which
    any write moves and no user can set back), so a plan reads each weights file once."""
    path = Path(run_dir) / MODEL_FILE
    stat = path.stat()
    memo = (str(path.resolve()), stat.st_ino, stat.st_size, stat.st_ctime_ns)
    if memo not in _DIGESTS:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        _DIGESTS[memo] = digest.hexdigest()
    return _DIGESTS[memo]


def weights_problem(run_dir: Path) -> Optional[str]:
    """Why ``run_dir``'s weights cannot be loaded (one line naming the file), or None when they can."""
    from safetensors import safe_open

    path = Path(run_dir) / MODEL_FILE
    try:
        with safe_open(str(path), framework="pt") as handle:
            handle.keys()
    except Exception as err:  # noqa: BLE001 - safetensors raises its own types for a torn or foreign file
        return f"{path}: the weights cannot be read ({type(err).__name__}: {str(err).splitlines()[0]})"
    return None


def read_evaluation(path: Path) -> tuple[Optional[dict], Optional[str]]:
    """``(the evaluation in path, None)``; ``(None, None)`` when there is no file; ``(None, what is wrong)``
    when it does not parse or is not an evaluation (a JSON object with a ``reproduce_key`` object)."""
    try:
        result = json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        return None, None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        return None, f"not valid JSON ({str(err).splitlines()[0]})"
    if not isinstance(result, dict) or not isinstance(result.get("reproduce_key"), dict):
        return None, f"not an evaluation (expected a JSON object with a 'reproduce_key' object, got {_shape(result)})"
    from ..attacks.indicators import upgrade_indicator_names  # lazily: the attacks import torch

    return upgrade_indicator_names(result), None


def _shape(value) -> str:
    return f"an object with keys {sorted(value)[:5]}" if isinstance(value, dict) else type(value).__name__


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


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
    summary = {"key": job.key, "step": job.step}
    if job.step in (TRAIN, PRUNE, DERIVE):
        with run_lock(run_dir):  # a second topkconv process gets RunLockedError naming this folder
            replace = _replace_under_lock(job, run_dir)
            if replace is None:  # finished meanwhile by another process: never trained twice
                summary["skipped"] = "already trained"
            else:
                _make_run(job, spec, run_dir, replace)
    elif job.step == EVALUATE:
        _evaluate(job, spec, run_dir)
    else:
        raise ValueError(f"job {job.key}: unknown step {job.step!r}")
    return dict(summary, seconds=round(time.perf_counter() - start, 1))


def _make_run(job: Job, spec, run_dir: Path, replace: bool) -> None:
    if job.step == TRAIN:
        from ..train import fit

        fit(spec, run_dir, progress=False, force=replace)
    elif job.step == PRUNE:
        from ..pruning import prune_run

        prune_run(job.source_dir, spec, run_dir, progress=False, force=replace)
    else:
        from ..test_time import derive_run

        derive_run(job.source_dir, spec, run_dir, force=replace)


def _replace_under_lock(job: Job, run_dir: Path) -> Optional[bool]:
    """Decided under the run's lock, so no finished run is trained twice: None when the run is now finished
    and readable and the plan did not ask to replace it; else whether ``fit`` replaces a finished run."""
    if not is_complete(run_dir):
        return False
    if weights_problem(run_dir) is not None:
        return True  # the plan logged it; a run whose weights cannot be read is trained again
    return True if job.replace in ("--force", "source retrained") else None  # "unreadable": readable now


def _evaluate(job: Job, spec, run_dir: Path) -> None:
    from .. import distributed
    from ..checkpoint import load_checkpoint
    from ..evaluate import evaluate, write_results
    from ..io import atomic_write_json

    cfg = AttackConfig(**job.attack)
    device = str(distributed.pick_device(spec.train.device, distributed.context().local_rank))
    key = evaluation_key(cfg, spec, run_dir, job.surrogate_dir)  # of the weights about to be loaded
    model = load_checkpoint(run_dir, device=device)[0]
    surrogate = load_checkpoint(job.surrogate_dir, device=device)[0] if job.surrogate_dir else None
    x, y, _ = test_tensors(spec, job.test_limit)
    result = evaluate(model, x, y, cfg, surrogate=surrogate, progress=False)
    result["reproduce_key"] = key
    result["run"] = {"dir": str(run_dir), "name": spec.name, "hash": spec.hash(), "seed": spec.train.seed}
    if distributed.context().is_main:
        path = Path(job.eval_file)
        if path.name == EVAL_FILE:
            write_results(result, path, title=job.title)
        else:
            atomic_write_json(path, result)
