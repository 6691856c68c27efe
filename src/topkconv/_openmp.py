"""How long torch's OpenMP workers spin after a parallel region: shortened for the numba loops' sake.

libgomp (the OpenMP runtime of torch's CPU wheels) keeps its worker threads spinning for 300,000 iterations
after every parallel region, waiting for the next one. The routing layers' numba loops run between torch ops,
on Python threads (:mod:`topkconv.layers.kernels.bridge`), so with 2 torch threads on 2 cores they shared the
cores with spinning workers and gained nothing from the second thread. ``GOMP_SPINCOUNT=30000`` lets the
workers sleep sooner. Measured with ``benchmarks/bench_models.py --settings small --threads 2`` (vgg-small
width 0.25, batch 64, a 2-core Intel Xeon VM, the two settings alternated three times): the standard model's
train step 19.0-20.0 ms at the default, 19.1-21.8 ms at 30,000 (3,000 made it 25.5 ms); TKC-max's 37.1-39.1 ms,
then 31.9-33.6 ms (BENCHMARKS.md, Threads).

libgomp reads the setting once, when torch loads it, so it takes effect only when ``topkconv`` is imported
before ``torch`` (as the ``topkconv`` command does), and never over a user's own ``GOMP_SPINCOUNT`` or
``OMP_WAIT_POLICY``. Kept free of torch imports.
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager

SPIN_COUNT = "30000"
NUMBA_SPIN_COUNT = "1000"  # numba's own OpenMP workers: see numba_workers_spin_briefly
USER_SETTINGS = ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")


def shorten_openmp_spin(environ=os.environ, modules=sys.modules) -> bool:
    """Set ``GOMP_SPINCOUNT`` to :data:`SPIN_COUNT` unless torch is already loaded or the user chose a spin
    setting; returns whether it was set."""
    if "torch" in modules or any(name in environ for name in USER_SETTINGS):
        return False
    environ["GOMP_SPINCOUNT"] = SPIN_COUNT
    return True


@contextmanager
def numba_workers_spin_briefly(environ=os.environ):
    """Around numba's first parallel launch: its OpenMP threading layer loads a libgomp of its own then, which
    reads ``GOMP_SPINCOUNT`` once. With :data:`SPIN_COUNT` its workers spun about a millisecond after each of the
    routing loops' regions, on the cores torch's next op wanted: measured with ``bench_models.py --threads 2``,
    the Dynamic-k and TKC-neuron steps that followed a TKC model's in the same process slowed by about 2 ms.
    :data:`NUMBA_SPIN_COUNT` lets them sleep soon; torch's workers keep :data:`SPIN_COUNT`. Only when the value
    in the environment is the one this module set (a user's setting is theirs)."""
    ours = environ.get("GOMP_SPINCOUNT") == SPIN_COUNT and "OMP_WAIT_POLICY" not in environ
    if ours:
        environ["GOMP_SPINCOUNT"] = NUMBA_SPIN_COUNT
    try:
        yield
    finally:
        if ours:
            environ["GOMP_SPINCOUNT"] = SPIN_COUNT
