"""topkconv: sparse top-k routing defences against adversarial examples.

Layers live in :mod:`topkconv.layers` (modules) and :mod:`topkconv.functional` (their functional twins).
"""

__version__ = "0.1.0"
