"""Run folders: their file names, the lock that keeps one writer per folder, and checkpoints.

A run folder holds ``model.safetensors`` (the weights) plus ``run.json`` (the spec and how the run was
made), the trainer's ``metrics.jsonl``, ``train_state.json`` and ``state/``, and evaluate's ``eval*.json``
and ``*acc-vs-eps.png``. The names are the constants below; nothing else spells them out.

``run.json`` holds ``spec`` (the full RunSpec the model is rebuilt from: the model fields that the data
decides, such as channels and mean/std, are filled in), ``hash`` (the hash of the spec as requested,
which names the run folder), ``resolved_hash`` (the hash of ``spec``), ``env``
(:func:`topkconv.io.environment_info`) and ``extra`` (whatever the caller adds: the trainer's summary,
pruning's sparsity). The weights carry ``resolved_hash`` in their safetensors metadata, so weights copied
in from another run are refused when loaded.

Nothing here unpickles: weights are safetensors and everything else is JSON. ``run.json`` is written
after the weights, so its presence marks a complete checkpoint. :func:`run_lock` is held by every
writer of a folder (train, prune, evaluate).
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import threading
from pathlib import Path
from typing import Iterator, Optional

from torch import nn

from .config import RunSpec, spec_from_dict, without_retired_keys
from .errors import UserError
from .io import atomic_save_safetensors, atomic_write_json, environment_info, read_json

# ---------------------------------------------------------------- the files of a run folder
MODEL_FILE = "model.safetensors"
RUN_FILE = "run.json"                # written last: its presence marks a complete run
METRICS_FILE = "metrics.jsonl"
STATE_FILE = "train_state.json"      # the trainer's per-epoch commit record (see topkconv.train)
STATE_DIR = "state"                  # the tensors that STATE_FILE names
EVAL_FILE = "eval.json"              # evaluate's default output
PLOT_FILE = "acc-vs-eps.png"         # beside eval.json; ``<stem>-acc-vs-eps.png`` beside other eval files
CURVES_FILE = "strength-curves.json"  # evaluate's attack-strength curves, named as PLOT_FILE is
CURVES_PLOT = "strength-curves.png"
# Every artefact an evaluation leaves (evaluate's ``write_results``: the JSON, its Markdown and its plot; the
# strong suites' ``eval-<suite>.json``; the strength curves). One list, used by every retrain, replace and
# extend, so that no verdict of older weights survives beside new ones.
EVALUATION_PATTERNS = ("eval*.json", "eval*.md", f"*{PLOT_FILE}", f"*{CURVES_FILE}", f"*{CURVES_PLOT}")


def beside(out, name: str) -> Path:
    """``name`` beside evaluate's default output (eval.json), ``<stem>-name`` beside any other: two evaluations
    written to one folder keep their own plots and curves."""
    out = Path(out)
    return out.parent / (name if out.name == EVAL_FILE else f"{out.stem}-{name}")
TEMP_PATTERN = ".*.tmp"               # topkconv.io's atomic writes: a writer killed mid-write leaves one
LOCK_FILE = ".topkconv.lock"         # held by the one process writing the folder (see run_lock)
STAGING_DIR = ".replacing"           # a --force retrain's first epoch, until it replaces the old run
FORMAT_VERSION = 1
SPEC_HASH_KEY = "topkconv.spec_hash"  # safetensors metadata: the resolved spec the weights were trained for


def evaluation_files(run_dir) -> list[Path]:
    """Every evaluation artefact in ``run_dir`` (:data:`EVALUATION_PATTERNS`), each once, sorted."""
    run_dir = Path(run_dir)
    found = {path for pattern in EVALUATION_PATTERNS for path in run_dir.glob(pattern) if path.is_file()}
    return sorted(found)


def result_files(run_dir) -> list[Path]:
    """The files that describe a run's final weights: ``run.json`` (first), then :func:`evaluation_files`."""
    run_dir = Path(run_dir)
    found = [run_dir / RUN_FILE] if (run_dir / RUN_FILE).exists() else []
    return found + evaluation_files(run_dir)


def run_files(run_dir) -> list[Path]:
    """Every file or folder of ``run_dir`` that belongs to a run: the results (:func:`result_files`, first),
    weights, metrics, training state and the temporary files of a writer killed mid-write
    (:data:`TEMP_PATTERN`); not the lock, nor files a user put there."""
    run_dir = Path(run_dir)
    names = [MODEL_FILE, METRICS_FILE, STATE_FILE, STATE_DIR]
    leftovers = sorted(run_dir.glob(TEMP_PATTERN))  # (those inside STATE_DIR go with it)
    return result_files(run_dir) + [run_dir / name for name in names if (run_dir / name).exists()] + leftovers


def is_complete(run_dir) -> bool:
    """Whether ``run_dir`` holds a finished run (its weights and ``run.json``)."""
    run_dir = Path(run_dir)
    return (run_dir / RUN_FILE).is_file() and (run_dir / MODEL_FILE).is_file()


def clear_run(run_dir, results_only: bool = False) -> None:
    """Remove every run file of ``run_dir`` (or only its results), ``run.json`` first, so that no
    half-cleared folder passes for a complete run."""
    for path in (result_files if results_only else run_files)(run_dir):
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def replace_run(run_dir, staging) -> None:
    """Replace the run in ``run_dir`` by the one in ``staging`` (a folder inside it): the old run files go,
    then the new ones move in by ``os.replace``, the training state last because it commits the epoch."""
    run_dir, staging = Path(run_dir), Path(staging)
    clear_run(run_dir)
    for path in sorted(staging.iterdir(), key=lambda p: p.name == STATE_FILE):
        os.replace(path, run_dir / path.name)
    staging.rmdir()


def output_folder(out_dir: Path, force: bool, writes: bool, verb: str) -> tuple[Path, bool]:
    """``(folder to write, whether it replaces a finished run)`` for a run made from another (pruned, or given
    a test-time defence): a finished run in ``out_dir`` is refused unless ``force``, and then stays complete
    until the new one is (the new one is written beside it, then :func:`replace_run` moves it in)."""
    replacing = is_complete(out_dir)
    if replacing and not force:
        raise UserError(f"{out_dir} already holds a finished run; to keep it, {verb} into another --out; to "
                        f"replace it, add --force (it stays intact until the new run is complete)")
    work_dir = out_dir / STAGING_DIR if replacing else out_dir
    if writes:
        work_dir.mkdir(parents=True, exist_ok=True)
        clear_run(work_dir)
    return work_dir, replacing


# ---------------------------------------------------------------- one writer per run folder

class RunLockedError(RuntimeError):
    """Another process (or thread) is writing the run folder."""

    def __init__(self, run_dir, pid: Optional[int]):
        self.run_dir, self.pid = Path(run_dir), pid
        holder = f"pid {pid}" if pid is not None else "a process whose pid is not yet recorded"
        super().__init__(f"{run_dir} is being written by another topkconv process ({holder}); wait for it to "
                         f"finish or stop it, or use another folder")


_held: dict[str, int] = {}      # resolved run folder -> thread ident holding it in this process
_held_guard = threading.Lock()


@contextlib.contextmanager
def run_lock(run_dir) -> Iterator[Path]:
    """Hold ``run_dir``'s lock (creating the folder) for the life of the block; yields the folder.

    The lock is an advisory POSIX record lock (``lockf``) on ``run_dir/.topkconv.lock``, which records the
    holder's pid. The kernel releases it when the holder exits in any way, and forked children (loader
    workers) do not inherit it, so the lock of a killed process is stale at once and the next writer takes
    it over. A second writer gets :class:`RunLockedError` naming the folder and the pid. Nesting in the same
    thread is allowed (``reproduce`` holds the lock around ``fit``). Creating the folder and the lock file
    also checks, before any compute, that the folder can be written. POSIX locks also work on NFS.
    """
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"{run_dir}: is a file, not a folder (expected a run folder)")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"{run_dir}: cannot create the run folder ({err.strerror})") from None
    key = str(run_dir.resolve())
    me = threading.get_ident()
    with _held_guard:
        owner = _held.get(key)
        if owner is not None and owner != me:
            raise RunLockedError(run_dir, os.getpid())
    if owner == me:  # nested: the outer block holds it
        yield run_dir
        return
    fd = _acquire(run_dir)
    with _held_guard:
        _held[key] = me
    try:
        yield run_dir
    finally:
        with _held_guard:
            _held.pop(key, None)
        # Unlink before unlocking: a process waiting on the old file then sees that it is gone and retries.
        # (A POSIX lock is dropped when the process closes any descriptor of the file: nothing else here opens it.)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(run_dir / LOCK_FILE)
        os.close(fd)


def _acquire(run_dir: Path) -> int:
    import fcntl

    path = run_dir / LOCK_FILE
    for _ in range(100):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise UserError(f"{run_dir}: cannot write in the run folder ({err.strerror})") from None
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            pid = _recorded_pid(fd)
            os.close(fd)
            if err.errno not in (errno.EACCES, errno.EAGAIN):
                raise UserError(f"{run_dir}: cannot lock the run folder ({err.strerror})") from None
            raise RunLockedError(run_dir, pid) from None
        try:
            current = os.stat(path).st_ino
        except FileNotFoundError:
            current = None
        if current == os.fstat(fd).st_ino:  # still the lock file (not one a releasing holder just unlinked)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            return fd
        os.close(fd)
    raise RunLockedError(run_dir, None)


def _recorded_pid(fd: int) -> Optional[int]:
    try:
        return int(os.pread(fd, 32, 0).decode().strip())
    except (OSError, ValueError):
        return None


# ---------------------------------------------------------------- checkpoints

def unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside a DistributedDataParallel (or DataParallel) wrapper."""
    return getattr(model, "module", model)


def save_weights(path, model: nn.Module, spec_hash: str) -> None:
    """``model``'s weights as safetensors (atomically), tagged with the hash of the resolved spec they
    were trained for, so that weights copied in from another run are caught when they are loaded."""
    atomic_save_safetensors(path, unwrap(model).state_dict(), metadata={SPEC_HASH_KEY: spec_hash})


def save_checkpoint(run_dir, model: nn.Module, spec: RunSpec, extra: Optional[dict] = None,
                    requested_hash: Optional[str] = None) -> Path:
    """Write ``run_dir/model.safetensors`` and then ``run_dir/run.json``, each atomically; returns run_dir.

    ``requested_hash`` is the hash of the spec before the data filled in the model fields (the trainer
    passes it); by default it is ``spec.hash()``.
    """
    run_dir = Path(run_dir)
    save_weights(run_dir / MODEL_FILE, model, spec.hash())
    record = {
        "format_version": FORMAT_VERSION,
        "spec": spec.to_dict(),
        "hash": requested_hash or spec.hash(),
        "resolved_hash": spec.hash(),
        "env": environment_info(),
        "extra": extra or {},
    }
    atomic_write_json(run_dir / RUN_FILE, record)
    return run_dir


def read_run_json(path, allow_unfinished: bool = False) -> dict:
    """``run.json`` of a run dir (or of the folder holding a given ``model.safetensors``).

    With ``allow_unfinished``, a run that was stopped (killed, or a non-finite loss) before writing
    ``run.json`` yields its training-state record instead, whose ``spec`` matches its last saved weights.
    """
    return _run_record(run_folder(path), allow_unfinished)[1]


def _run_record(run_dir: Path, allow_unfinished: bool) -> tuple[Path, dict]:
    """(the record file, its content): ``run.json``, or the training state of an unfinished run."""
    run_file = run_dir / RUN_FILE
    state_file = run_dir / STATE_FILE
    if not run_file.is_file() and state_file.is_file():
        if not allow_unfinished:
            raise FileNotFoundError(f"{run_file} not found: the run in {run_dir} is unfinished; continue it with "
                                    f"`topkconv train --resume --out {run_dir}`, or evaluate its last finished "
                                    f"epoch with `topkconv evaluate --allow-unfinished {run_dir}`")
        run_file = state_file
    record = read_json(run_file, f"run record (is {run_dir} a training run?)")
    if not isinstance(record, dict) or "spec" not in record:
        raise ValueError(f"{run_file}: expected a JSON object with a 'spec' key")
    # keys an earlier version wrote and this one no longer reads: every reader of a run record gets them dropped
    return run_file, {**record, "spec": without_retired_keys(record["spec"])}


def load_checkpoint(path, device: str = "cpu", allow_unfinished: bool = False) -> tuple[nn.Module, RunSpec]:
    """Rebuild the model from ``run.json`` and load ``model.safetensors``; returns ``(model in eval mode, spec)``.

    ``path`` is a run dir or its ``model.safetensors``. Errors name the file. ``allow_unfinished`` loads
    the last finished epoch of a run that stopped early (see :func:`read_run_json`). Weights tagged with
    another spec than the record's (copied in from another run) are refused.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    from .models import build_model

    run_dir = run_folder(path)
    run_file, record = _run_record(run_dir, allow_unfinished)
    try:
        spec = spec_from_dict(record["spec"])
    except ValueError as err:
        raise ValueError(f"{run_file}: {err}") from None
    weights_file = run_dir / MODEL_FILE
    if not weights_file.is_file():
        raise FileNotFoundError(f"{weights_file} not found")
    try:
        with safe_open(str(weights_file), framework="pt") as handle:
            tagged = (handle.metadata() or {}).get(SPEC_HASH_KEY)
        state = load_file(weights_file, device=str(device))
    except Exception as err:  # safetensors raises its own error types for a torn or foreign file
        raise ValueError(f"{weights_file}: cannot read safetensors ({type(err).__name__}: {err})") from None
    # The spec the model is rebuilt from is the identity: its hash is computed here, never read from the
    # record, so an edited spec (another defence under the old resolved_hash) cannot pass.
    rebuilt = spec.hash()
    if tagged is not None and tagged != rebuilt:
        raise UserError(f"{weights_file}: these weights were trained for spec {tagged}, but the spec in {run_file} "
                        f"hashes to {rebuilt} (weights copied from another run, or the spec edited?)")
    model = build_model(spec.model)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(f"{weights_file}: weights do not fit the model described by {run_file}: {err}") from None
    return model.to(device).eval(), spec


def run_folder(path) -> Path:
    """The run folder named by ``path``: the folder itself, or the folder of its ``model.safetensors``."""
    path = Path(os.fspath(path))
    if path.is_dir():
        return path
    if path.name == MODEL_FILE or path.suffix == ".safetensors":
        return path.parent
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path} (expected a run folder or its {MODEL_FILE})")
    raise ValueError(f"{path}: expected a run folder or its {MODEL_FILE}")


def requested_spec(run_dir, required: bool = True) -> Optional[dict]:
    """The spec (a dict, as given) that the training state in ``run_dir`` was started with: what
    ``train --out DIR --resume`` continues. None if there is no state and it is not ``required``."""
    from .io import read_json

    state_file = Path(run_dir) / STATE_FILE
    if not state_file.is_file():
        if not required:
            return None
        raise FileNotFoundError(f"{state_file}: nothing to resume (no finished epoch in {run_dir}); "
                                f"give the run's flags or --spec to start it")
    state = read_json(state_file, "training state")
    if not isinstance(state, dict) or "requested_spec" not in state:
        raise ValueError(f"{state_file}: written by an older version without its spec; "
                         f"give the run's flags or --spec together with --resume")
    return state["requested_spec"]

