"""``topkconv reproduce``: plan every run and evaluation of the asked tables, run them (``--jobs N``
workers), then write each table, the claims and the figures.

All tables of one command share one plan, so a run two tables need (Table I's and Table III's Baseline)
is trained once, and the workers stay busy across tables. Under ``torchrun`` the jobs run one after
another in every process (training and attacks shard their batches), and rank 0 writes the reports.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Optional

from . import claims as claims_module
from . import jobs as jobs_module
from . import tables
from .spec import PAPER_TABLES, TARGETS, Study, display_path, load_table_spec, merge, spec_path
from .workspace import Workspace


def cli_overrides(data: Optional[str] = None, pretrained: Optional[str] = None) -> dict:
    """RunSpec overrides from ``--data`` and ``--pretrained``: they change the hash, as they should."""
    overrides: dict = {}
    if data is not None:
        overrides["data"] = {"root": str(data)}
    if pretrained is not None:
        if not Path(pretrained).is_file():
            raise FileNotFoundError(f"--pretrained: {pretrained} is not a file (expected torchvision's "
                                    f"vgg16-397923af.pth)")
        overrides["model"] = {"pretrained": str(pretrained)}
    return overrides


def load_study(table: str, preset: str, spec_file, overrides: dict, seeds: Optional[int]) -> Study:
    source = spec_file if spec_file is not None else spec_path(table, preset)
    spec = load_table_spec(source)
    if spec.table != table:
        raise ValueError(f"{source}: key 'table' is {spec.table!r}, but {table!r} was asked for")
    return Study(spec, overrides, seeds)


def workers_for(studies: list, jobs: Optional[int]) -> int:
    """``--jobs``, or its default: the CPU cores when no GPU is used; 1 under torchrun. Capped at the CPUs
    and at what the available memory holds (one line says so)."""
    from .. import distributed

    if distributed.context().world_size > 1:
        return 1
    if jobs is not None:
        return jobs_module.cap_workers(jobs_module.check_jobs(jobs), jobs_module._say)
    return jobs_module.cap_workers(jobs_module.default_jobs(studies[0].first_spec.train.device), lambda _: None)


@contextlib.contextmanager
def one_writer(out):
    """Hold ``out``'s lock for the whole command: a second ``reproduce`` or ``sweep`` into the same folder is
    refused with one line naming this process's pid. (Under torchrun, rank 0 holds it for every rank.)"""
    from .. import distributed
    from ..checkpoint import run_lock

    if not distributed.context().is_main:
        yield
        return
    with run_lock(out):
        yield


@contextlib.contextmanager
def process_group(device: str):
    """Under torchrun, join the process group once for all jobs (one rendezvous, not one per model)."""
    from .. import distributed

    ctx = distributed.setup(device)
    try:
        yield ctx
    finally:
        distributed.teardown(ctx)


def run_plan(workspace: Workspace, table_studies: list, train_only: list, workers: int, progress: bool) -> dict:
    """Plan and run the jobs of the studies; returns the log (jobs run, steps cached, seconds)."""
    start = time.perf_counter()
    planned, cached = workspace.plan(table_studies)
    extra, extra_cached = workspace.plan(train_only, evaluations=False)
    keys = {job.key for job in planned}
    planned = [j for j in extra if j.key not in keys and j.step != "evaluate"] + planned
    cached += extra_cached
    say = jobs_module._say if progress else (lambda message: None)
    if planned:
        say(f"{len(planned)} jobs to run ({len(cached)} steps cached) on {workers} worker"
            f"{'s' if workers > 1 else ''}")
    device = (table_studies or train_only)[0].first_spec.train.device
    with process_group(device) if workers == 1 else contextlib.nullcontext():
        # one torch thread per job on the CPU, in a worker or here: the same numbers whatever --jobs is
        done = jobs_module.run_jobs(planned, workers, threads=None if jobs_module.uses_gpu(device) else 1, say=say)
    return {"workers": workers, "jobs": done, "cached": cached, "notes": list(workspace.notes),
            "seconds": round(time.perf_counter() - start, 1)}


def reproduce(target: str = "table3", preset: str = "quick", data: Optional[str] = None,
              pretrained: Optional[str] = None, out=".", force: bool = False, progress: bool = True,
              spec_file: Optional[str] = None, overrides: Optional[dict] = None, seeds: Optional[int] = None,
              jobs: Optional[int] = None, claims_file=None) -> dict:
    """``topkconv reproduce``: one table, the figures, or ``all`` (the paper's three tables and the figures;
    not the adversarial-training table ``tableat``, which is asked for by name); then the verdicts on the claims.

    ``spec_file`` replaces the shipped ``topkconv/experiments/<table>-<preset>.toml`` (for one table, or for
    the figures, which use Table III's models). ``overrides`` (a RunSpec dict) is merged into every
    column; ``seeds`` replaces the specs' ``seeds``; ``jobs`` is the number of worker processes. Returns,
    per table, the report paths and the per-cell summary, plus ``claims`` and ``log``. One process at a
    time writes ``out`` (:func:`one_writer`).
    """
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    overrides = merge(cli_overrides(data, pretrained), overrides or {})
    names = list(PAPER_TABLES) if target == "all" else [target] if target != "figures" else []
    studies = [load_study(name, preset, spec_file, overrides, seeds) for name in names]
    figure_study = None
    if target in ("figures", "all"):
        figure_study = load_study("table3", preset, spec_file, overrides, 1)  # the figures use seed 0's models
        from .paper_figures import needed_labels

        needed_labels(figure_study)  # a spec without [figures] fails now, before any training
    # the built-in claims name the built-in specs' columns; a user's own spec may have fewer
    claims = (claims_module.load_claims(claims_file, {s.name: s.table for s in studies},
                                        skip_missing_columns=claims_file is None and spec_file is not None)
              if studies else [])
    workers = workers_for(studies or [figure_study], jobs)
    with one_writer(out):
        return _reproduce_in(Workspace(out, force), studies, figure_study, claims, claims_file, workers, progress)


def _reproduce_in(workspace: Workspace, studies: list, figure_study, claims: list, claims_file, workers: int,
                  progress: bool) -> dict:
    """Run the plan in ``workspace`` and write the reports (the body of :func:`reproduce`, under its lock)."""
    from .. import distributed
    from ..io import atomic_write_json

    log = run_plan(workspace, studies, [figure_study] if figure_study else [], workers, progress)
    if progress:
        jobs_module._say(f"jobs done in {log['seconds']:.0f} s ({len(log['jobs'])} run, {len(log['cached'])} "
                         f"cached, {workers} worker{'s' if workers > 1 else ''})")
    if not distributed.context().is_main:
        return {"log": log}
    done: dict = {}
    judged: list = []
    for study in studies:
        results = workspace.results(study)
        done[study.name] = tables.write_reports(workspace, study, results)
        judged += [claims_module.judge(claim.for_preset(study.table.preset), results, study.eps_list(),
                                       study.strong_radii())
                   for claim in claims if claim.table == study.name]
    if figure_study is not None:
        from .paper_figures import run_figures

        done["figures"] = {"paths": run_figures(workspace, figure_study)}
    if studies:
        done["claims"] = write_claims(workspace, studies, judged, claims_file or claims_module.default_path())
    atomic_write_json(workspace.reports / "reproduce-log.json", log)  # timings: kept out of the reports
    done["log"] = log
    return done


def write_claims(workspace: Workspace, studies: list, judged: list, source) -> dict:
    """``reports/claims.md`` and ``.json``; prints one line per claim (Table III's last)."""
    from ..io import atomic_write_json, atomic_write_text

    judged = claims_module.adjust(judged)   # Holm over this report's claims
    meta = {"tables": ", ".join(f"{s.name} ({s.table.preset}, {s.seeds} seeds)" for s in studies),
            "claims file": display_path(source),
            **claims_module.count_lines(judged)}
    md = workspace.reports / "claims.md"
    js = workspace.reports / "claims.json"
    atomic_write_text(md, claims_module.render_markdown(judged, meta))
    atomic_write_json(js, {"meta": meta, "claims": judged})
    print(f"\n{claims_module.heading(judged)} (deciding measure: A - B [95% interval], p, verdict; "
          f"Holm-adjusted):", flush=True)
    for line in claims_module.console_lines(judged):
        print(line, flush=True)
    return {"md": str(md), "json": str(js), "claims": judged}


def refuse_paper_preset_without_gpu() -> None:
    """``--preset paper`` trains VGG16 at 224 px: without a GPU, measure a few steps, state the cost, and stop."""
    import torch

    from .. import train
    from ..config import ModelConfig
    from ..data.folders import CINIC_TRAIN_IMAGES
    from ..errors import UserError
    from ..models import build_model

    if torch.cuda.is_available():
        return
    per_image = train.seconds_per_training_image(build_model(ModelConfig(arch="vgg16", image_size=224)), 224)
    hours = per_image * CINIC_TRAIN_IMAGES / 3600
    raise UserError(f"--preset paper trains VGG16 at 224 px and this machine has no GPU: a training step took "
                    f"{per_image:.2f} s per image here (measured on the first steps), so one epoch of CINIC-10's "
                    f"{CINIC_TRAIN_IMAGES:,} training images would take about {hours:,.0f} hours per model; "
                    f"add --yes to go on anyway, or --device cpu to train on the CPU on purpose")

