"""Routing layers against their dense twins and the naive formula: time and peak memory, forward + backward.

    python benchmarks/bench_layers.py            # the full table (several minutes on 2 CPU cores)
    python benchmarks/bench_layers.py --quick    # fewer repeats, smaller training section
    python benchmarks/bench_layers.py --only bpda   # input-gradient cost of exact, dense and soft BPDA
    python benchmarks/bench_layers.py --out benchmarks/results   # also bench.{json,csv,md}
    python benchmarks/bench_layers.py --device cuda --quick       # on a GPU (benchmarks/device_check.sh)
    python benchmarks/bench_layers.py --quick --shapes 1 --only max   # a smoke run: first shape per section

"dense" is nn.Conv2d / nn.Linear, "naive" is impl="reference" (the paper's materialising formula),
"ours" is impl="auto" (on CPU float tensors: the numba loops, impl="numba"; on CUDA the torch-level
kernels, so there the two columns time the same code), "torch-level" is impl="torch" (the chunked
torch kernels that serve CUDA and other dtypes). Every number is the median over repeats of one forward plus one backward,
all measured side by side in one process.

Timing interleaves the implementations repeat by repeat, so a change in the machine's load
hits all of them alike.

Peak extra memory is measured in a child process started with ``MALLOC_MMAP_THRESHOLD_=65536``, so
glibc serves every allocation above 64 KiB (every tensor that matters) with its own mmap and unmaps
it on free: resident memory then follows the live tensors. (Timing runs in the parent with the
normal allocator, since a page fault per allocation would slow every implementation.) After one
warm-up step the peak-RSS mark is reset (``/proc/self/clear_refs``); the extra is ``VmHWM - VmRSS``
of the next forward + backward, with the inputs, weights and upstream gradient already resident.
It covers outputs, saved tensors, gradients and every temporary, whatever allocated them.

On CUDA (``--device cuda``) every step ends with ``torch.cuda.synchronize()`` before the clock is
read, and the peak extra memory is ``torch.cuda.max_memory_allocated()`` minus the memory allocated
before the step (the caching allocator's own view; no child process).
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional

import json
import subprocess

import topkconv  # noqa: F401  (before torch: it shortens OpenMP's spin, as for users; topkconv/_openmp.py)
import torch
import torch.nn.functional as F
from torch import nn

from topkconv.layers import TopKConv2d, TopKLinear, TopKNeuronConv2d

IMPLS = ("dense", "auto", "torch", "reference")
_MMAP_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}

MB = 2**20  # the table's "MB" are MiB
DEVICE = torch.device("cpu")  # set by --device
# Above this size the naive Dynamic-k layer runs a few samples at a time (same formula, honestly
# labelled): the full 25088 -> 512 product tensor at batch 64 is 3.3 GB, twice over with its gradient.
NAIVE_TENSOR_LIMIT = 512 * MB


def _status_kib(field_name: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field_name} missing from /proc/self/status")


def _memory_probe_works() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        _status_kib("VmHWM")
        return True
    except OSError:
        return False


@dataclass
class Case:
    layer: str
    shape: str
    target: str
    make_input: Callable[[], torch.Tensor]
    make: Callable[[str], nn.Module]  # impl -> module; "dense" gives the nn layer
    target_ratio: Optional[float] = None
    naive_chunk: Optional[int] = None  # samples per naive step when the full tensor is too big
    results: dict = field(default_factory=dict)


def conv_cases(kind: str) -> List[Case]:
    cases = []
    for batch, ch, size, k in [(64, 128, 8, 13), (32, 256, 8, 26), (8, 512, 14, 51)]:
        def make(impl, ch=ch, k=k):
            torch.manual_seed(0)
            if impl == "dense":
                return nn.Conv2d(ch, ch, 3, padding=1)
            if kind == "tkc-neuron":
                return TopKNeuronConv2d(ch, ch, 3, k, "max", padding=1, impl=impl)
            return TopKConv2d(ch, ch, 3, k, kind, padding=1, impl=impl)
        target, ratio = {"max": ("<=4x (2.5x)", 4.0), "sum": ("<=2x", 2.0), "tkc-neuron": ("<=1.5x", 1.5)}[kind]
        name = "TKC-neuron (max)" if kind == "tkc-neuron" else f"TopKConv2d {kind}"
        cases.append(Case(name, f"{batch}x{ch}->{ch}, {size}x{size}, k={k}", target,
                          lambda b=batch, c=ch, s=size: torch.randn(b, c, s, s), make, ratio))
    return cases


def linear_cases() -> List[Case]:
    cases = []
    for batch, fan_in, fan_out, k, target, ratio in [(64, 25088, 512, 250, "<=50x (20x)", 50.0),
                                                     (64, 512, 10, 10, "-", None)]:
        def make(impl, fan_in=fan_in, fan_out=fan_out, k=k):
            torch.manual_seed(0)
            if impl == "dense":
                return nn.Linear(fan_in, fan_out)
            return TopKLinear(fan_in, fan_out, k, impl=impl)
        full_bytes = batch * fan_out * fan_in * 4
        chunk = None
        if full_bytes > NAIVE_TENSOR_LIMIT:
            chunk = max(1, NAIVE_TENSOR_LIMIT // (fan_out * fan_in * 4))
        # Post-ReLU features, as in the paper's VGG head: half the inputs are exactly zero.
        cases.append(Case("TopKLinear", f"{batch}x{fan_in}->{fan_out}, k={k}", target,
                          lambda b=batch, n=fan_in: torch.randn(b, n).relu(), make, ratio, chunk))
    return cases


def _sync() -> None:
    """Wait for the GPU's queued work, so that the clock measures it (a no-op on the CPU)."""
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


def _step(module: nn.Module, x: torch.Tensor, grad_out: torch.Tensor, chunk: Optional[int]) -> None:
    for p in module.parameters():
        p.grad = None  # every step allocates its parameter gradients afresh: same cost for all impls
    x.grad = None
    pieces = [slice(None)] if chunk is None else [slice(s, s + chunk) for s in range(0, x.shape[0], chunk)]
    for piece in pieces:
        module(x[piece]).backward(grad_out[piece])
    _sync()


def _prepare(case: Case):
    x = case.make_input().to(DEVICE).requires_grad_()
    modules = {impl: case.make(impl).to(DEVICE) for impl in IMPLS}
    with torch.no_grad():
        out_shape = modules["dense"](x[:1]).shape[1:]
    grad_out = torch.randn(x.shape[0], *out_shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    return x, modules, grad_out


def time_case(case: Case, repeats: int, time_cap: float) -> None:
    x, modules, grad_out = _prepare(case)
    times = {impl: [] for impl in IMPLS}
    for impl in IMPLS:  # warm-up (one-time allocations, oneDNN primitive caches)
        if impl != "reference" or case.naive_chunk is None:
            _step(modules[impl], x, grad_out, None)
    for _ in range(repeats):
        for impl in IMPLS:
            if sum(times[impl]) > time_cap:  # the naive path can take a minute per step
                continue
            start = time.perf_counter()
            _step(modules[impl], x, grad_out, case.naive_chunk if impl == "reference" else None)
            times[impl].append(time.perf_counter() - start)
    for impl in IMPLS:
        case.results.setdefault(impl, {}).update(ms=1000 * statistics.median(times[impl]), repeats=len(times[impl]))


def peak_memory_mb(case: Case) -> dict:
    """Peak extra memory (MB) of one forward + backward per implementation (see module doc): resident
    memory on the CPU, the caching allocator's allocated bytes on CUDA."""
    x, modules, grad_out = _prepare(case)
    peaks = {}
    for impl in IMPLS:
        chunk = case.naive_chunk if impl == "reference" else None
        _step(modules[impl], x, grad_out, chunk)  # warm-up: one-time allocations and caches
        for p in modules[impl].parameters():
            p.grad = None  # the measured step's gradients count as its own memory
        x.grad = None
        gc.collect()
        if DEVICE.type == "cuda":
            before = torch.cuda.memory_allocated(DEVICE)
            torch.cuda.reset_peak_memory_stats(DEVICE)
            _step(modules[impl], x, grad_out, chunk)
            peaks[impl] = (torch.cuda.max_memory_allocated(DEVICE) - before) / MB
            continue
        before = _status_kib("VmRSS")
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        _step(modules[impl], x, grad_out, chunk)
        peaks[impl] = (_status_kib("VmHWM") - before) / 1024
    return peaks


def memory_in_child(sections: List[str], threads: int, shapes: Optional[int] = None) -> Optional[List[dict]]:
    """Run the memory probe in a child process with the mmap-per-allocation setting."""
    cmd = [sys.executable, os.path.abspath(__file__), "--memory-probe", "--threads", str(threads)]
    if shapes is not None:
        cmd += ["--shapes", str(shapes)]
    for name in sections:
        cmd += ["--only", name]
    done = subprocess.run(cmd, env={**os.environ, **_MMAP_ENV}, capture_output=True, text=True)
    if done.returncode != 0:
        print(f"memory probe failed:\n{done.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_table(cases: List[Case], repeats: int, time_cap: float, progress: bool) -> None:
    for case in cases:
        time_case(case, repeats, time_cap)
        gc.collect()
        if progress:
            r = case.results
            print(f"  {case.layer} {case.shape}: dense {r['dense']['ms']:.1f} ms, ours {r['auto']['ms']:.1f} ms, "
                  f"torch-level {r['torch']['ms']:.1f} ms, naive {r['reference']['ms']:.1f} ms",
                  file=sys.stderr, flush=True)


def _fmt_mb(v):
    return "n/a" if v is None else f"{v:.1f}"


def format_table(cases: List[Case]) -> str:
    head = ("| layer | shape | dense ms | naive ms | ours ms | ours/dense | torch-level ms | torch-level/dense | "
            "naive/dense | peak extra MB ours / torch-level / naive / dense | target (ours/dense) | met |")
    lines = [head, "|" + " --- |" * 12]
    for c in cases:
        d, o, t, n = (c.results[impl] for impl in ("dense", "auto", "torch", "reference"))
        ratio = o["ms"] / d["ms"]
        met = "-" if c.target_ratio is None else ("yes" if ratio <= c.target_ratio else "NO")
        naive_ms = f"{n['ms']:.1f}"
        if c.naive_chunk:
            naive_ms += f" (chunked, {c.naive_chunk} samples/step)"
        if n["repeats"] < o["repeats"]:
            naive_ms += f" [{n['repeats']} run{'s' if n['repeats'] > 1 else ''}]"
        lines.append(f"| {c.layer} | {c.shape} | {d['ms']:.1f} | {naive_ms} | {o['ms']:.1f} | {ratio:.2f}x | "
                     f"{t['ms']:.1f} | {t['ms'] / d['ms']:.2f}x | {n['ms'] / d['ms']:.1f}x | "
                     f"{' / '.join(_fmt_mb(r['peak_mb']) for r in (o, t, n, d))} | {c.target} | {met} |")
    return "\n".join(lines)


# ------------------------------------------------------------------ training section

def conv_stack(impl: str) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        TopKConv2d(128, 128, 3, 13, "max", padding=1, impl=impl), nn.ReLU(),
        TopKConv2d(128, 128, 3, 13, "sum", padding=1, impl=impl), nn.ReLU(),
        TopKNeuronConv2d(128, 128, 3, 13, padding=1, impl=impl), nn.ReLU(),
        nn.Flatten(), TopKLinear(128 * 8 * 8, 512, 82, impl=impl), nn.ReLU(),
        TopKLinear(512, 10, 10, impl=impl))


def vgg_head(impl: str) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(TopKLinear(25088, 512, 250, impl=impl), nn.ReLU(), TopKLinear(512, 10, 10, impl=impl))


def train_step_ms(model: nn.Module, x: torch.Tensor, y: torch.Tensor, repeats: int, time_cap: float) -> float:
    model, x, y = model.to(DEVICE), x.to(DEVICE), y.to(DEVICE)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    times, spent = [], 0.0
    for _ in range(repeats + 1):
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
        _sync()
        times.append(time.perf_counter() - start)
        spent += times[-1]
        if spent > time_cap:
            break
    return 1000 * statistics.median(times[1:] if len(times) > 1 else times)


def run_training(repeats: int, time_cap: float, quick: bool) -> str:
    g = torch.Generator().manual_seed(0)
    setups = [("conv stack: TopKConv2d max + sum, TKC-neuron (128->128, 8x8, k=13), "
               "TopKLinear 8192->512 (k=82), 512->10 (k=10)", conv_stack,
               torch.randn(64, 128, 8, 8, generator=g)),
              ("VGG head: TopKLinear 25088->512 (k=250), 512->10 (k=10)", vgg_head,
               torch.randn(8 if quick else 16, 25088, generator=g).relu())]
    lines = ["| model | batch | reference ms/step | ours ms/step | speed-up | torch-level ms/step | speed-up |",
             "|" + " --- |" * 7]
    for name, build, x in setups:
        y = torch.randint(0, 10, (x.shape[0],), generator=g)
        ref = train_step_ms(build("reference"), x, y, repeats, time_cap)
        ours = train_step_ms(build("auto"), x, y, repeats, time_cap)
        torch_level = train_step_ms(build("torch"), x, y, repeats, time_cap)
        lines.append(f"| {name} | {x.shape[0]} | {ref:.1f} | {ours:.1f} | {ref / ours:.1f}x | {torch_level:.1f} | "
                     f"{ref / torch_level:.1f}x |")
    return "\n".join(lines)


# ------------------------------------------------------------------ BPDA section

def run_bpda(repeats: int, time_cap: float) -> str:
    """One forward + input-gradient backward per layer under each backward mode (the attack's step)."""
    from topkconv.layers import dense_gradients, soft_gradients

    g = torch.Generator().manual_seed(0)
    setups = [("TopKConv2d max 128->128, 8x8, k=13", TopKConv2d(128, 128, 3, 13, "max", padding=1),
               torch.randn(64, 128, 8, 8, generator=g)),
              ("TKC-neuron 128->128, 8x8, k=13", TopKNeuronConv2d(128, 128, 3, 13, padding=1),
               torch.randn(64, 128, 8, 8, generator=g)),
              ("TopKLinear 25088->512, k=250", TopKLinear(25088, 512, 250), torch.randn(8, 25088, generator=g).relu())]
    modes = [("exact", None), ("dense", dense_gradients), ("soft", soft_gradients)]
    lines = ["| layer | batch | " + " | ".join(f"{name} ms" for name, _ in modes) + " | soft/exact |",
             "|" + " --- |" * (len(modes) + 3)]
    for name, layer, x in setups:
        layer, x = layer.to(DEVICE), x.to(DEVICE)
        ms = {}
        for mode, switch in modes:
            times = []
            for _ in range(repeats + 1):
                xg = x.clone().requires_grad_()
                start = time.perf_counter()
                with switch() if switch else torch.enable_grad():
                    out = layer(xg)
                torch.autograd.grad(out.sum(), xg)
                _sync()
                times.append(time.perf_counter() - start)
                if sum(times) > time_cap:
                    break
            ms[mode] = 1000 * statistics.median(times[1:] if len(times) > 1 else times)
        lines.append(f"| {name} | {x.shape[0]} | " + " | ".join(f"{ms[m]:.1f}" for m, _ in modes)
                     + f" | {ms['soft'] / ms['exact']:.1f}x |")
    return "\n".join(lines)


def machine_line(threads: int) -> str:
    load = os.getloadavg() if hasattr(os, "getloadavg") else ("?",) * 3
    device = "cpu" if DEVICE.type == "cpu" else f"{DEVICE} ({torch.cuda.get_device_name(DEVICE)}, CUDA {torch.version.cuda})"
    return (f"torch {torch.__version__}, {platform.machine()}, {os.cpu_count()} logical CPUs, "
            f"torch threads {threads}, GOMP_SPINCOUNT {os.environ.get('GOMP_SPINCOUNT', 'default')}, "
            f"load average at the end {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, device {device}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 repeats and a smaller training section")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per measurement (default 7)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (default 1: see BENCHMARKS.md for why on this machine)")
    parser.add_argument("--only", choices=["max", "sum", "tkc", "linear", "train", "bpda"], action="append",
                        help="run only these sections (repeatable)")
    parser.add_argument("--out", default=None, help="folder for bench.json, bench.csv and bench.md")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    parser.add_argument("--shapes", type=int, default=None,
                        help="only the first N shapes of each section (a smoke run; default: all)")
    parser.add_argument("--memory-probe", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    torch.set_num_threads(args.threads)
    global DEVICE
    DEVICE = torch.device(args.device)
    if DEVICE.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: CUDA is not available on this machine")
    if DEVICE.type not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu or cuda[:N], got {args.device!r}")
    repeats = args.repeats or (2 if args.quick else 7)
    time_cap = 20.0 if args.quick else 60.0
    only = set(args.only or ["max", "sum", "tkc", "linear", "train", "bpda"])
    cases = []
    if "max" in only:
        cases += conv_cases("max")
    if "sum" in only:
        cases += conv_cases("sum")
    if "tkc" in only:
        cases += conv_cases("tkc-neuron")
    if "linear" in only:
        cases += linear_cases()
    if args.shapes is not None:
        if args.shapes < 1:
            raise ValueError(f"--shapes must be >= 1, got {args.shapes}")
        sections_of = {}
        for case in cases:
            sections_of.setdefault(case.layer, []).append(case)
        cases = [case for group in sections_of.values() for case in group[:args.shapes]]
    if args.memory_probe:  # child mode: print the peaks as one JSON line
        print(json.dumps([peak_memory_mb(case) if _memory_probe_works() else {} for case in cases]))
        return 0
    progress = sys.stderr.isatty()
    if DEVICE.type == "cuda":  # the allocator's statistics need no child process
        peaks = [peak_memory_mb(case) for case in cases]
    else:
        peaks = memory_in_child(sorted(only - {"train", "bpda"}), args.threads, args.shapes) if cases else None
    probe = peaks is not None and all(peaks)
    for case, peak in zip(cases, peaks or [{}] * len(cases)):
        for impl in IMPLS:
            case.results[impl] = {"peak_mb": peak.get(impl)}
    run_table(cases, repeats, time_cap, progress)
    sections = []
    if cases:
        sections.append(format_table(cases))
    if "bpda" in only:
        sections.append("Input gradient (forward + backward to the input) per backward mode: exact, dense BPDA, "
                        "soft BPDA (default tau):\n\n" + run_bpda(repeats, time_cap))
    if "train" in only:
        sections.append("Training step (forward, cross-entropy, backward, SGD step), reference vs ours:\n\n"
                        + run_training(repeats, time_cap, args.quick))
    command = "python benchmarks/bench_layers.py " + " ".join(sys.argv[1:] if argv is None else argv)
    text = "\n\n".join(sections) + f"\n\nCommand: `{command.strip()}`\nMachine: {machine_line(args.threads)}\n"
    if cases and not probe:
        text += "Peak memory: n/a (the probe needs Linux /proc/self/clear_refs).\n"
    print(text)
    if args.out:
        _write_results(args.out, cases, text)
    return 0


def _write_results(folder: str, cases: List[Case], text: str) -> None:
    rows = [{"layer": c.layer, "shape": c.shape, "target": c.target, "device": str(DEVICE),
             **{f"{impl}_{key}": c.results[impl][key] for impl in ("dense", "reference", "auto", "torch")
                for key in ("ms", "repeats", "peak_mb")}} for c in cases]
    write_outputs(folder, "bench", rows, text)


def write_outputs(folder: str, stem: str, rows: List[dict], text: str) -> None:
    """``stem``.json (the rows), .csv (the rows, one column per key of the first) and .md (``text``) in
    ``folder``, each written atomically."""
    from topkconv.io import atomic_write_json, atomic_write_text
    os.makedirs(folder, exist_ok=True)
    atomic_write_json(os.path.join(folder, f"{stem}.json"), rows)
    if rows:
        keys = list(rows[0])
        csv = ",".join(keys) + "\n" + "\n".join(
            ",".join('"' + str(r[k]) + '"' if isinstance(r[k], str) else ("" if r[k] is None else f"{r[k]}")
                     for k in keys) for r in rows) + "\n"
        atomic_write_text(os.path.join(folder, f"{stem}.csv"), csv)
    atomic_write_text(os.path.join(folder, f"{stem}.md"), text)


if __name__ == "__main__":
    sys.exit(main())
