"""The memory budget that bounds the temporaries of the fast routing kernels.

The fast kernels never build the paper's full intermediate tensors (the B x out x in products of
Dynamic-k, the B x out x in x H x W maps of TopKConv). They walk over samples and rows in chunks,
and the bytes of one chunk's temporaries stay below this budget. Smaller budgets mean more, smaller
chunks: the result does not change, only the speed.

    topkconv.functional.set_memory_budget(8 * 2**20)   # process-wide (re-exported there)
    with topkconv.functional.memory_budget(1 << 20):   # for one block of code
        y = layer(x)
"""

from __future__ import annotations

import contextlib
import threading
from typing import Iterator, Tuple

# 8 MiB: far below the paper-sized intermediates (3.3 GB for Dynamic-k 25088 -> 512 at batch 64),
# yet large enough that the per-chunk overhead of Python and op dispatch stays a few percent.
DEFAULT_MEMORY_BUDGET = 8 * 2**20

_state = threading.local()


def get_memory_budget() -> int:
    """Bytes one chunk of a fast kernel may use for its temporaries."""
    return getattr(_state, "budget", DEFAULT_MEMORY_BUDGET)


def set_memory_budget(nbytes: int) -> None:
    """Set the chunk budget in bytes for this thread (at least 1; a chunk always holds one unit of work)."""
    if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 1:
        raise ValueError(f"memory budget must be a positive int number of bytes, got {nbytes!r}")
    _state.budget = nbytes


@contextlib.contextmanager
def memory_budget(nbytes: int):
    """Use ``nbytes`` as the chunk budget inside this block."""
    previous = get_memory_budget()
    set_memory_budget(nbytes)
    try:
        yield
    finally:
        _state.budget = previous


def units_per_chunk(bytes_per_unit: int, total: int, cap_bytes: int | None = None) -> int:
    """How many units (samples, rows) fit in one chunk: at least 1, at most ``total``."""
    limit = get_memory_budget() if cap_bytes is None else min(get_memory_budget(), cap_bytes)
    return max(1, min(total, limit // max(1, bytes_per_unit)))


def chunks(total: int, size: int) -> Iterator[Tuple[int, int]]:
    """(start, stop) pairs covering range(total) in steps of ``size``."""
    for start in range(0, total, size):
        yield start, min(total, start + size)
