"""The binarization test on the quick SAP model over more examples than ``sap_eot.py`` affords (issue 22): at 8/255
SAP's noise leaves few valid tasks (4 of 20 over 100 draws, 7 of 20 over 400), so 20 images give no real interval.

    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/sap_binarization.py --runs RUNS   # 100 images, 8/255, 400 draws
    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/sap_binarization.py --runs RUNS --smoke

``RUNS`` holds the ``sap`` run folder that ``sap_eot.py`` trains (table1-quick's SAP column, seed 0). The test
images are taken in chunks of ``--chunk``; each chunk is one :func:`binarization_tests` call, so every attack meets
the same tasks, fitted once, with ``BinarizationConfig(seed=<first image of the chunk>, draws=--draws)`` under
``seeded(model, <first image>)``. The first chunk is therefore ``sap_eot.py``'s 20-image test again (its first
attack's outcomes are those of a test of that attack alone). A chunk's outcomes are written to ``chunks/`` as soon
as it ends (write, then rename), and a rerun keeps the chunks it finds: the run resumes after a kill. The summary
(``summary.json`` / ``summary.md``) pools the chunks: pass / valid per attack with its Clopper-Pearson interval.
Single training seed: the spread is over images, not seeds.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sap_eot import binarization_attack  # noqa: E402

# (label, kind, samples, steps): the quick preset's EOT budget, the budget that passed every valid task on 20
# images, and the gradient-free control (the best of 100 random corners, 5 draws each)
ATTACKS = [("eot 10 x 100", "eot", 10, 100), ("eot 4 x 16", "eot", 4, 16),
           ("corner search 100 x 5 draws", "corners", 100, 5)]
# more, chosen with --attack LABEL: a middle EOT budget (on Fashion-MNIST it recovered most of 10 x 100's drop)
MORE_ATTACKS = [("eot 4 x 100", "eot", 4, 100)]


def run_chunk(model, x, eps: int, start: int, draws: int, steps_scale: float, attacks: list) -> dict:
    from topkconv.attacks.binarization import BinarizationConfig, binarization_tests
    from topkconv.attacks.common import seeded

    attacks = {label: binarization_attack(kind, samples, max(1, round(steps * steps_scale)), eps, {})
               for label, kind, samples, steps in attacks}
    tic = time.perf_counter()
    with seeded(model, start):
        found = binarization_tests(model, x, attacks, eps / 255, BinarizationConfig(seed=start, draws=draws))
    return {"eps": eps, "start": start, "images": len(x), "draws": draws, "seconds": time.perf_counter() - tic,
            "results": {label: result.to_dict() for label, result in found.items()}}


def pooled(chunks: list, eps: int, attacks: list) -> list:
    from topkconv.attacks.binarization import BinarizationResult

    rows = []
    for label, *_ in attacks:
        parts = [c["results"][label] for c in chunks if c["eps"] == eps]
        result = BinarizationResult(eps=eps / 255, outcomes=[o for p in parts for o in p["outcomes"]],
                                    known_holds=[True] * sum(p["known_passes"] for p in parts)
                                    + [False] * sum(p["passes"] + p["fails"] - p["known_passes"] for p in parts))
        rows.append({"attack": label, **{k: v for k, v in result.to_dict().items() if k != "outcomes"}, "eps": eps,
                     "per_chunk": [f"{p['passes']}/{p['passes'] + p['fails']}" for p in parts]})
    return rows


def write(out: Path, rows: list, chunks: list, args, command: str) -> None:
    from topkconv.io import atomic_write_json, atomic_write_text, environment_info

    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    seconds = sum(c["seconds"] for c in chunks)
    atomic_write_json(out / "summary.json", {"commit": commit, "command": command, "runs": str(args.runs),
                                             "draws": args.draws, "chunk": args.chunk, "seconds": seconds,
                                             "rows": rows, "env": environment_info()})
    lines = [f"# Binarization test on the quick SAP model, {args.examples} test images (single training seed 0)", "",
             f"commit {commit}; `{command}`; features over {args.draws} draws; {seconds / 60:.1f} min of tests "
             f"(chunks of {args.chunk} images, one thread)", "",
             "| attack | eps | passes / valid | invalid | pass rate [95% Clopper-Pearson] | known example held "
             "| per chunk |", "|" + " --- |" * 7]
    for r in rows:
        valid = r["passes"] + r["fails"]
        interval = f" [{r['interval'][0]:.2f}, {r['interval'][1]:.2f}]" if r["interval"] else ""
        rate = "" if r["pass_rate"] is None else f"{r['pass_rate']:.2f}"
        lines.append(f"| {r['attack']} | {r['eps']}/255 | {r['passes']} / {valid} | {r['invalid']} | {rate}{interval} "
                     f"| {r['known_passes']} / {valid} | {', '.join(r['per_chunk'])} |")
    atomic_write_text(out / "summary.md", "\n".join(lines) + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, default=Path("runs/sap-eot"), help="holds sap_eot.py's `sap` run folder")
    parser.add_argument("--out", type=Path, default=Path("results/sap-eot/binarization-100"))
    parser.add_argument("--examples", type=int, default=100, help="first test images")
    parser.add_argument("--chunk", type=int, default=20, help="images per binarization_tests call (the unit resumed)")
    parser.add_argument("--eps", type=int, action="append", help="radii in 0-255 units (default 8)")
    parser.add_argument("--draws", type=int, default=400, help="forward passes averaged for each fit and judgement")
    parser.add_argument("--smoke", action="store_true", help="4 images, 2 a chunk, 5 draws, a tenth of the steps")
    known = {a[0]: a for a in ATTACKS + MORE_ATTACKS}
    parser.add_argument("--attack", action="append", choices=sorted(known),
                        help="attacks to run (repeat; default: the first three, EOT-PGD 10 x 100 first)")
    args = parser.parse_args(argv)
    attacks = [known[label] for label in args.attack] if args.attack else ATTACKS
    if args.smoke:
        args.examples, args.chunk, args.draws = 4, 2, 5
    from topkconv.checkpoint import load_checkpoint
    from topkconv.data import load_data
    from topkconv.io import atomic_write_json

    model, spec = load_checkpoint(args.runs / "sap")
    x, _ = load_data(spec.data).test_tensors(limit=args.examples)
    (args.out / "chunks").mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/sap_binarization.py " + " ".join(argv if argv is not None else sys.argv[1:])
    chunks = []
    for eps in args.eps or [8]:
        for start in range(0, args.examples, args.chunk):
            path = args.out / "chunks" / f"eps{eps}-draws{args.draws}-from{start}-n{args.chunk}.json"
            if not path.exists():
                found = run_chunk(model, x[start:start + args.chunk], eps, start, args.draws,
                                  0.1 if args.smoke else 1.0, attacks)
                atomic_write_json(path, found)
                passes = ", ".join(f"{label} {r['passes']}/{r['passes'] + r['fails']}"
                                   for label, r in found["results"].items())
                print(f"eps {eps}/255, images {start}-{start + len(x[start:start + args.chunk]) - 1}: {passes} "
                      f"({found['seconds']:.0f} s)", flush=True)
            chunks.append(json.loads(path.read_text()))
    write(args.out, [row for eps in args.eps or [8] for row in pooled(chunks, eps, attacks)], chunks, args, command)
    return 0


if __name__ == "__main__":
    sys.exit(main())
