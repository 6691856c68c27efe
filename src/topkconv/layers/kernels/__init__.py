"""The routing kernels, one file per concern.

* :mod:`.backends`: the dispatch table from an ``impl`` name and the inputs to a backend.
* :mod:`.selection`: exact row-wise top-k (torch two-stage search; numba bucket selection).
* :mod:`.linear`, :mod:`.conv`: the chunked torch-level routing kernels (any device).
* :mod:`.sampling`: which categories draws with replacement hit (SAP), exact, O(n + draws) per row.
* :mod:`.numba_loops`: the compiled CPU routing loops.
* :mod:`.simd`: vector steps the compiled loops do not vectorise by themselves (LLVM intrinsics).
* :mod:`.bridge`: torch tensors as numpy views, and the compiled loops split over threads.
* :mod:`.budget`: the memory budget that bounds every chunk's temporaries.
* :mod:`.jit`: whether numba is there, and how its functions are compiled.
"""
