"""The row selection alone: torch.topk against the numba selection with and without its strided-group
bound, over row widths from TopKConv's channel scores (128-512) to Dynamic-k's products (25,088).

    python benchmarks/bench_selection.py            # medians of 9, one torch thread

Prints one Markdown table: milliseconds to select the k largest of every row (any order), and which
variant ``n_groups_for`` picks at that width ("auto").
"""

from __future__ import annotations

import statistics
import sys
import time

import numpy as np
import torch

from topkconv.layers.kernels import selection as compiled

CASES = [(128, 13, 8192), (256, 26, 8192), (512, 51, 4096), (1024, 100, 2048), (4096, 400, 512),
         (25088, 250, 512)]


def median_ms(fn, repeats: int = 9) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main() -> int:
    torch.set_num_threads(1)
    lines = ["| width | k | rows | torch.topk ms | bucket pass only ms | group bound + buckets ms | auto uses |",
             "|" + " --- |" * 7]
    generator = torch.Generator().manual_seed(0)
    for width, k, rows in CASES:
        scores = torch.randn(rows, width, generator=generator)
        array = scores.numpy()
        indices = np.empty((rows, k), np.int32)
        totals = np.empty(rows, np.float32)
        grouped = max(2, round((width * k) ** 0.5))
        plain_ms = median_ms(lambda: compiled._select_rows(array, k, 1, indices, totals, 0, rows))
        grouped_ms = median_ms(lambda: compiled._select_rows(array, k, grouped, indices, totals, 0, rows))
        torch_ms = median_ms(lambda: scores.topk(k, dim=1, sorted=False))
        auto = "groups" if compiled.n_groups_for(width, k) > 1 else "buckets only"
        lines.append(f"| {width} | {k} | {rows} | {torch_ms:.2f} | {plain_ms:.2f} | {grouped_ms:.2f} | {auto} |")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
