"""Whole models: what routing costs a model that users train, each defence of the quick preset against
the standard model, side by side in one process.

    python benchmarks/bench_models.py                 # every setting, 1 and 2 threads (about 15 min on 2 cores)
    python benchmarks/bench_models.py --quick         # fewer repeats (a few minutes)
    python benchmarks/bench_models.py --settings small --threads 1     # one setting, one thread count
    python benchmarks/bench_models.py --profile TKC-max   # torch.profiler over 10 train steps of one model

The models are those of the quick preset's Table I and Table III columns (``experiments/table1-quick.toml``,
``table3-quick.toml``; the pruned column is the baseline's weights, so it is left out), each built by
``build_model`` from its column's defence config on three bases:

* ``small``: vgg-small at width 0.25, 1 input channel, 32 px, batch 64 (the quick preset's model);
* ``wide``: vgg-small at width 1.0, the same input;
* ``vgg16``: the paper's VGG16 (25088 -> 512 -> 10), 3 channels, 224 px, batch 4.

Columns, medians over repeats:

* train step: forward, cross-entropy, backward and an SGD step, in train mode;
* eval forward: one forward in eval mode under ``torch.inference_mode()`` (what the zeroth-order attack,
  Square and the indicators run), and the forward throughput in images/s it implies;
* peak extra memory of one train step and one eval forward, measured as ``bench_layers.py`` does: in a
  child process with ``MALLOC_MMAP_THRESHOLD_=65536``, ``VmHWM - VmRSS`` after a warm-up.

Every repeat times every model in turn, the order rotated each repeat, so a change in the machine's load
hits all of them alike; ratios are the routed model's median over the standard model's.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Dict, List, Optional

import topkconv  # noqa: F401  (before torch: it shortens OpenMP's spin, as for users; topkconv/_openmp.py)
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_layers import _MMAP_ENV, _memory_probe_works, _status_kib, machine_line, write_outputs  # noqa: E402

from topkconv.config import ModelConfig  # noqa: E402
from topkconv.models import build_model  # noqa: E402
from topkconv.reproduce.spec import load_table_spec, spec_path  # noqa: E402

STANDARD = "Baseline"
# The targets (routed / standard train step, vgg-small): one for every routed model's eval forward.
TRAIN_TARGETS = {"Dynamic-k": 1.10, "TKC-neuron": 1.15, "TKC-max": 1.25, "TKC-sum": 1.25}
EVAL_TARGET = 1.15
ROUTED = tuple(TRAIN_TARGETS)
DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "models")


@dataclass(frozen=True)
class Setting:
    name: str
    arch: str
    width: float
    image_size: int
    batch: int
    in_channels: int
    hidden: int
    repeats: int        # full run; --quick takes a third (at least 1)
    targets: bool       # whether the ratio targets apply


SETTINGS = {s.name: s for s in (
    Setting("small", "vgg-small", 0.25, 32, 64, 1, 128, 30, True),
    Setting("wide", "vgg-small", 1.0, 32, 64, 1, 128, 9, True),
    Setting("vgg16", "vgg16", 1.0, 224, 4, 3, 512, 3, False),
)}


def quick_defences() -> Dict[str, object]:
    """label -> defence config of every trained column of the quick preset's Tables I and III."""
    found = {}
    for table in ("table1", "table3"):
        spec = load_table_spec(spec_path(table, "quick"))
        for column in spec.columns:
            if column.not_reproduced is None and column.prune_from is None:
                found.setdefault(column.label, spec.run_spec(column.label).model.defense)
    return dict(sorted(found.items(), key=lambda item: item[0] != STANDARD))  # the standard model first


def build(setting: Setting, defence) -> torch.nn.Module:
    torch.manual_seed(0)
    channels = setting.in_channels
    cfg = ModelConfig(arch=setting.arch, num_classes=10, in_channels=channels, image_size=setting.image_size,
                      hidden=setting.hidden, width=setting.width, mean=[0.5] * channels, std=[0.25] * channels,
                      defense=dataclasses.replace(defence))
    return build_model(cfg)


def batch_for(setting: Setting):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(setting.batch, setting.in_channels, setting.image_size, setting.image_size, generator=g)
    return x, torch.randint(0, 10, (setting.batch,), generator=g)


def train_step(model, opt, x, y) -> None:
    model.train()
    opt.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    opt.step()


def eval_forward(model, x) -> None:
    model.eval()
    with torch.inference_mode():
        model(x)


def _timed(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def time_setting(setting: Setting, defences: Dict[str, object], repeats: int, time_cap: float) -> Dict[str, dict]:
    """label -> {train_ms, eval_ms, repeats}: medians, the models interleaved repeat by repeat."""
    models = {label: build(setting, d) for label, d in defences.items()}
    opts = {label: torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9) for label, m in models.items()}
    x, y = batch_for(setting)
    labels = list(models)
    for label in labels:  # warm-up: one-time allocations, oneDNN primitive caches, numba loading
        train_step(models[label], opts[label], x, y)
        eval_forward(models[label], x)
    train = {label: [] for label in labels}
    evals = {label: [] for label in labels}
    started = time.perf_counter()
    for r in range(repeats):
        for label in labels[r % len(labels):] + labels[:r % len(labels)]:
            train[label].append(_timed(train_step, models[label], opts[label], x, y))
            evals[label].append(_timed(eval_forward, models[label], x))
        if time.perf_counter() - started > time_cap:
            break
    return {label: {"train_ms": 1000 * statistics.median(train[label]),
                    "eval_ms": 1000 * statistics.median(evals[label]), "repeats": len(train[label])}
            for label in labels}


def peak_memory(setting: Setting, defences: Dict[str, object]) -> Dict[str, dict]:
    """label -> {train_peak_mb, eval_peak_mb}: the extra resident memory of one step after a warm-up."""
    x, y = batch_for(setting)
    peaks = {}
    for label, defence in defences.items():
        model = build(setting, defence)
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        peaks[label] = {}
        for key, fn, args in (("train_peak_mb", train_step, (model, opt, x, y)), ("eval_peak_mb", eval_forward, (model, x))):
            fn(*args)
            gc.collect()
            before = _status_kib("VmRSS")
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")
            fn(*args)
            peaks[label][key] = (_status_kib("VmHWM") - before) / 1024
        del model, opt
        gc.collect()
    return peaks


def memory_in_child(setting: Setting, threads: int) -> Optional[Dict[str, dict]]:
    cmd = [sys.executable, os.path.abspath(__file__), "--memory-probe", "--settings", setting.name,
           "--threads", str(threads)]
    done = subprocess.run(cmd, env={**os.environ, **_MMAP_ENV}, capture_output=True, text=True)
    if done.returncode != 0:
        print(f"memory probe failed:\n{done.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


def rows_for(setting: Setting, threads: int, times: Dict[str, dict], peaks: Optional[Dict[str, dict]]) -> List[dict]:
    base = times[STANDARD]
    rows = []
    for label, t in times.items():
        peak = (peaks or {}).get(label, {})
        train_ratio, eval_ratio = t["train_ms"] / base["train_ms"], t["eval_ms"] / base["eval_ms"]
        target = TRAIN_TARGETS.get(label) if setting.targets else None
        met = None
        if target is not None:
            met = train_ratio <= target and eval_ratio <= EVAL_TARGET
        rows.append({"setting": setting.name, "arch": setting.arch, "width": setting.width,
                     "image_size": setting.image_size, "batch": setting.batch, "threads": threads, "model": label,
                     "train_ms": t["train_ms"], "train_ratio": train_ratio, "eval_ms": t["eval_ms"],
                     "eval_ratio": eval_ratio, "images_per_s": 1000 * setting.batch / t["eval_ms"],
                     "train_peak_mb": peak.get("train_peak_mb"), "eval_peak_mb": peak.get("eval_peak_mb"),
                     "repeats": t["repeats"], "train_target": target, "met": met})
    return rows


def _mb(v) -> str:
    return "n/a" if v is None else f"{v:.1f}"


def format_rows(rows: List[dict]) -> str:
    """One Markdown table per (setting, threads)."""
    head = ("| model | train step ms | ÷ standard | eval forward ms | ÷ standard | forward images/s | "
            "peak extra MB train / eval | target train (eval) | met |")
    blocks, key = [], None
    for r in rows:
        if (r["setting"], r["threads"]) != key:
            key = (r["setting"], r["threads"])
            title = (f"**{r['arch']} width {r['width']}, {r['image_size']} px, batch {r['batch']}, "
                     f"{r['threads']} thread{'s' if r['threads'] > 1 else ''}** ({r['repeats']} repeats)")
            blocks += ["", title, "", head, "|" + " --- |" * 9]
        target = "-" if r["train_target"] is None else f"<= {r['train_target']:.2f}x (<= {EVAL_TARGET:.2f}x)"
        met = "-" if r["met"] is None else ("yes" if r["met"] else "NO")
        blocks.append(f"| {r['model']} | {r['train_ms']:.1f} | {r['train_ratio']:.2f}x | {r['eval_ms']:.1f} | "
                      f"{r['eval_ratio']:.2f}x | {r['images_per_s']:.0f} | {_mb(r['train_peak_mb'])} / "
                      f"{_mb(r['eval_peak_mb'])} | {target} | {met} |")
    return "\n".join(blocks).strip()


def profile(setting: Setting, label: str, steps: int, rows: int) -> str:
    """torch.profiler's table (self CPU time) over ``steps`` train steps of one model, after a warm-up."""
    defences = quick_defences()
    if label not in defences:
        raise ValueError(f"--profile must name one of {', '.join(defences)}, got {label!r}")
    model = build(setting, defences[label])
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    x, y = batch_for(setting)
    train_step(model, opt, x, y)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            train_step(model, opt, x, y)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a third of the repeats (at least 1)")
    parser.add_argument("--settings", action="append", choices=list(SETTINGS),
                        help="only these settings (repeatable; default: all)")
    parser.add_argument("--threads", type=int, action="append", help="torch threads (repeatable; default: 1 and 2)")
    parser.add_argument("--repeats", type=int, default=None, help="repeats per setting (default: per setting)")
    parser.add_argument("--out", default=DEFAULT_OUT, help="folder for models.{json,csv,md} (default: %(default)s)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory child process")
    parser.add_argument("--profile", metavar="MODEL", help="profile 10 train steps of this model (first setting)")
    parser.add_argument("--memory-probe", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for t in args.threads or []:
        if t < 1:
            parser.error(f"--threads must be >= 1, got {t}")
    if args.repeats is not None and args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    return args


def run(settings: List[Setting], thread_counts: List[int], args, command: str) -> List[dict]:
    """Every (setting, threads) in turn; the files are rewritten after each, so a long run that is
    stopped keeps what it measured."""
    rows = []
    defences = quick_defences()
    for setting in settings:
        for threads in thread_counts:
            torch.set_num_threads(threads)
            repeats = args.repeats or (max(1, setting.repeats // 3) if args.quick else setting.repeats)
            peaks = None if args.no_memory or not _memory_probe_works() else memory_in_child(setting, threads)
            times = time_setting(setting, defences, repeats, time_cap=120.0 if args.quick else 600.0)
            rows += rows_for(setting, threads, times, peaks)
            print(format_rows(rows[-len(times):]), file=sys.stderr, flush=True)
            write_outputs(args.out, "models", rows, report(rows, command, thread_counts))
            gc.collect()
    return rows


def report(rows: List[dict], command: str, thread_counts: List[int]) -> str:
    return (format_rows(rows) + f"\n\nCommand: `{command}`\n"
            f"Machine: {machine_line(max(thread_counts))}\n")


def main(argv=None) -> int:
    args = parse_args(argv)
    settings = [SETTINGS[name] for name in (args.settings or list(SETTINGS))]
    thread_counts = args.threads or [1, 2]
    if args.profile:
        torch.set_num_threads(thread_counts[0])
        print(profile(settings[0], args.profile, steps=10, rows=25))
        return 0
    if args.memory_probe:  # child mode: one setting, its peaks as one JSON line
        torch.set_num_threads(thread_counts[0])
        print(json.dumps(peak_memory(settings[0], quick_defences())))
        return 0
    command = ("python benchmarks/bench_models.py " + " ".join(sys.argv[1:] if argv is None else argv)).strip()
    rows = run(settings, thread_counts, args, command)
    print(report(rows, command, thread_counts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
