"""SAP attacked as Athalye, Carlini and Wagner (ICML 2018) attacked it: EOT-PGD with many more draws and steps
(issue 22, section 4), on the quick SAP model and its undefended twin, plus the binarization test on SAP.

    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/sap_eot.py            # about 15 minutes, one thread
    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/sap_eot.py --more     # + 100 x 16 and 10 x 250: about 27
    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/sap_eot.py --more --longest   # + 10 x 1,000: 85 min (shared)
    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/sap_eot.py --more --longest --longer   # + 10 x 2,000 at 24/255
    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/sap_eot.py --smoke    # the same pipeline in about a minute

1. ``topkconv train`` twice: table1-quick.toml's base model (digits at 32 px, vgg-small width 0.25, hidden 128,
   10 epochs) as the Baseline column (standard) and the SAP column (SAP-80), seed 0, into ``--runs``.
2. ``topkconv evaluate RUN --suite paper`` per grid point below (FGSM, PGD-16 from both starts and, on SAP,
   EOT-PGD), each final example judged over 10 draws of SAP (``[attack.eot_pgd] evaluation_draws``): eval.json
   gives the expected accuracy over draws (the headline) and the worst draw.
3. The binarization test (Zimmermann et al. 2022) of the quick and the large EOT budget on SAP (and of PGD-16 on
   the standard model, the control) on the first ``--binarization-examples`` test images.
4. One row per (model, eps, attack) in summary.csv / summary.json / summary.md under ``--out``, with the commit
   and every command. A single training seed: no seed-to-seed spread is measured here.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

TRAIN = ["--dataset", "digits", "--image-size", "32", "--no-augment", "--model", "vgg-small", "--hidden", "128",
         "--width", "0.25", "--epochs", "10", "--batch-size", "64", "--lr", "0.04", "--warmup-epochs", "2",
         "--seed", "0"]
MODELS = {"standard": ["--defense", "standard"], "sap": ["--defense", "sap", "--sap-frac", "0.8"]}
BOTH_EPS = ["--eps", "8", "--extra-eps", "24"]              # PGD's step 0.75 at 8/255, 2.25 at 24/255
ONLY_24 = ["--eps", "24", "--step-size", "2.25"]
# (name, model, evaluate flags): the quick preset's budgets, then larger ones along each axis
GRID = [
    ("standard-pgd16", "standard", BOTH_EPS),
    ("standard-pgd200", "standard", BOTH_EPS + ["--steps", "200"]),
    ("sap-eot4x16", "sap", BOTH_EPS + ["--eot-samples", "4"]),                      # table1-quick's SAP budget
    ("sap-eot10x100", "sap", BOTH_EPS + ["--eot-samples", "10", "--eot-steps", "100"]),
]
# Larger still, left out of the default run for its CPU cost (measured: 10 x 100 on 100 examples at two radii took
# about 20 minutes on one shared core): --more adds these, at 24/255 only.
MORE = [("sap-eot100x16", "sap", ONLY_24 + ["--eot-samples", "100"]),
        ("sap-eot10x250", "sap", ONLY_24 + ["--eot-samples", "10", "--eot-steps", "250"])]
# Longer still (measured: 10 x 250 at 24/255 was still falling): --longest adds 1,000 steps at both radii, about an
# hour on one core (10 x 100 at both radii took 348 s).
LONGEST = [("sap-eot10x1000", "sap", BOTH_EPS + ["--eot-samples", "10", "--eot-steps", "1000"])]
# One doubling more at 24/255 (measured: 250 -> 1,000 steps still removed about 2 points a doubling, over the "still
# falling" rule's 1): --longer adds 2,000 steps there, about an hour on one core.
LONGER = [("sap-eot10x2000", "sap", ONLY_24 + ["--eot-samples", "10", "--eot-steps", "2000"])]
SMOKE_GRID = [("standard-pgd16", "standard", BOTH_EPS + ["--steps", "2"]),
              ("sap-eot2x3", "sap", BOTH_EPS + ["--eot-samples", "2", "--eot-steps", "3", "--steps", "2"])]
# (model, label, kind, samples, steps, draws[, EOT-PGD's other keyword arguments]): the quick and the large EOT
# budget on SAP, PGD-16 on the standard model (the control that must pass), and on both a corner search (samples
# corners x steps draws each): it tries the kind of point the readout was fitted to label 1, so it shows whether a
# redraw of SAP keeps such points adversarial.
# draws: forward passes whose mean features the readout is fitted on and a point is judged by
# (BinarizationConfig.draws, what `evaluate --suite full` uses on a random model). On one draw, SAP's fresh draws
# undid the adversarial examples the readout made (the corner control passed 5 of 20): the test could not decide.
BINARIZATION = [("sap", "eot 4 x 16", "eot", 4, 16, 1), ("sap", "eot 10 x 100", "eot", 10, 100, 1),
                ("sap", "corner search 100 x 5 draws", "corners", 100, 5, 1),
                ("sap", "eot 10 x 100", "eot", 10, 100, 10),
                ("sap", "corner search 100 x 5 draws", "corners", 100, 5, 10),
                # the budget along each axis, judged over 10 draws: more steps, and more draws per step
                ("sap", "eot 10 x 1000", "eot", 10, 1000, 10), ("sap", "eot 100 x 100", "eot", 100, 100, 10),
                # an attack of another kind: AutoAttack's version for random models (APGD-CE, its step-size
                # schedule and momentum, 20 draws a gradient; APGD-DLR needs three classes, the test has two)
                ("sap", "apgd-ce rand 20 x 100", "apgd-rand", 20, 100, 10),
                # EOT-PGD with other knobs than its budget: four random starts, and cross-entropy instead of the margin
                ("sap", "eot 10 x 100, 4 restarts", "eot", 10, 100, 10, {"restarts": 4}),
                ("sap", "eot 10 x 100, cross-entropy", "eot", 10, 100, 10, {"loss": "ce"}),
                # the judgement's own noise: features averaged over 100 (400) draws for the fit and every judgement
                ("sap", "eot 10 x 100", "eot", 10, 100, 100),
                ("sap", "corner search 100 x 5 draws", "corners", 100, 5, 100),
                ("sap", "eot 10 x 1000", "eot", 10, 1000, 100), ("sap", "eot 100 x 100", "eot", 100, 100, 100),
                ("sap", "apgd-ce rand 20 x 100", "apgd-rand", 20, 100, 100),
                ("sap", "eot 10 x 100", "eot", 10, 100, 400),
                ("standard", "pgd 16", "pgd", 1, 16, 1),
                ("standard", "corner search 100 x 5 draws", "corners", 100, 5, 1)]


def cli(args: list, log: list) -> None:
    command = [sys.executable, "-m", "topkconv.cli"] + args
    log.append("python -m topkconv.cli " + shlex.join(args))
    print(log[-1], flush=True)
    subprocess.run(command, check=True)


def train(runs: Path, epochs: list, log: list) -> None:
    for model, flags in MODELS.items():
        cli(["train", "--no-progress", "--force", "--out", str(runs / model)] + TRAIN + flags + epochs, log)


def rows_of(name: str, model: str, result: dict) -> list:
    """One row per reported attack row of an eval.json (every eps), with its accuracy over draws on SAP."""
    rows = []
    worst = {f"worst_case@{w['eps']:g}": dict(w, params={"eps": w["eps"]}) for w in result["worst_cases"]}
    for row, found in {**result["attacks"], **worst}.items():
        params, drawn = found.get("params", {}), found.get("over_draws") or {}
        rows.append({"run": name, "model": model, "row": row, "eps": params.get("eps", found.get("eps")),
                     "eot_samples": params.get("eot_samples"), "steps": params.get("steps"),
                     "loss": params.get("loss", "ce"), "accuracy": found["accuracy"],
                     "expected_over_draws": drawn.get("expected"), "interval": drawn.get("interval"),
                     "worst_draw": drawn.get("worst"), "seconds": found.get("seconds"),
                     "eval_seconds": result["timings"]["total_seconds"]})
    return rows


def evaluate(runs: Path, out: Path, grid: list, n: int, log: list, reuse: bool = False) -> list:
    """Each grid point's eval.json (kept with ``reuse`` when it exists for the same n) as summary rows."""
    rows = []
    for name, model, flags in grid:
        target = out / f"{name}.json"
        if reuse and target.exists() and json.loads(target.read_text())["n_examples"] == n:
            found = json.loads(target.read_text())
            log.append(f"(reused {target}, made at commit {found['env'].get('git_commit')})")
            rows += rows_of(name, model, found)
            continue
        tic = time.perf_counter()
        cli(["evaluate", str(runs / model), "--suite", "paper", "--n", str(n), "--device", "cpu", "--no-progress",
             "--out", str(target)] + flags, log)
        print(f"  {time.perf_counter() - tic:.0f} s", flush=True)
        (out / f"{name}-acc-vs-eps.png").unlink(missing_ok=True)   # JSON and Markdown only
        rows += rows_of(name, model, json.loads(target.read_text()))
    return rows


def corner_search(corners: int, draws: int):
    """A gradient-free control attack on the test's own construction: ``corners`` random corners of the eps-ball
    (what the readout was fitted to label 1), each judged on ``draws`` draws; the one labelled 1 most often."""
    import torch

    def attack(binarized, xs, ys, radius):
        generator = torch.Generator().manual_seed(1)
        signs = torch.randint(0, 2, (corners, *xs.shape[1:]), generator=generator).to(xs.dtype) * 2 - 1
        points = (xs + signs.to(xs.device) * radius).clamp(0.0, 1.0)
        with torch.no_grad():
            hits = sum((binarized(points).argmax(1) != ys[0]).int() for _ in range(draws))
        return points[hits.argmax()][None]
    return attack


def binarization_attack(kind: str, samples: int, steps: int, eps: float, options: dict):
    """The attack of a :data:`BINARIZATION` entry at ``eps`` (0-255 units; PGD's step / eps ratio 0.75 / 8);
    ``options``: more keyword arguments of EOT-PGD."""
    from topkconv.attacks.autoattack import autoattack
    from topkconv.attacks.eot import eot_pgd
    from topkconv.attacks.pgd import pgd

    step = 0.75 / 8 * eps / 255
    if kind == "corners":
        return corner_search(samples, steps)
    if kind == "pgd":
        return lambda binarized, xs, ys, radius: pgd(binarized, xs, ys, radius, step, steps, start="random")
    if kind == "apgd-rand":
        return lambda binarized, xs, ys, radius: autoattack(binarized, xs, ys, radius, version="rand",
                                                            attacks=["apgd-ce"], n_iter=steps, eot_iter=samples)
    return lambda binarized, xs, ys, radius: eot_pgd(binarized, xs, ys, radius, step, steps, samples, **options)


def binarization(runs: Path, examples: int, steps_scale: float, log: list, done: list) -> list:
    """The binarization test of each entry of :data:`BINARIZATION` at 8/255 and 24/255; entries of ``done`` (an
    earlier summary's, same examples) are kept."""
    from topkconv.attacks.binarization import BinarizationConfig, binarization_test
    from topkconv.attacks.common import seeded
    from topkconv.checkpoint import load_checkpoint
    from topkconv.data import load_data

    found = []
    kept = {(b["model"], b["attack"], b["eps"], b.get("draws", 1)): b for b in done if b.get("examples") == examples}
    for model_name, label, kind, samples, steps, draws, *options in BINARIZATION:
        model, spec = load_checkpoint(runs / model_name)
        x, _ = load_data(spec.data).test_tensors(limit=examples)
        for eps in (8, 24):
            if (model_name, label, eps, draws) in kept:
                found.append({"draws": 1, **kept[model_name, label, eps, draws]})
                continue
            attack = binarization_attack(kind, samples, max(1, round(steps * steps_scale)), eps, *(options or [{}]))
            tic = time.perf_counter()
            with seeded(model, 0):
                result = binarization_test(model, x, attack, eps / 255, BinarizationConfig(seed=0, draws=draws))
            found.append({"model": model_name, "attack": label, "eps": eps, "draws": draws, "examples": examples,
                          "seconds": time.perf_counter() - tic,
                          **{k: result.to_dict()[k] for k in ("passes", "fails", "invalid", "pass_rate", "interval",
                                                               "known_passes", "known_rate")}})
            print(f"  binarization {model_name} {label} eps {eps} ({draws} draws): {found[-1]['passes']} of "
                  f"{found[-1]['passes'] + found[-1]['fails']} valid pass", flush=True)
    log.append(f"binarization_test(model, first {examples} test images, each attack of BINARIZATION, eps 8/255 "
               f"and 24/255, BinarizationConfig(seed=0, draws=its draws)) under seeded(model, 0): see "
               "benchmarks/sap_eot.py")
    return found


def before_change(runs: Path, n: int, samples: int, steps: int, log: list) -> list:
    """The quick EOT budget as EOT-PGD ran before this benchmark's fix: PGD with ``eot_samples`` (cross-entropy,
    returning the first iterate whose draw-averaged logits misclassify), judged over the same 10 draws."""
    from topkconv.attacks.common import seeded
    from topkconv.attacks.pgd import pgd
    from topkconv.checkpoint import load_checkpoint
    from topkconv.data import load_data
    from topkconv.evaluate.run import Draws
    from topkconv.evaluate.strength import draw_statistics

    model, spec = load_checkpoint(runs / "sap")
    x, y = load_data(spec.data).test_tensors(limit=n)
    rows = []
    for eps in (8, 24):
        tic = time.perf_counter()
        with seeded(model, 0) as generator:
            x_adv = pgd(model, x, y, eps / 255, 0.75 / 8 * eps / 255, steps, start="random", eot_samples=samples,
                        generator=generator)
        drawn = draw_statistics(Draws(model, 10, 0, 0).correct(x_adv, y))
        rows.append({"run": f"sap-before-fix-eot{samples}x{steps}", "model": "sap", "row": f"pgd(eot_samples={samples})",
                     "eps": eps, "eot_samples": samples, "steps": steps, "loss": "ce", "accuracy": None,
                     "expected_over_draws": drawn["expected"], "interval": drawn["interval"],
                     "worst_draw": drawn["worst"], "seconds": time.perf_counter() - tic, "eval_seconds": None})
    log.append(f"pgd(sap, first {n} test images, eps 8/255 and 24/255, step 0.75/8 * eps, {steps} steps, random "
               f"start, eot_samples={samples}) judged over 10 draws: see benchmarks/sap_eot.py")
    return rows


def _fmt(value, digits=3):
    return "" if value is None else f"{value:.{digits}f}"


def write(out: Path, rows: list, binar: list, log: list, n: int, seconds: float) -> None:
    from topkconv.io import atomic_write_csv, atomic_write_json, atomic_write_text, environment_info

    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain", "--", "src", "benchmarks"], capture_output=True,
                                text=True).stdout.strip())
    spent = {(r["run"], r["eps"] if r.get("eval_seconds") is None else None): r.get("eval_seconds") or r["seconds"]
             for r in rows}   # one entry per eval.json (its total time), one per eps of the other rows
    measured = sum(spent.values()) + sum(b["seconds"] for b in binar)
    meta = {"commit": commit, "attack_seconds": measured, "dirty_tree": dirty, "n_examples": n, "seeds": [0], "total_seconds": seconds,
            "commands": log, "env": environment_info()}
    atomic_write_json(out / "summary.json", {**meta, "rows": rows, "binarization": binar})
    atomic_write_csv(out / "summary.csv", [{**row, "interval": json.dumps(row["interval"])} for row in rows])
    lines = [f"# SAP under EOT: quick SAP model vs its standard twin (single training seed 0, n = {n})", "",
             f"commit {commit}{' (uncommitted changes)' if dirty else ''}; {seconds / 60:.1f} min this invocation; "
             f"the attacks reported took {measured / 60:.1f} min on one thread (a reused eval.json names the "
             "commit it ran at in the commands)", "",
             "| run | row | eps | EOT draws x steps | loss | accuracy (one draw) | expected over 10 draws [95%] "
             "| worst draw |", "|" + " --- |" * 8]
    for r in rows:
        budget = f"{r['eot_samples']} x {r['steps']}" if r["eot_samples"] else (f"1 x {r['steps']}" if r["steps"] else "")
        interval = f" [{_fmt(r['interval'][0])}, {_fmt(r['interval'][1])}]" if r["interval"] else ""
        lines.append(f"| {r['run']} | {r['row']} | {r['eps']:g} | {budget} | {r['loss']} | {_fmt(r['accuracy'])} | "
                     f"{_fmt(r['expected_over_draws'])}{interval} | {_fmt(r['worst_draw'])} |")
    lines += ["", "Binarization test (pass = the attack found the adversarial example known to exist):", "",
              "| model | attack | eps | features over draws | passes / valid | invalid "
              "| pass rate [95% Clopper-Pearson] | known example held on re-judgement |", "|" + " --- |" * 8]
    for b in binar:
        interval = f" [{_fmt(b['interval'][0], 2)}, {_fmt(b['interval'][1], 2)}]" if b["interval"] else ""
        # rows made before validity was judged anew (and the known example re-judged) have no such count
        known = f"{b['known_passes']} / {b['passes'] + b['fails']}" if "known_passes" in b else "(not measured)"
        lines.append(f"| {b['model']} | {b['attack']} | {b['eps']} | {b.get('draws', 1)} | {b['passes']} / "
                     f"{b['passes'] + b['fails']} | {b['invalid']} | {_fmt(b['pass_rate'], 2)}{interval} | {known} |")
    lines += ["", "Commands:", "", "```"] + log + ["```", ""]
    atomic_write_text(out / "summary.md", "\n".join(lines))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("results/sap-eot"), help="summary and eval.json files")
    parser.add_argument("--runs", type=Path, default=Path("runs/sap-eot"), help="run folders (weights stay here)")
    parser.add_argument("--n", type=int, default=100, help="test examples attacked")
    parser.add_argument("--binarization-examples", type=int, default=20)
    parser.add_argument("--smoke", action="store_true", help="tiny budgets: check the pipeline, not SAP")
    parser.add_argument("--skip-train", action="store_true", help="reuse the run folders in --runs")
    parser.add_argument("--reuse", action="store_true", help="keep a grid point's eval.json when it exists")
    parser.add_argument("--more", action="store_true", help="also the larger budgets of MORE (at 24/255)")
    parser.add_argument("--longest", action="store_true",
                        help="also 10 x 1,000 at both radii (measured: 64 min on a shared core)")
    parser.add_argument("--longer", action="store_true", help="also 10 x 2,000 at 24/255 (about an hour, one core)")
    parser.add_argument("--redo-binarization", action="store_true",
                        help="with --reuse: run the binarization test again instead of keeping the summary's rows")
    args = parser.parse_args(argv)
    tic, log = time.perf_counter(), []
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.skip_train:
        train(args.runs, ["--epochs", "1"] if args.smoke else [], log)
    n = 8 if args.smoke else args.n
    grid = SMOKE_GRID if args.smoke else (GRID + (MORE if args.more else []) + (LONGEST if args.longest else [])
                                          + (LONGER if args.longer else []))
    rows = evaluate(args.runs, args.out, grid, n, log, reuse=args.reuse)
    rows += before_change(args.runs, n, 2 if args.smoke else 4, 3 if args.smoke else 16, log)
    previous = args.out / "summary.json"
    keep = args.reuse and previous.exists() and not args.redo_binarization
    done = json.loads(previous.read_text()).get("binarization", []) if keep else []
    binar = binarization(args.runs, 2 if args.smoke else args.binarization_examples, 0.1 if args.smoke else 1.0, log,
                         done)
    write(args.out, rows, binar, log, n, time.perf_counter() - tic)
    return 0


if __name__ == "__main__":
    sys.exit(main())
