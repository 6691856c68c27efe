"""topkconv: sparse top-k routing defences against adversarial examples.

Layers live in :mod:`topkconv.layers` (modules) and :mod:`topkconv.functional` (their functional twins);
defences in :mod:`topkconv.defenses`; :func:`topkconv.convert` puts one into any PyTorch model.
"""

__version__ = "0.1.0"

from ._openmp import shorten_openmp_spin  # noqa: E402

shorten_openmp_spin()  # before anything loads torch: see topkconv/_openmp.py

from .convert import convert  # noqa: E402  (no torch import at package import time)

__all__ = ["convert", "__version__"]
