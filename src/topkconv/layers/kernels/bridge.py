"""The bridge between torch and the compiled loops: tensors as numpy views, and the loops split over
``torch.get_num_threads()`` Python threads.

The numba loops release the GIL, so a plain thread pool runs them in parallel. Work is cut only along
axes whose outputs do not overlap, so no two threads ever add into the same entry. The pool is
rebuilt when the thread count changes or after a fork (threads do not survive one).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch


def as_array(t: torch.Tensor) -> np.ndarray:
    """A numpy view of a CPU tensor (no copy). Only the numba backend converts: the torch-level
    kernels never leave torch, so they run on any device."""
    return t.detach().numpy()


def threads() -> int:
    return max(1, torch.get_num_threads())


_pool = (None, 0, 0)  # (executor, its size, the pid that made it)


# Below this many multiply-adds (or comparable steps) a call runs on the calling thread: handing
# pieces to the pool and waiting for them costs tens of microseconds, more than the work saves.
MIN_THREADED_WORK = 1 << 20


def split(total: int, run, work: int | None = None) -> None:
    """run(start, stop) over [0, total), cut into torch.get_num_threads() pieces run in parallel;
    ``work`` (the call's multiply-adds, if known) below :data:`MIN_THREADED_WORK` runs it in one piece."""
    global _pool
    count = 1 if work is not None and work < MIN_THREADED_WORK else min(threads(), total)
    if count <= 1:
        run(0, total)
        return
    executor, size, pid = _pool
    if executor is None or size != count - 1 or pid != os.getpid():
        executor = ThreadPoolExecutor(max_workers=count - 1, thread_name_prefix="topkconv")
        _pool = (executor, count - 1, os.getpid())
    step = -(-total // count)
    # the first piece runs on the calling thread, which would otherwise only wait: one hand-off fewer a call
    futures = [executor.submit(run, s, min(total, s + step)) for s in range(step, total, step)]
    try:
        run(0, min(total, step))
    finally:
        for future in futures:
            future.result()


def split_gradients(batch: int, rows: int, need_x: bool, need_w: bool, run, work: int | None = None) -> None:
    """run(need_x, need_w, b0, b1, c0, c1) over every (sample, output row) pair. On one thread (or for
    ``work`` below :data:`MIN_THREADED_WORK`) a single call; on several, the input gradient split by
    sample and the weight gradient by output row, in two passes, so that no two threads add into the
    same entry."""
    if threads() == 1 or (work is not None and work < MIN_THREADED_WORK):
        run(need_x, need_w, 0, batch, 0, rows)
        return
    if need_x:
        split(batch, lambda b0, b1: run(True, False, b0, b1, 0, rows))
    if need_w:
        split(rows, lambda c0, c1: run(False, True, 0, batch, c0, c1))


# The threading layers whose launches may come from several Python threads at once (numba's "workqueue" aborts
# the process then), and whose workers are ready when a torch op has just ended: see run_pieces.
_SAFE_LAYERS = ("omp", "tbb")
_layer_safe = None  # unknown until the first launch


def run_pieces(serial, parallel, args: tuple, total: int, work: int | None = None) -> None:
    """``serial(*args, start, stop)`` over [0, total) in torch.get_num_threads() pieces, as :func:`split` cuts
    them, run on numba's threads by ``parallel(*args, pieces)`` (its ``prange`` over the pieces).

    Why not :func:`split`'s Python threads: after a parallel torch op, torch's OpenMP workers spin for about a
    millisecond (``GOMP_SPINCOUNT``, :mod:`topkconv._openmp`) on the other cores, and a pool thread woken there
    shares its core with one. Measured on the 2-core VM at 2 threads, TopKConv's forward loops (64 -> 64 at 4 x 4,
    batch 64) right after a torch op: 1.96-2.01 ms through the pool, 1.35-1.41 ms through ``prange`` on numba's
    OpenMP layer (1.23-1.24 ms with no torch op before). Only when numba's layer is OpenMP or TBB (thread-safe);
    under its "workqueue" layer the pool serves."""
    global _layer_safe
    count = 1 if work is not None and work < MIN_THREADED_WORK else min(threads(), total)
    if count <= 1 or _layer_safe is False:
        split(total, lambda start, stop: serial(*args, start, stop), work)
        return
    import numba

    numba.set_num_threads(min(count, numba.config.NUMBA_NUM_THREADS))
    if _layer_safe is None:  # the first launch loads numba's threading layer
        from ..._openmp import numba_workers_spin_briefly

        with numba_workers_spin_briefly():
            parallel(*args, count)
        _layer_safe = numba.threading_layer() in _SAFE_LAYERS
    else:
        parallel(*args, count)
