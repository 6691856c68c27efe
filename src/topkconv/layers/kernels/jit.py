"""numba, when it is installed: the one switch between compiled CPU loops and plain Python fallbacks.

``fastmath`` allows only reassociation and contraction (vectorised sums and FMA); infinities and NaNs
keep their meaning. Compiled code is cached next to the source (or in ``NUMBA_CACHE_DIR``), so a
process pays the few seconds of compilation once per machine.
"""

from __future__ import annotations

try:
    import numba
except ImportError:  # the torch-level kernels serve instead
    numba = None

AVAILABLE = numba is not None
_FASTMATH = {"reassoc", "contract"}
_CACHE = True


def jit(fn):
    """Compile ``fn`` as a GIL-free numba function (the function itself without numba)."""
    if numba is None:
        return fn
    return numba.njit(nogil=True, cache=_CACHE, fastmath=_FASTMATH)(fn)


def inline(fn):
    """Compile a helper to be inlined into its jitted callers (numba IR inlining): a call to a jitted
    function that takes arrays costs reference counting, which a per-row helper would pay per row."""
    if numba is None:
        return fn
    return numba.njit(inline="always")(fn)

