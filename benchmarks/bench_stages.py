"""Where a routed model's eval forward spends its time beyond the dense layer it replaces: the compiled loops of
the quick preset's routing layers split into their stages, on the activations those layers really see.

    python benchmarks/bench_stages.py                 # batch 20 (Square's survivors) and 64 (the benchmarks')
    python benchmarks/bench_stages.py --batch 64 --repeats 300
    python benchmarks/bench_stages.py --batch 64 --setting wide   # the same layers at width 1.0 (256 channels)

The layers are those of ``bench_models.py``'s ``small`` setting (vgg-small width 0.25, 32 px; ``--setting
wide``: width 1.0), built from the
quick preset's defence configs with seed 0, fed the activations of a random batch, one torch thread, eval mode,
``torch.inference_mode()``. Times are medians of ``time.thread_time`` (this thread's CPU time, so another job
on the other core disturbs them less), in ms for the whole batch:

* TopKConv2d max, the last convolution (64 -> 64 at 4 x 4, k = 32): the module; the dense convolution it
  replaces; the compiled loop cut after its stages (the channel maps, their spatial maxima and ordered keys; then
  the column selection, ``selection.first_k_largest_down``; then the masked sum of the selected maps);
* TopKLinear, the first classifier layer of Dynamic-k (256 -> 128, k = 13): the module (forward only: the sorted
  registers of ``simd.top_k_sums_block``); ``F.linear``; ``linear_values`` (those registers alone);
  ``linear_forward`` (training's forward: the registers and the indices they give); and the search loops that
  serve k > 16 and the samples with a NaN or infinite product: cut after their products pass, the bounds and the
  packing of the candidates (the bounds from the true k-th values, as the whole loop finds them); the same loop
  given the k-th value as its threshold (no search); and whole.

A stage's time is the difference of two cuts; each cut is its own compiled loop built from the library's
inlined helpers, so the cuts stay in step with the kernels.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import topkconv  # noqa: F401  (before torch: OpenMP's spin as users get it)
import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_models import SETTINGS, batch_for, build, quick_defences  # noqa: E402

from topkconv.layers.kernels import conv, numba_loops as loops, selection  # noqa: E402
from topkconv.layers.kernels.bridge import as_array  # noqa: E402
from topkconv.layers.kernels.jit import jit  # noqa: E402
from topkconv.layers.kernels.simd import borrowed  # noqa: E402

KEYS, SELECT, SUM = 0, 1, 2


@jit
def _conv_cut(padded, geometry, weight_t, k, keys_dtype, out, indices, last_stage):
    """The max criterion's forward of :func:`loops._conv_forward_samples` (3 x 3, finite maps), stopped after
    ``last_stage`` for every sample."""
    in_ch, taps, out_ch = weight_t.shape
    positions = geometry[6] * geometry[7]
    dtype = padded.dtype
    maps, cols = np.empty((in_ch, positions, out_ch), dtype), np.empty((in_ch, taps, positions), dtype)
    scores, keys = np.empty((in_ch, out_ch), dtype), np.empty((in_ch, out_ch), keys_dtype)
    column_scratch, counts = np.empty((3, out_ch), keys_dtype), np.empty(out_ch, np.int32)
    row_bits = np.empty((selection.row_bits_words(in_ch), out_ch), np.uint64)
    mask = np.empty((in_ch, out_ch), dtype)
    acc, zero = np.empty((positions, out_ch), dtype), dtype.type(0)
    for b in range(padded.shape[0]):
        loops._sample_keys(padded[b], geometry, weight_t, True, True, maps, scores, keys, cols)
        if last_stage == KEYS:
            continue
        selection.first_k_largest_down(keys, k, indices[b], mask, column_scratch[0], column_scratch[1],
                                       column_scratch[2], counts, row_bits)
        if last_stage == SELECT:
            continue
        acc[:] = 0
        for i in range(in_ch):
            for p in range(positions):
                for c in range(out_ch):
                    acc[p, c] += maps[i, p, c] if mask[i, c] != 0 else zero
        out[b] = acc.T


@jit
def _linear_cut(x, weight, k, scratch, out, indices, take):
    """:func:`loops._linear_forward_guided` with the bounds guided by the true k-th values (``out`` holds them on
    entry), cut after the packing of the candidates (``take`` False: ``out`` gets the candidate counts) or given
    the threshold instead of searching it (``take``: the candidates at or above the k-th value taken, summed and
    their positions written; no ties in these rows)."""
    products, positions, values = borrowed(scratch[0]), borrowed(scratch[1]), borrowed(scratch[2])
    taken_positions, recent, chosen = borrowed(scratch[3]), borrowed(scratch[4]), borrowed(scratch[5])
    no_bound = x.dtype.type(-np.inf)
    for c in range(weight.shape[0]):
        high = no_bound
        for b in range(x.shape[0]):
            low, lower = loops._recent_bounds(recent, min(b, loops._RECENT_ROWS), no_bound)
            counts = loops._products_above(weight[c], x, b, False, high, low, lower, products)
            bound = loops._tightest_bound(counts[:3], (high, low, lower), k, counts[3], no_bound)
            kth = out[b, c]
            m = loops._positions_at_least(products, bound, positions)
            if take:
                taken = 0
                for j in range(m):
                    values[j] = products[positions[j]]
                    taken_positions[taken] = positions[j]
                    taken += values[j] >= kth
                out[b, c] = selection._sum_and_kth(products, taken_positions, k, chosen)[0]
                for t in range(k):
                    indices[b, c, t] = chosen[t]
            else:
                out[b, c] = m
            high = kth
            recent[b % loops._RECENT_ROWS] = kth


def timed_together(fns: dict, repeats: int) -> dict:
    """name -> median ms of ``fns[name]()``, the functions run in turn each repeat (a change in the machine's
    load hits them alike)."""
    found = {name: [] for name in fns}
    for repeat in range(repeats + 5):
        for name, fn in fns.items():
            tic = time.thread_time()
            fn()
            if repeat >= 5:   # the first rounds warm the caches
                found[name].append(time.thread_time() - tic)
    return {name: 1e3 * statistics.median(times) for name, times in found.items()}


def _inputs_of(model, x, layer_index: int):
    with torch.inference_mode():
        for layer in model.features[:layer_index]:
            x = layer(x)
    return x


def conv_rows(batch: int, repeats: int, setting: str = "small") -> list:
    model = build(SETTINGS[setting], quick_defences()["TKC-max"]).eval()
    layer = model.features[24]
    x = _inputs_of(model, batch_for(SETTINGS[setting])[0][:batch], 24)
    w = layer.weight.detach()
    padded, weight_t = conv._padded(x, layer.padding), conv._channels_last(w)
    geometry = conv._loop_geometry(x, w, layer.stride, layer.padding, layer.dilation)
    out = x.new_empty(batch, w.shape[0], geometry[6] * geometry[7])
    indices = torch.empty(batch, w.shape[0], layer.k, dtype=torch.int32)
    args = (as_array(padded), geometry, as_array(weight_t), layer.k, selection.key_dtype(padded), as_array(out),
            as_array(indices))
    with torch.inference_mode():
        t = timed_together({"module": lambda: layer(x), "dense": lambda: F.conv2d(x, w, None, 1, 1),
                            **{stage: lambda stage=stage: _conv_cut(*args, stage) for stage in (KEYS, SELECT, SUM)}},
                           repeats)
    name = f"TopKConv2d max {tuple(x.shape[1:])} -> {w.shape[0]}, k = {layer.k}"
    return [(name, "module", t["module"]), (name, "nn.Conv2d", t["dense"]), (name, "maps, maxima, keys", t[KEYS]),
            (name, "column selection", t[SELECT] - t[KEYS]), (name, "masked sum", t[SUM] - t[SELECT]),
            (name, "glue (module - loop)", t["module"] - t[SUM])]


def linear_rows(batch: int, repeats: int, setting: str = "small") -> list:
    model = build(SETTINGS[setting], quick_defences()["Dynamic-k"]).eval()
    layer = model.classifier[0]
    with torch.inference_mode():
        x = model.features(batch_for(SETTINGS[setting])[0][:batch]).flatten(1).contiguous()
    w = layer.weight.detach().contiguous()
    kth = (x[:, None, :] * w[None]).topk(layer.k, -1).values[..., -1].contiguous()
    name = f"TopKLinear {w.shape[1]} -> {w.shape[0]}, k = {layer.k}"
    scratch = loops._guided_scratch(x, layer.k)
    found, indices = kth.clone(), torch.empty(batch, w.shape[0], layer.k, dtype=torch.int32)

    def cut(take: bool):
        found.copy_(kth)
        _linear_cut(as_array(x), as_array(w), layer.k, scratch, as_array(found), as_array(indices), take)

    with torch.inference_mode():
        t = timed_together({"module": lambda: layer(x), "dense": lambda: F.linear(x, w),
                            "values": lambda: loops.linear_values(x, w, layer.k, False),
                            "forward": lambda: loops.linear_forward(x, w, layer.k, False),
                            "loop": lambda: loops._linear_forward_searched(x, w, layer.k, False),
                            "packing": lambda: cut(False), "given": lambda: cut(True)}, repeats)
        cut(False)
    module, dense, values, forward, loop, packing, given = (
        t[key] for key in ("module", "dense", "values", "forward", "loop", "packing", "given"))
    return [(name, "module (forward only)", module), (name, "F.linear", dense),
            (name, "its sorted registers, both passes (simd.top_k_sums_block)", values),
            (name, "glue (module - sorted registers)", module - values),
            (name, "training's forward: the sorted registers and the indices (linear_forward)", forward),
            (name, "the search loops (k > 16, non-finite samples), whole", loop),
            (name, "search: products, bounds, packing", packing),
            (name, f"search: gather, sum, indices at the k-th value (candidates: median {found.median().item():.0f})",
             given - packing),
            (name, "search: the threshold's search (bisection of the candidates' values)", loop - given)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, action="append", help="batch sizes (default 20 and 64)")
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--setting", choices=("small", "wide"), default="small",
                        help="bench_models.py's setting the layers come from (wide: vgg-small at width 1.0)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print("| layer | batch | stage | ms (thread_time median) |\n| --- | --- | --- | --- |")
    for batch in args.batch or [20, 64]:
        for name, stage, ms in conv_rows(batch, args.repeats, args.setting) + linear_rows(batch, args.repeats,
                                                                                          args.setting):
            print(f"| {name} | {batch} | {stage} | {ms:.3f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
