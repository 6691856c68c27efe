"""Fashion-MNIST Table I's SAP column under a stronger EOT (issue 22): the preset's strong suite on every seed's SAP
model, with its EOT-PGD budget (4 draws x 16 steps) and with 10 x 100, side by side on the same test images.

    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/fashion_sap_eot.py --runs RUNS --out DIR   # ~6 min a seed
    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/fashion_sap_eot.py --runs RUNS --out DIR --summarise-only

``RUNS`` is the run folder of ``topkconv reproduce table1 --preset fashion`` (or of its Baseline + SAP spec,
``results/fashion-mnist/table1-sap-binarization/spec.toml``): every SAP run in it is evaluated, found by its
spec. Each (seed, budget) is one ``topkconv evaluate RUN --suite full`` with the run's own attack budgets but for
EOT-PGD's, on the first ``--n`` test images, without the binarization test, the strength curves or the eps curve
(they do not enter the worst case), written to ``DIR/seed{S}-eot{D}x{T}.json``; a file that exists is kept, so a
rerun resumes. The summary (``summary.{json,csv,md}``) gives, per budget: the mean over seeds of the expected
accuracy over SAP's draws (EOT-PGD's row and the worst case over the suite, each judged over 10 draws) with a
t-interval over seeds; the one-draw worst case with the crossed seeds x examples interval of the reproduce
tables (:func:`topkconv.reproduce.stats.cell_estimate`); and the paired difference between the budgets.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

BUDGETS = [(4, 16), (10, 100)]   # the preset's EOT-PGD (draws x steps), and the budget that passed every valid
                                 # binarization task on seed 4 (results/fashion-mnist/table1-sap-binarization/);
                                 # --budget D:T (repeated) sets others, each compared with the first


def sap_runs(runs: Path) -> dict:
    """{training seed: run folder} of the SAP runs under ``runs``."""
    found = {}
    for run in sorted(p.parent for p in runs.glob("*/run.json")):
        spec = json.loads((run / "run.json").read_text())["spec"]
        if spec["model"]["defense"]["kind"] == "sap":
            found[spec["train"]["seed"]] = run
    if not found:
        raise SystemExit(f"fashion_sap_eot: no SAP run under {runs} (expected run folders with a run.json)")
    return dict(sorted(found.items()))


def evaluate(run: Path, out: Path, n: int, draws: int, steps: int) -> float:
    command = [sys.executable, "-m", "topkconv.cli", "evaluate", str(run), "--suite", "full", "--n-examples", str(n),
               "--eot-samples", str(draws), "--eot-steps", str(steps), "--binarization-examples", "0", "--curves", "0",
               "--eps-curve", "0", "--no-progress", "--out", str(out)]
    tic = time.perf_counter()
    subprocess.run(command, check=True)
    return time.perf_counter() - tic


def t_interval(values: list) -> list:
    from scipy import stats

    mean, half = sum(values) / len(values), 0.0
    if len(values) > 1:
        half = float(stats.t.ppf(0.975, len(values) - 1) * stats.tstd(values) / len(values) ** 0.5)
    return [mean - half, mean + half]


def per_seed(result: dict) -> dict:
    eot = result["attacks"]["eot_pgd"]
    return {"clean": result["over_draws"]["clean"]["expected"], "eot_pgd": eot["over_draws"]["expected"],
            "worst_case": result["over_draws"]["worst_case"]["expected"],
            "worst_case_one_draw": result["worst_case"], "eot_seconds": eot["seconds"],
            "mask": [int(c) for c in result["per_example"]["worst_case"]]}


def summarise(found: dict, budgets: list) -> dict:
    from topkconv.reproduce.stats import cell_estimate, difference_estimate

    rows, seeds = [], sorted(found)
    for draws, steps in budgets:
        cells = [found[s][draws, steps] for s in seeds]
        row = {"eot": f"{draws} x {steps}", "seeds": len(cells)}
        for key in ("clean", "eot_pgd", "worst_case"):
            values = [c[key] for c in cells]
            row[key] = {"mean": sum(values) / len(values), "interval": t_interval(values), "per_seed": values}
        one_draw = cell_estimate([c["mask"] for c in cells])
        row["worst_case_one_draw"] = {"mean": one_draw.mean, "interval": [one_draw.low, one_draw.high],
                                      "method": one_draw.method}
        row["eot_seconds_median"] = sorted(c["eot_seconds"] for c in cells)[len(cells) // 2]
        rows.append(row)
    weak = [found[s][budgets[0]] for s in seeds]
    differences = {}
    for budget in budgets[1:]:
        strong, entry = [found[s][budget] for s in seeds], {}
        for key in ("eot_pgd", "worst_case"):
            values = [x[key] - y[key] for x, y in zip(strong, weak)]
            entry[key] = {"mean": sum(values) / len(values), "interval": t_interval(values), "per_seed": values}
        one_draw = difference_estimate([x["mask"] for x in strong], [y["mask"] for y in weak])
        entry["worst_case_one_draw"] = {"mean": one_draw.mean, "interval": [one_draw.low, one_draw.high],
                                        "method": one_draw.method}
        differences[f"{budget[0]} x {budget[1]}"] = entry
    return {"seeds": seeds, "rows": rows, "difference": differences}


def _cell(entry: dict) -> str:
    return f"{entry['mean']:.3f} [{entry['interval'][0]:.3f}, {entry['interval'][1]:.3f}]"


def write(out: Path, summary: dict, meta: dict, budgets: list) -> None:
    from topkconv.io import atomic_write_csv, atomic_write_json, atomic_write_text

    atomic_write_json(out / "summary.json", {**meta, **summary})
    atomic_write_csv(out / "summary.csv", [{"eot": r["eot"], "seed": s, **{k: r[k]["per_seed"][i] for k in
                                                                          ("clean", "eot_pgd", "worst_case")}}
                                           for r in summary["rows"] for i, s in enumerate(summary["seeds"])])
    named = ", ".join(f"{d} x {t}" for d, t in budgets)
    lines = [f"# Fashion-MNIST SAP under EOT-PGD {named} ({len(summary['seeds'])} seeds, first {meta['n']} test "
             "images, 8/255)", "",
             f"commit {meta['commit']}; `{meta['command']}`", "",
             "Means over seeds, 95% t-intervals over seeds (expected accuracy over 10 draws of SAP); the one-draw "
             "worst case with the reproduce tables' crossed interval.", "",
             "| EOT-PGD draws x steps | clean | EOT-PGD | worst case over the suite | worst case, one draw "
             "| EOT-PGD seconds (median) |", "|" + " --- |" * 6]
    for r in summary["rows"]:
        lines.append(f"| {r['eot']} | {_cell(r['clean'])} | {_cell(r['eot_pgd'])} | {_cell(r['worst_case'])} | "
                     f"{_cell(r['worst_case_one_draw'])} | {r['eot_seconds_median']:.0f} |")
    lines.append("")
    for name, d in summary["difference"].items():
        lines.append(f"Paired difference ({name} minus {budgets[0][0]} x {budgets[0][1]}, same seeds and images): "
                     f"EOT-PGD {_cell(d['eot_pgd'])}; worst case {_cell(d['worst_case'])}; one draw "
                     f"{_cell(d['worst_case_one_draw'])}.")
    lines += ["", "Per seed (expected over draws):", "",
              "| seed | " + " | ".join(f"EOT-PGD {r['eot']} | worst case {r['eot']}" for r in summary["rows"]) + " |",
              "|" + " --- |" * (1 + 2 * len(summary["rows"]))]
    for i, seed in enumerate(summary["seeds"]):
        cells = " | ".join(f"{r['eot_pgd']['per_seed'][i]:.3f} | {r['worst_case']['per_seed'][i]:.3f}"
                           for r in summary["rows"])
        lines.append(f"| {seed} | {cells} |")
    atomic_write_text(out / "summary.md", "\n".join(lines) + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, required=True, help="the Fashion Table I run folder (its SAP runs)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--n", type=int, default=100, help="first test images (the preset's strong suite: 300)")
    parser.add_argument("--summarise-only", action="store_true", help="no evaluation: summarise the files found")
    parser.add_argument("--budget", action="append", metavar="D:T",
                        help="EOT-PGD draws:steps (repeat; default 4:16 and 10:100; the first is the reference)")
    args = parser.parse_args(argv)
    budgets = [tuple(int(v) for v in b.split(":")) for b in args.budget] if args.budget else BUDGETS
    if len(budgets) < 2 or any(len(b) != 2 or min(b) < 1 for b in budgets):
        raise SystemExit(f"fashion_sap_eot: --budget expects at least two D:T pairs of positive integers, got "
                         f"{args.budget}")
    args.out.mkdir(parents=True, exist_ok=True)
    found = {}
    for seed, run in sap_runs(args.runs).items():
        for draws, steps in budgets:
            path = args.out / f"seed{seed}-eot{draws}x{steps}.json"
            if not path.exists() and not args.summarise_only:
                print(f"seed {seed} ({run.name}), EOT-PGD {draws} x {steps}", flush=True)
                print(f"  {evaluate(run, path, args.n, draws, steps):.0f} s", flush=True)
            if path.exists():
                result = json.loads(path.read_text())
                if result["n_examples"] != args.n:
                    raise SystemExit(f"fashion_sap_eot: {path} holds {result['n_examples']} images, not --n {args.n}")
                found.setdefault(seed, {})[draws, steps] = per_seed(result)
    found = {seed: cells for seed, cells in found.items() if len(cells) == len(budgets)}
    if not found:
        raise SystemExit("fashion_sap_eot: no seed has every budget evaluated yet")
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    command = "python benchmarks/fashion_sap_eot.py " + " ".join(argv if argv is not None else sys.argv[1:])
    write(args.out, summarise(found, budgets), {"commit": commit, "command": command, "n": args.n}, budgets)
    print((args.out / "summary.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
