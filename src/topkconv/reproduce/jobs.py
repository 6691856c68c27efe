"""Run a reproduction's jobs in N worker processes (``--jobs N``), or one after another in this process.

Every job is independent once the jobs it needs are done (:class:`~topkconv.reproduce.workspace.Job`),
and every random draw in a job is seeded from its spec, so the numbers do not depend on which worker
runs a job, in which order, or on N: ``--jobs 2`` writes the same reports as ``--jobs 1``.

* Workers are *spawned* (fresh interpreters), not forked: a fork of a process whose torch and numba
  thread pools are running can deadlock. Each worker runs with one torch thread (the CPU kernels split
  their loops over ``torch.get_num_threads()``), so N workers use N cores.
* No run is given to two workers: the plan holds each run folder once, and a job starts only after the
  jobs it needs. The run folder's lock (:func:`topkconv.checkpoint.run_lock`) also keeps a second
  ``topkconv`` process out of it.
* A killed worker leaves no file that counts (writes are atomic; ``run.json`` is written last), so the
  next call redoes its run.
* Workers die with their parent, however it ends (SIGKILL, Ctrl-C, an error): each asks Linux for SIGKILL
  when its parent dies (``prctl(PR_SET_PDEATHSIG)``) and also watches its parent's pid
  (:mod:`topkconv.lifeline`). Workers start with Ctrl-C ignored (the parent stops them), so an interrupt
  prints the parent's one line and no worker tracebacks.
* ``--jobs`` is capped at the CPUs this process may use, and further at what the available memory holds
  (:data:`WORKER_MEMORY` a worker); a lower cap than asked is said in one line.
* Of the jobs that are ready, a worker takes the longest kind first (strong suite, then training, then
  the paper's attacks), so the end of a run is short jobs on both workers, not one long job beside an idle one.
* Progress: one line per finished job, ``[ 3/30] <what> (<seconds> s)``, never interleaved bars.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Callable, Optional

from ..lifeline import init_worker
from .workspace import Job, execute

START_METHOD = "spawn"
WORKER_MEMORY = 1 << 30   # bytes a worker may take: measured about 650 MB for a quick-preset worker, idle


def uses_gpu(device: str = "auto") -> bool:
    """Whether runs with ``train.device = device`` go to a GPU here."""
    import torch

    return device != "cpu" and torch.cuda.is_available()


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask where the system has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def available_memory() -> Optional[int]:
    """Bytes of memory available for new processes (Linux's MemAvailable), or None where unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def default_jobs(device: str = "auto") -> int:
    """The number of CPU cores when the work runs on the CPU; 1 when a GPU does it."""
    return 1 if uses_gpu(device) else usable_cpus()


def cap_workers(requested: int, say: Callable[[str], None]) -> int:
    """``requested`` workers, at most one per usable CPU and as many as the available memory holds; a cap
    below the request is said in one line."""
    cpus = usable_cpus()
    workers = requested
    if workers > cpus:
        say(f"--jobs {requested}: capped at {cpus}, the number of CPUs")
        workers = cpus
    memory = available_memory()
    if memory is not None and workers > max(1, memory // WORKER_MEMORY):
        fits = max(1, memory // WORKER_MEMORY)
        say(f"--jobs {requested}: capped at {fits}: {memory / 2**30:.1f} GiB of memory is available and a worker "
            f"may take {WORKER_MEMORY / 2**30:.0f} GiB")
        workers = fits
    return workers


def check_jobs(jobs) -> int:
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"--jobs must be a positive number of worker processes, got {jobs!r}")
    return jobs


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_jobs(jobs: list, workers: int = 1, threads: Optional[int] = 1,
             say: Callable[[str], None] = _say) -> list:
    """Run ``jobs`` (ordered so that each comes after what it needs) with ``workers`` processes.

    ``workers == 1`` runs them here, in order, with ``threads`` torch threads (None: leave torch's
    setting). Returns one summary per job in the order they finished. The first failure stops the
    scheduling of new jobs; it is raised once the running ones are done.
    """
    workers = check_jobs(workers)
    if not jobs:
        return []
    keys = {job.key for job in jobs}
    for job in jobs:
        unknown = [need for need in job.needs if need not in keys]
        if unknown:
            raise ValueError(f"job {job.key} needs {unknown}, which are not planned")
    width = len(str(len(jobs)))
    done: list = []

    def report(job: Job, summary: dict) -> None:
        done.append(summary)
        say(f"[{len(done):>{width}}/{len(jobs)}] {job.title} ({summary['seconds']:.1f} s)")

    if workers == 1 or len(jobs) == 1:
        with torch_threads(threads):
            for job in jobs:
                report(job, execute(job))
        return done
    _run_pool(jobs, min(workers, len(jobs)), report)
    return done


def _run_pool(jobs: list, workers: int, report) -> None:
    import multiprocessing

    pending = list(jobs)
    finished: set = set()
    running: dict = {}
    failure: Optional[BaseException] = None
    context = multiprocessing.get_context(START_METHOD)
    with ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=init_worker,
                             initargs=(os.getpid(),)) as pool, \
            _stop_workers_on_interrupt(pool):
        while pending or running:
            if failure is None:
                ready = [j for j in pending if all(n in finished for n in j.needs)]
                for job in sorted(ready, key=lambda j: -j.priority):  # stable: plan order within a priority
                    if len(running) >= workers:
                        break
                    pending.remove(job)
                    with _sigint_ignored():  # a worker it spawns starts with Ctrl-C ignored, even while importing
                        running[pool.submit(execute, job)] = job
            if not running:
                break
            ready, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in ready:
                job = running.pop(future)
                try:
                    summary = future.result()
                except BrokenProcessPool:
                    raise RuntimeError(f"a worker process died while running {job.title} ({job.key}); its "
                                       f"files are incomplete and the next call redoes it") from None
                except BaseException as err:  # noqa: BLE001 - re-raised below, after the running jobs end
                    failure = failure or err
                    continue
                finished.add(job.key)
                report(job, summary)
    if failure is not None:
        raise failure


@contextlib.contextmanager
def _stop_workers_on_interrupt(pool):
    """Ctrl-C (or any error here) stops the workers at once instead of waiting for their jobs to end; what
    they leave is incomplete and redone by the next call."""
    try:
        yield
    except BaseException:
        # no public way to reach the workers before 3.14; taken before shutdown, which forgets them
        processes = list((getattr(pool, "_processes", None) or {}).values())
        pool.shutdown(wait=False, cancel_futures=True)
        for process in processes:  # they ignore Ctrl-C: stopping them is this process's job
            process.terminate()
        raise


@contextlib.contextmanager
def _sigint_ignored():
    """SIGINT ignored for the block: a process spawned in it inherits that (Python keeps an ignored SIGINT
    ignored), so Ctrl-C reaches the parent alone, which then stops the workers. Main thread only.

    SIGINT is also blocked for the block (where the platform can), so that a Ctrl-C pressed while a job is
    being handed out is not lost: Linux keeps a blocked signal pending even while it is ignored, and it
    reaches the restored handler when the block ends (an ignored, unblocked Ctrl-C was dropped, and the run
    went on to its end)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    can_block = hasattr(signal, "pthread_sigmask")
    if can_block:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, before)
        if can_block:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


@contextlib.contextmanager
def torch_threads(threads: Optional[int]):
    """Run with ``threads`` intra-op threads, then restore."""
    import torch

    if threads is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
