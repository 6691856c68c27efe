"""numba, when it is installed: the one switch between compiled CPU loops and plain Python fallbacks.

``fastmath`` allows only reassociation and contraction (vectorised sums and FMA); infinities and NaNs
keep their meaning. Compiled code is cached next to the source (or in ``NUMBA_CACHE_DIR``), so a
process pays the few seconds of compilation once per machine.
"""

from __future__ import annotations

import os


def _prefer_512_bit_vectors() -> None:
    """On an AVX-512 CPU, let LLVM vectorise numba's loops 512 bits wide (16 float32 lanes).

    LLVM's x86 tuning prefers 256-bit vectors on AVX-512 parts (a clock penalty of early AVX-512 chips);
    numba keeps that default. Measured on this project's 2-core Xeon VM: the TopKConv loops ran about 12%
    faster at 16 lanes. The setting is numba's own (``NUMBA_CPU_FEATURES``: the host's features plus
    ``-prefer-256-bit``, as numba's own tests set it), read when numba compiles; a value the user set is
    kept, and compiled code is cached per feature string, so the two never mix."""
    if "NUMBA_CPU_FEATURES" in os.environ:
        return
    try:
        import llvmlite.binding as llvm
        features = llvm.get_host_cpu_features().flatten()
    except (ImportError, RuntimeError):  # no llvmlite (no numba), or a host LLVM cannot describe
        return
    if "+avx512f" in features.split(","):
        os.environ["NUMBA_CPU_FEATURES"] = features + ",-prefer-256-bit"


_prefer_512_bit_vectors()

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


def jit_pieces(fn):
    """Compile ``fn(*args, pieces)``, whose loop ``for p in prange(pieces)`` runs on numba's own threads (the
    function itself, its loop serial, without numba). See :func:`.bridge.run_pieces` for why."""
    if numba is None:
        return fn
    return numba.njit(parallel=True, nogil=True, cache=_CACHE, fastmath=_FASTMATH)(fn)


prange = range if numba is None else numba.prange


def inline(fn):
    """Compile a helper to be inlined into its jitted callers (numba IR inlining): a call to a jitted
    function that takes arrays costs reference counting, which a per-row helper would pay per row."""
    if numba is None:
        return fn
    return numba.njit(inline="always")(fn)

