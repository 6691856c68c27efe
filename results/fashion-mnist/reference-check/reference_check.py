"""Do the presets' cut budgets change the worst case? The strong suite of one seed's models re-run with AutoAttack
and Square at their reference budgets, against the preset's own (quick) strong suite on the same examples.

    python reference_check.py SPEC OUT_DIR --seed 0 --jobs 2 --folder FOLDER [--n N] [--labels LABEL ...]

SPEC: a table spec (e.g. src/topkconv/experiments/table3-fashion.toml); OUT_DIR: the folder that
`topkconv reproduce ... --out OUT_DIR` filled (its runs/ hold the trained models and their quick strong suite,
eval-strong-8.json). For every column it runs `topkconv evaluate RUN --suite full` with the run's own attack
settings except the budgets in REFERENCE (each evaluation in its own process, one torch thread), then writes
FOLDER/reference-check.{md,json,csv}: per model, the quick and the reference worst case on the same examples,
and the examples that only the reference budgets broke (on the first N of the quick suite's examples: default all).
Each evaluation's eval.json and console output stay in FOLDER/<label>/.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from topkconv.io import atomic_write_json, atomic_write_text
from topkconv.reproduce import Study, Workspace, load_table_spec

# AutoAttack's standard version at its 100 iterations and Square at AutoAttack's 5,000 queries (both their
# reference budgets); the zeroth-order attack at 100 steps of 50 pairs on every survivor (5,000 pairs an example,
# 0.8% of Tramer et al.'s 611,000: the reference itself is over a million forward passes an example); the masking
# indicators on 100 examples, as the Fashion-MNIST presets now run them.
REFERENCE = ["--apgd-iters", "100", "--autoattack-attacks", "apgd-ce", "apgd-t", "fab-t", "square",
             "--square-queries", "5000", "--zo-steps", "100", "--zo-samples", "0:50", "--zo-examples", "100000",
             "--indicator-examples", "100", "--curves", "0"]


def planned(spec: Path, out_dir: Path, seed: int, labels=None, n=None) -> list[dict]:
    """Each column's (or each of ``labels``') run folder, quick strong-suite file and surrogate at ``seed``,
    with the examples to compare on (the quick suite's, or its first ``n``)."""
    table = load_table_spec(spec)
    study, workspace = Study(table), Workspace(out_dir)
    eps = max(table.strong_eps)
    rows = []
    for label in labels or table.reproduced_labels:
        quick, surrogate = workspace.evaluation_file(study, label, seed, f"strong@{eps:g}")
        if not quick.is_file():
            raise FileNotFoundError(f"{quick}: no quick strong suite for {label!r} at seed {seed}; run "
                                    f"`topkconv reproduce {table.table} --preset {table.preset} --out {out_dir}` first")
        rows.append({"label": label, "run": str(quick.parent), "quick": str(quick), "surrogate": surrogate,
                     "eps": eps, "n": min(n or 10 ** 9, json.loads(quick.read_text())["n_examples"])})
    return rows


def evaluate_at_reference(row: dict, folder: Path) -> dict:
    """``topkconv evaluate`` of one run at the reference budgets; its eval.json and console in folder/label."""
    where = folder / row["label"].replace(" ", "_")
    where.mkdir(parents=True, exist_ok=True)
    command = [str(Path(sys.executable).parent / "topkconv"), "evaluate", row["run"], "--suite", "full",
               "--n", str(row["n"]), "--eps", f"{row['eps']:g}", "--no-progress", "--device", "cpu",
               "--out", str(where / "eval.json"),
               *(["--surrogate", row["surrogate"]] if row["surrogate"] else []), *REFERENCE]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    start = time.monotonic()
    with open(where / "console.log", "w") as log:
        log.write("topkconv " + " ".join(command[1:]) + "\n")
        log.flush()
        done = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    if done.returncode:
        raise RuntimeError(f"{row['label']}: topkconv evaluate exited {done.returncode}; see {where / 'console.log'}")
    return {**row, "reference": str(where / "eval.json"), "seconds": round(time.monotonic() - start, 1)}


def compared(row: dict) -> dict:
    """Quick against reference worst case on the same examples (robust masks per example)."""
    quick, ref = (json.loads(Path(row[k]).read_text()) for k in ("quick", "reference"))
    key = f"worst_case@{row['eps']:g}"
    masks = [[c == "1" for c in result["per_example"][key][:row["n"]]] for result in (quick, ref)]
    assert len(masks[0]) == len(masks[1]), (row["label"], len(masks[0]), len(masks[1]))
    only_ref = sum(q and not r for q, r in zip(*masks))
    only_quick = sum(r and not q for q, r in zip(*masks))
    n = len(masks[0])

    def acc(result, name):  # on the compared examples
        mask = result["per_example"].get(name)
        return None if mask is None else mask[:n].count("1") / n

    return {"label": row["label"], "n": n, "clean": acc(ref, "clean"), "quick_worst": sum(masks[0]) / n,
            "reference_worst": sum(masks[1]) / n, "broken_only_by_reference": only_ref,
            "robust_only_under_reference": only_quick,
            "quick_autoattack": acc(quick, "autoattack"), "reference_autoattack": acc(ref, "autoattack"),
            "reference_provisional": ref["verdict"]["reason"] if ref["verdict"]["provisional"] else "no",
            "reference_verdict": ref["verdict"]["text"], "seconds": row["seconds"]}


def write(rows: list, folder: Path, header: dict) -> None:
    atomic_write_json(folder / "reference-check.json", {**header, "rows": rows})
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(folder / "reference-check.csv", buffer.getvalue())
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    lines = [f"# Reference budgets against the preset's: {header['spec']}, seed {header['seed']}", "",
             f"Quick = the preset's strong suite (`{header['out_dir']}`); reference = the same suite with "
             f"`{' '.join(REFERENCE)}`. Worst case at {rows[0]['n']} test images, per example over every attack.", "",
             "| model | clean | worst, quick | worst, reference | broken only by reference | AutoAttack quick / ref "
             "| seconds (reference) |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['label']} | {r['clean']:.3f} | {r['quick_worst']:.3f} | {r['reference_worst']:.3f} | "
              f"{r['broken_only_by_reference']} | {fmt(r['quick_autoattack'])} / {fmt(r['reference_autoattack'])} | "
              f"{r['seconds']:.0f} |" for r in rows]
    lines += ["", "Verdicts at the reference budgets:", ""] + [f"- {r['label']}: {r['reference_verdict']}"
                                                              for r in rows]
    atomic_write_text(folder / "reference-check.md", "\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("spec", type=Path)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--folder", type=Path, default=Path(__file__).parent)
    parser.add_argument("--labels", nargs="+", help="these columns only (default: every column)")
    parser.add_argument("--n", type=int, help="the first N test images only (default: the quick suite's)")
    args = parser.parse_args()
    plan = planned(args.spec, args.out_dir, args.seed, args.labels, args.n)
    with ThreadPoolExecutor(args.jobs) as pool:
        done = list(pool.map(lambda row: evaluate_at_reference(row, args.folder), plan))
    rows = [compared(row) for row in done]
    write(rows, args.folder, {"spec": str(args.spec), "out_dir": str(args.out_dir), "seed": args.seed,
                              "n": args.n, "reference_flags": REFERENCE})
    print((args.folder / "reference-check.md").read_text())


if __name__ == "__main__":
    main()
