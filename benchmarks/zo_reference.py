"""The zeroth-order attack at its reference budget on the examples the white-box attacks left robust (issue 22,
section 3): does the verdict presets' cut budget miss adversarial examples that the reference finds?

    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/zo_reference.py RUN_DIR [RUN_DIR ...] --out DIR

For each run folder, ``topkconv evaluate RUN --suite full`` at ``--eps`` on the first ``--n`` test images with the
zeroth-order attack at ``--schedule`` (default ``reference``: 100 steps x 50 / 500 / 10,000 noise pairs, Tramer et
al. 2020) on every example (``--zo-examples n``). The full suite cascades it, as it does Square, transfer and both
BPDA stand-ins, on the examples every white-box gradient attack left robust: those are the only ones it can add.
The strength curves and the binarization test are left out (``--curves 0 --binarization-examples 0``): they do not
change which examples the suite breaks. A run's eval.json is kept when it exists (the script resumes).

summary.json / summary.csv / summary.md under ``--out``: per run, the white-box survivors, how many the
zeroth-order attack broke among them and its time, beside the quick-budget attack of the run's own strong suite
(``eval-strong-<eps>.json`` in the run folder, when the main job wrote one).
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path


def _spec(run: Path) -> dict:
    return json.loads((run / "run.json").read_text())["spec"]


def label_of(run: Path) -> str:
    """``<defence>[-<criterion>]-seed<seed>`` from the run's spec."""
    spec = _spec(run)
    defense = spec["model"]["defense"]
    kind = defense["kind"] + (f"-{defense['criterion']}" if defense["kind"] == "topk_conv" else "")
    return f"{kind}-seed{spec['train']['seed']}"


def _budget_key(steps: int, step_size: float, samples) -> tuple:
    """A zeroth-order budget as compared for keeping an evaluation: its schedule normalised (a name or pairs)."""
    from topkconv.attacks.zeroth_order import sample_schedule

    return steps, step_size, sample_schedule(samples)


def _asked(args) -> tuple:
    """(n, eps, budget key) of the command line; ``--schedule`` as ``evaluate --zo-samples`` reads it."""
    pairs = [[int(part) for part in item.split(":")] for item in args.schedule if ":" in item]
    samples = pairs if pairs else args.schedule[0]
    return args.n, args.eps, _budget_key(args.zo_steps, args.zo_step_size, samples)


def evaluate(run: Path, target: Path, args, log: list) -> dict:
    """The run's eval.json at the asked budget (kept when it exists for the same n, eps and zeroth-order budget)."""
    if target.exists():
        found = json.loads(target.read_text())
        zo = found["config"]["budgets"]["zeroth_order"]
        if (found["n_examples"], found["config"]["eps"],
                _budget_key(zo["steps"], zo["step_size"], zo["samples"])) == _asked(args):
            log.append(f"(kept {target}, made at commit {found['env'].get('git_commit')})")
            return found
    command = ["evaluate", str(run), "--suite", "full", "--n", str(args.n), "--eps", str(args.eps), "--device", "cpu",
               "--no-progress", "--zo-samples", *args.schedule, "--zo-steps", str(args.zo_steps), "--zo-step-size",
               str(args.zo_step_size), "--zo-examples", str(args.n), "--curves", "0",
               "--binarization-examples", "0", "--out", str(target)]
    log.append("python -m topkconv.cli " + shlex.join(command))
    print(log[-1], flush=True)
    subprocess.run([sys.executable, "-m", "topkconv.cli"] + command, check=True)
    target.with_name(f"{target.stem}-acc-vs-eps.png").unlink(missing_ok=True)   # JSON and Markdown only
    return json.loads(target.read_text())


def _count(result: dict, row: str) -> int:
    """Robust examples of a per-example row (a string of 0/1, one character an example)."""
    return result["per_example"][row].count("1")


def row_of(run: Path, label: str, result: dict, eps: float) -> dict:
    """White-box survivors, what the zeroth-order attack broke among them, and the quick budget's run beside it."""
    zo = result["attacks"]["zeroth_order"]
    quick_file = run / f"eval-strong-{eps:g}.json"
    quick = json.loads(quick_file.read_text()) if quick_file.exists() else None
    return {"run": str(run), "label": label, "n": result["n_examples"], "eps": eps,
            "clean": _count(result, "clean"), "whitebox_survivors": _count(result, "whitebox"),
            "zo_attacked": zo["params"]["cascade"]["n_attacked"], "zo_broke": zo["params"]["cascade"]["broke"],
            "worst_case": _count(result, "worst_case"),
            "zo_fraction_of_reference": result["budgets"]["zeroth_order"]["fraction"],
            "zo_seconds": zo.get("seconds"),
            "eval_seconds": result["timings"]["total_seconds"],
            "quick_zo_fraction": quick["budgets"]["zeroth_order"]["fraction"] if quick else None,
            "quick_zo_examples": quick["config"]["budgets"]["zeroth_order"].get("examples") if quick else None,
            "quick_worst_case": _count(quick, "worst_case") if quick else None}


def write(out: Path, rows: list, log: list, args, seconds: float) -> None:
    from topkconv.io import atomic_write_csv, atomic_write_json, atomic_write_text, environment_info

    env = environment_info()
    commit = env["git_commit"]
    atomic_write_json(out / "summary.json", {"commit": commit, "schedule": args.schedule, "n": args.n,
                                             "eps": args.eps, "total_seconds": seconds, "commands": log,
                                             "env": env, "rows": rows})
    atomic_write_csv(out / "summary.csv", rows)
    lines = [f"# The zeroth-order attack at {' '.join(args.schedule)} on the white-box survivors (eps {args.eps:g}/255, "
             f"first {args.n} test images)", "", f"commit {commit}; {seconds / 60:.1f} min this invocation", "",
             "| run | clean | white-box survivors | broken by the zeroth-order attack | worst case | its share of the "
             "reference | its seconds | the run's own strong suite: worst case (its zeroth-order share, examples) |",
             "|" + " --- |" * 8]
    for r in rows:
        quick = (f"{r['quick_worst_case']} ({100 * r['quick_zo_fraction']:.3g}%, first {r['quick_zo_examples']})"
                 if r["quick_worst_case"] is not None else "-")
        lines.append(f"| {r['label']} | {r['clean']} | {r['whitebox_survivors']} | {r['zo_broke']} | {r['worst_case']} "
                     f"| {100 * r['zo_fraction_of_reference']:.3g}% | {r['zo_seconds']:.0f} | {quick} |")
    lines += ["", "Counts are examples out of n. Commands:", "", "```"] + log + ["```", ""]
    atomic_write_text(out / "summary.md", "\n".join(lines))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run folders (topkconv train's)")
    parser.add_argument("--out", type=Path, required=True, help="eval.json files and the summary")
    parser.add_argument("--n", type=int, default=100, help="test examples attacked")
    parser.add_argument("--eps", type=float, default=8.0, help="radius, 0-255 units")
    parser.add_argument("--schedule", nargs="+", default=["reference"],
                        help="the zeroth-order noise pairs (evaluate --zo-samples): a schedule name or FROM:PAIRS ...")
    parser.add_argument("--zo-steps", type=int, default=100, help="its steps (the reference's 100)")
    parser.add_argument("--zo-step-size", type=float, default=2.55, help="its sign step, 0-255 (the reference's 0.01)")
    args = parser.parse_args(argv)
    for run in args.runs:
        if not (run / "run.json").exists():
            raise SystemExit(f"zo_reference: {run}: expected a run folder with run.json")
    args.out.mkdir(parents=True, exist_ok=True)
    tic, log, rows = time.perf_counter(), [], []
    for run in args.runs:
        label = label_of(run)
        result = evaluate(run, args.out / f"{label}.json", args, log)
        rows.append(row_of(run, label, result, args.eps))
        write(args.out, rows, log, args, time.perf_counter() - tic)   # after every run: a killed job keeps its rows
    return 0


if __name__ == "__main__":
    sys.exit(main())
