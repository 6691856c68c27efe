"""SAP's forward and backward: the merge of sorted draws (topkconv.layers.kernels.sampling) against
``torch.multinomial`` with replacement (how SAP was first written here), at the quick VGG's activation
shapes for a batch of 100, side by side in one run.

    python benchmarks/bench_sap.py            # medians of 9, one torch thread

Prints one Markdown table: milliseconds per SAP forward + backward for each activation shape, then for the
whole quick SAP VGG (randomly initialised, eval mode, 100 digits-sized images), and the ratios.
"""

from __future__ import annotations

import sys

import torch

from bench_selection import median_ms  # the same median-of-9 timer (run from the repository root)
from topkconv.config import ModelConfig, defense_config
from topkconv.layers import sap as sap_module
from topkconv.layers.sap import stochastic_activation_pruning
from topkconv.models import build_model

# (channels, height, width) of the quick VGG's activations (width 0.25 on 32 x 32 digits), and its hidden layer
SHAPES = [(8, 32, 32), (16, 16, 16), (32, 8, 8), (64, 4, 4), (128,)]
BATCH = 100


def multinomial_sap(h: torch.Tensor, frac: float, generator: torch.Generator) -> torch.Tensor:
    """The same SAP with torch.multinomial's draws (one binary search per draw)."""
    flat = h.reshape(h.shape[0], -1)
    draws = max(1, round(frac * flat.shape[1]))
    magnitude = flat.detach().abs()
    p = magnitude / magnitude.sum(1, keepdim=True).clamp_min(torch.finfo(magnitude.dtype).tiny)
    sampled = torch.multinomial(p, draws, replacement=True, generator=generator)
    kept = torch.zeros_like(p, dtype=torch.bool).scatter_(1, sampled, True) & (magnitude > 0)
    keep_prob = -torch.expm1(draws * torch.log1p(-p))
    scale = torch.where(kept, 1.0 / keep_prob.clamp_min(torch.finfo(p.dtype).tiny), torch.zeros_like(p))
    return (flat * scale).reshape_as(h)


def step(sap, h: torch.Tensor, generator: torch.Generator) -> None:
    x = h.detach().requires_grad_()
    sap(x, 0.8, generator).sum().backward()


def main() -> int:
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(0)
    lines = ["| activation shape | batch | draws per sample | multinomial ms | sorted-draw merge ms | ratio |",
             "|" + " --- |" * 6]
    for shape in SHAPES:
        h = torch.relu(torch.randn(BATCH, *shape, generator=generator))
        draws = round(0.8 * h[0].numel())
        before = median_ms(lambda: step(multinomial_sap, h, generator))
        after = median_ms(lambda: step(stochastic_activation_pruning, h, generator))
        size = " x ".join(map(str, shape))
        lines.append(f"| {size} | {BATCH} | {draws} | {before:.2f} | {after:.2f} | {before / after:.1f}x |")
    # the whole model: the layers call the module-level function, so swapping it swaps every SAP layer
    model = build_model(ModelConfig(in_channels=1, hidden=128, width=0.25, mean=[0.5], std=[0.25],
                                     defense=defense_config("sap", sap_frac=0.8))).eval()
    x = torch.rand(BATCH, 1, 32, 32, generator=generator)
    whole = lambda: model(x.clone().requires_grad_()).sum().backward()
    sap_module.stochastic_activation_pruning = multinomial_sap
    try:
        before = median_ms(whole)
    finally:
        sap_module.stochastic_activation_pruning = stochastic_activation_pruning
    after = median_ms(whole)
    lines.append(f"| quick SAP VGG, forward + backward | {BATCH} | all layers | {before:.2f} | {after:.2f} | "
                 f"{before / after:.1f}x |")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
