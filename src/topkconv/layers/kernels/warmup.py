"""Compile the numba loops once, at install time (``python -m topkconv.layers.kernels.warmup``).

numba caches its machine code next to the source, so this is what a C extension's build step would be:
the Makefile runs it after installing the package, and later processes (every ``reproduce --jobs``
worker among them) load the cache in well under a second instead of each compiling for ~10 s.
"""

from __future__ import annotations

import time

import torch

from .jit import AVAILABLE


def compile_kernels() -> float:
    """Run every numba-backed layer path once per float dtype, forward and backward (and forward only), and SAP's
    draws (one dtype: they are merged in float64 whatever the activations' dtype); returns the seconds."""
    from ..sap import stochastic_activation_pruning
    from ..topk_conv import TopKConv2d
    from ..topk_linear import TopKLinear

    started = time.perf_counter()
    generator = torch.Generator().manual_seed(0)
    threads = torch.get_num_threads()
    for dtype in (torch.float32, torch.float64):
        x = torch.randn(2, 8, 6, 6, dtype=dtype, generator=generator, requires_grad=True)
        # large enough to be cut into pieces on numba's threads (bridge.run_pieces), at 2 torch threads
        wide = torch.randn(2, 64, 12, 12, dtype=dtype, generator=generator, requires_grad=True)
        for criterion in ("max", "sum"):
            conv = TopKConv2d(8, 8, 3, k=3, criterion=criterion, padding=1, impl="numba", dtype=dtype)
            conv(x).sum().backward()
            try:
                torch.set_num_threads(2)
                TopKConv2d(64, 64, 3, k=32, criterion=criterion, padding=1, impl="numba",
                           dtype=dtype)(wide).sum().backward()
            finally:
                torch.set_num_threads(threads)
        features = torch.randn(2, 20, dtype=dtype, generator=generator, requires_grad=True)
        for positive_only in (False, True):
            for k in (3, 17):  # the sorted registers (k <= 16) and the search loops (larger k, non-finite samples)
                layer = TopKLinear(20, 4, k=k, positive_only=positive_only, impl="numba", dtype=dtype)
                layer(features).sum().backward()
                with torch.inference_mode():  # the forward-only value
                    layer(features)
    stochastic_activation_pruning(torch.rand(2, 16, generator=generator), 0.8, generator)
    return time.perf_counter() - started


if __name__ == "__main__":
    if AVAILABLE:
        print(f"numba kernels compiled and cached in {compile_kernels():.1f} s")
    else:
        print("numba is not installed: the torch-level kernels serve instead")
