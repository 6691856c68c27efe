"""What the query-heavy attacks pay per query, in the model's own memory layout and in channels-last memory
(:func:`topkconv.attacks.common.query_layout`, what the zeroth-order attack, Square, PGD, EOT-PGD and AutoAttack
run in), side by side in one process.

    python benchmarks/bench_queries.py                  # every quick-preset defence, vgg-small width 0.25
    python benchmarks/bench_queries.py --repeats 5 --out benchmarks/results/queries

Models: each defence of the quick preset, built as ``bench_models.py`` builds them (its ``small`` setting:
vgg-small at width 0.25, 1 channel, 32 px), eval mode, one torch thread. Times are medians of
``time.thread_time`` (this thread's CPU time) over repeats, the variants run in turn each repeat:

* zeroth-order query: one step's gradient estimate of the zeroth-order attack for one example from 1,024
  antithetic pairs (2,048 forward passes: a tenth of the reference's 10,000-pair steps), under
  ``inference_mode``, in forward calls of ``max_batch`` inputs: the model as built with 1,024 (the attack's
  calls before this benchmark) and 256, and in channels-last memory with 1,024, 256 and 64;
* PGD step: one forward and the input gradient of the summed cross-entropy for 100 examples, as built and in
  channels-last memory.

Ratios are the medians of the calls before this benchmark over those the attacks make now (above 1: faster now).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import topkconv  # noqa: F401  (before torch: OpenMP's spin as users get it)
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_models import SETTINGS, build, quick_defences  # noqa: E402

from topkconv.attacks.common import query_layout  # noqa: E402
from topkconv.attacks.zeroth_order import estimate_gradient  # noqa: E402
from topkconv.io import atomic_write_json, atomic_write_text, environment_info  # noqa: E402

PAIRS = 1024
ZO_BEFORE, ZO_NOW = "zo as built, 1024", "zo channels-last, 256"   # the default max_batch was 1,024
PGD_BATCH = 100


def zo_query(model, x, y, max_batch: int):
    generator = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        return estimate_gradient(model, x, y, 8 / 255, PAIRS, max_batch, generator)


def pgd_step(model, x, y):
    x = x.clone().requires_grad_(True)
    return torch.autograd.grad(F.cross_entropy(model(x), y, reduction="sum"), x)[0]


def in_layout(fn, model, channels_last: bool):
    """``fn`` run on ``model`` in channels-last memory (``query_layout``) or as built."""
    def run():
        if not channels_last:
            return fn()
        with query_layout(model):
            return fn()
    return run


def variants(model) -> dict:
    setting = SETTINGS["small"]
    g = torch.Generator().manual_seed(0)
    shape = (setting.in_channels, setting.image_size, setting.image_size)
    one, label = torch.rand(1, *shape, generator=g), torch.zeros(1, dtype=torch.long)
    batch, labels = torch.rand(PGD_BATCH, *shape, generator=g), torch.randint(0, 10, (PGD_BATCH,), generator=g)
    found = {f"zo as built, {b}": in_layout(lambda b=b: zo_query(model, one, label, b), model, False)
             for b in (1024, 256)}
    for max_batch in (1024, 256, 64):
        found[f"zo channels-last, {max_batch}"] = in_layout(lambda b=max_batch: zo_query(model, one, label, b),
                                                            model, True)
    found["pgd as built"] = in_layout(lambda: pgd_step(model, batch, labels), model, False)
    found["pgd channels-last"] = in_layout(lambda: pgd_step(model, batch, labels), model, True)
    return found


def time_model(model, repeats: int) -> dict:
    """variant -> median ms, the variants in turn each repeat (after one warm-up round)."""
    runs = variants(model)
    times = {name: [] for name in runs}
    for repeat in range(repeats + 1):
        for name, fn in runs.items():
            tic = time.thread_time()
            fn()
            if repeat:
                times[name].append(1e3 * (time.thread_time() - tic))
    return {name: statistics.median(found) for name, found in times.items()}


def check_same_values(model):
    """The largest |difference| of the logits between the two layouts on a batch (float rounding only); None for
    a stochastic model (two forwards differ anyway)."""
    x = torch.rand(8, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        plain = model(x)
        with query_layout(model):
            fast = model(x)
        again = model(x)
    return float((plain - fast).abs().max()) if torch.equal(plain, again) else None


def _difference(value) -> str:
    return "stochastic" if value is None else f"{value:.1e}"


def table(results: dict) -> str:
    names = list(next(iter(results.values()))["ms"])
    header = " | ".join(f"{n} (ms)" for n in names)
    lines = [f"| model | {header} | zeroth-order: before / now | PGD: before / now | max logit difference |",
             "|" + " --- |" * (len(names) + 4)]
    for label, found in results.items():
        ms = found["ms"]
        lines.append(f"| {label} | " + " | ".join(f"{ms[n]:.1f}" for n in names)
                     + f" | {ms[ZO_BEFORE] / ms[ZO_NOW]:.2f}x | {ms['pgd as built'] / ms['pgd channels-last']:.2f}x"
                     + f" | {_difference(found['max_logit_difference'])} |")
    legend = (f"before / now: the attacks' calls before this benchmark ({ZO_BEFORE}; PGD as built) over what they "
              f"make now ({ZO_NOW}; PGD in channels-last memory)")
    return "\n".join(lines) + "\n\n" + legend


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=None, help="folder for queries.json and queries.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    results = {}
    for label, defence in quick_defences().items():
        model = build(SETTINGS["small"], defence).eval()
        for p in model.parameters():
            p.requires_grad_(False)
        results[label] = {"ms": time_model(model, args.repeats), "max_logit_difference": check_same_values(model)}
        print(label, {k: round(v, 1) for k, v in results[label]["ms"].items()}, flush=True)
    command = "python benchmarks/bench_queries.py " + " ".join(argv if argv is not None else sys.argv[1:])
    env = environment_info()
    machine = platform.processor() or platform.machine()
    text = (f"# Attack queries in channels-last memory\n\n`{command.strip()}` ({machine}, commit "
            f"{(env.get('git_commit') or '?')[:7]}, one thread, {args.repeats} repeats)\n\n{table(results)}\n")
    print(text)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        atomic_write_json(os.path.join(args.out, "queries.json"), {"command": command, "environment": env,
                                                                    "results": results})
        atomic_write_text(os.path.join(args.out, "queries.md"), text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
