"""Which categories ``draws`` draws with replacement hit: SAP's sampling step, exact and in O(n + draws).

``torch.multinomial(p, draws, replacement=True)`` does a binary search per draw and was the largest single
cost of a SAP model's forward pass (43% of a forward-backward on the quick VGG, measured with
``torch.profiler``). SAP needs only whether each activation was drawn at least once, so the draws are
made as sorted uniforms, from normalised cumulative sums of exponential spacings (Devroye 1986, ch. V.3),
and merged with the cumulative distribution in one pass per row. The draws have the same distribution as
multinomial's; only the random stream differs.
"""

from __future__ import annotations

from typing import Optional

import torch

from .bridge import as_array, split
from .jit import AVAILABLE as NUMBA_AVAILABLE
from .jit import jit


@jit
def _merge_hits(cdf, points, hit, b0, b1):
    # hit[b, j] = True for the bin [cdf[j-1], cdf[j]) of every sorted point; a point at or past the last
    # edge (float rounding) goes to the last bin, as searchsorted(..., right=True).clamp(max=n - 1) does.
    n = cdf.shape[1]
    for b in range(b0, b1):
        j = 0
        for t in points[b]:
            while j < n - 1 and cdf[b, j] <= t:
                j += 1
            hit[b, j] = True


def categories_hit(p: torch.Tensor, draws: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """(B, n) bool: whether any of ``draws`` independent draws from the categorical distribution of row
    ``p[b]`` (non-negative weights; they need not sum to 1) picks category j. A category of weight 0 is
    never hit; a row of zeros hits nothing that matters to SAP (its activations are zero)."""
    rows, n = p.shape
    # float64 sums: the cumulative sums of thousands of float32 values would shift the bin edges
    spacings = torch.rand((rows, draws + 1), generator=generator, dtype=torch.float64, device=p.device)
    points = spacings.neg_().log1p_().neg_().cumsum_(1)        # Exp(1) spacings, summed: sorted
    cdf = p.detach().to(torch.float64).cumsum(1)
    points = points[:, :draws] * (cdf[:, -1:] / points[:, -1:])  # sorted uniforms on [0, total)
    if NUMBA_AVAILABLE and p.device.type == "cpu":
        hit = torch.zeros((rows, n), dtype=torch.bool)
        arrays = (as_array(cdf), as_array(points.contiguous()), as_array(hit))
        split(rows, lambda b0, b1: _merge_hits(*arrays, b0, b1))
        return hit
    bins = torch.searchsorted(cdf, points, right=True).clamp_(max=n - 1)
    return torch.zeros((rows, n), dtype=torch.bool, device=p.device).scatter_(1, bins, True)
