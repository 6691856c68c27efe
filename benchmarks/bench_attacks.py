"""PGD's wall time against ``steps x (forward + backward)`` of the model: the attack's own overhead.

    python benchmarks/bench_attacks.py                 # MLP, vgg-small and a top-k vgg-small on CPU
    python benchmarks/bench_attacks.py --quick         # fewer repeats
    python benchmarks/bench_attacks.py --out benchmarks/results   # also bench_attacks.{json,md}

The budget (issue 5): PGD with ``steps`` steps takes at most 1.1 x steps x (forward + backward).
"forward + backward" is measured as one forward and one ``torch.autograd.grad`` of the summed
cross-entropy with respect to the input, the least work one gradient step needs; the ratio against a
full ``loss.backward()`` (weight gradients too, as in training) is reported beside it. PGD pays one
extra forward (judging the last iterate) plus the projection and bookkeeping.

Timing interleaves the reference loop and PGD repeat by repeat, so a change in the machine's load hits
both alike; every number is the median over repeats. Beside the wall-time ratio, the ratio of this process's
CPU time (``time.process_time``) is reported: on a shared, loaded CPU it is not inflated by waiting for
a core (meaningful with --threads 1 on the CPU; on CUDA it measures the host side only). On CUDA each timing is bracketed by a synchronize.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from topkconv.attacks import pgd
from topkconv.config import defense_config, ModelConfig
from topkconv.models import build_model


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reference_steps(model, x, y, steps, full_backward=False):
    """``steps`` x (forward + backward): the cost PGD is held to."""
    for _ in range(steps):
        x_var = x.detach().requires_grad_(True)
        loss = F.cross_entropy(model(x_var), y, reduction="sum")
        if full_backward:
            loss.backward()
        else:
            torch.autograd.grad(loss, x_var)


def time_call(fn, device) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process)."""
    _sync(device)
    tic, cpu = time.perf_counter(), time.process_time()
    fn()
    _sync(device)
    return time.perf_counter() - tic, time.process_time() - cpu


def bench_model(name, model, x, y, steps, repeats, device) -> dict:
    model = model.to(device).eval()
    x, y = x.to(device), y.to(device)
    generator = torch.Generator(device=device).manual_seed(0)
    runs = {
        "fwd_bwd_input": lambda: reference_steps(model, x, y, steps),
        "fwd_bwd_full": lambda: reference_steps(model, x, y, steps, full_backward=True),
        "pgd": lambda: pgd(model, x, y, 8 / 255, 0.75 / 255, steps, generator=generator),
    }
    for fn in runs.values():  # warm-up (allocator, kernels)
        fn()
    times = {key: [] for key in runs}
    cpu_times = {key: [] for key in runs}
    for _ in range(repeats):
        for key, fn in runs.items():
            wall, cpu = time_call(fn, device)
            times[key].append(wall)
            cpu_times[key].append(cpu)
    model.zero_grad(set_to_none=True)
    median = {key: statistics.median(values) for key, values in times.items()}
    cpu = {key: statistics.median(values) for key, values in cpu_times.items()}
    return {"model": name, "batch": x.shape[0], "input": list(x.shape[1:]), "steps": steps, "repeats": repeats,
            "seconds": median, "cpu_seconds": cpu,
            "ratio_vs_input_grad": median["pgd"] / median["fwd_bwd_input"],
            "cpu_ratio_vs_input_grad": cpu["pgd"] / cpu["fwd_bwd_input"],
            "ratio_vs_full_backward": median["pgd"] / median["fwd_bwd_full"]}


def models(quick: bool):
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10))
    yield "mlp-digits-8px", mlp, (1, 8, 8), 256
    base = dict(arch="vgg-small", num_classes=10, in_channels=3, image_size=32, hidden=128, width=0.25)
    yield "vgg-small-0.25 (standard)", build_model(ModelConfig(**base)), (3, 32, 32), 32 if quick else 64
    topk = ModelConfig(**base, defense=defense_config(kind="dynamic_k", fc_k=[0.1, 0.5]))
    yield "vgg-small-0.25 (dynamic_k)", build_model(topk), (3, 32, 32), 32 if quick else 64


def to_markdown(rows, env) -> str:
    lines = [
        "| model | batch | steps | steps x (fwd + input grad) s | steps x (fwd + full bwd) s | PGD s "
        "| PGD / (steps x fwd+grad), wall | same, CPU time | PGD / (steps x fwd+full bwd), wall |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        s = r["seconds"]
        lines.append(f"| {r['model']} | {r['batch']} | {r['steps']} | {s['fwd_bwd_input']:.4f} | "
                     f"{s['fwd_bwd_full']:.4f} | {s['pgd']:.4f} | {r['ratio_vs_input_grad']:.3f} | "
                     f"{r['cpu_ratio_vs_input_grad']:.3f} | "
                     f"{r['ratio_vs_full_backward']:.3f} |")
    lines.append("")
    lines.append(f"Device: {env['device']}, torch {env['torch']}, {env['threads']} intra-op thread(s), "
                 f"{env['cpu_count']} CPUs, {env['platform']}.")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    parser.add_argument("--steps", type=int, default=16, help="PGD steps (default 16, the paper's)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--out", metavar="DIR", help="write bench_attacks.json and bench_attacks.md here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    repeats = 3 if args.quick else 7
    rows = []
    for name, model, shape, batch in models(args.quick):
        generator = torch.Generator().manual_seed(1)
        x = torch.rand(batch, *shape, generator=generator)
        y = torch.randint(0, 10, (batch,), generator=generator)
        row = bench_model(name, model, x, y, args.steps, repeats, device)
        rows.append(row)
        print(f"{name}: PGD {row['seconds']['pgd']:.4f} s, ratio {row['ratio_vs_input_grad']:.3f} "
              f"(CPU time {row['cpu_ratio_vs_input_grad']:.3f}) "
              f"(vs full backward {row['ratio_vs_full_backward']:.3f})", file=sys.stderr)
    env = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "torch": torch.__version__, "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
           "platform": platform.platform(terse=True)}
    table = to_markdown(rows, env)
    print(table)
    if args.out:
        from topkconv.io import atomic_write_json, atomic_write_text

        out = Path(args.out)
        atomic_write_json(out / "bench_attacks.json", {"rows": rows, "env": env})
        atomic_write_text(out / "bench_attacks.md", table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
