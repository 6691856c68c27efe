"""The evaluation of one model as a pipeline: plan -> run -> summarise -> judge -> the eval.json content."""

from __future__ import annotations

import dataclasses
import time
from typing import Optional

import torch
from torch import nn

from ..attacks.common import attack_mode, model_device
from ..config import AttackConfig
from ..progress import Progress
from .judge import judge
from .measure import measure_indicators
from .plan import check_config, model_traits, plan_attacks
from .run import gather, run_plan, world
from .strength import binarization_indicator, budget_fractions, over_draws, provisional
from .summarise import per_example, summarise

UNITS = "eps and step sizes in 0-255 units; accuracies are fractions of n_examples"


def _examples(x: torch.Tensor, y: torch.Tensor, cfg: AttackConfig) -> tuple[torch.Tensor, torch.Tensor]:
    if cfg.n_examples is not None:
        x, y = x[:cfg.n_examples], y[:cfg.n_examples]
    if x.shape[0] == 0:
        raise ValueError("evaluate: no examples to attack (x is empty)")
    return x, y


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: AttackConfig,
             surrogate: Optional[nn.Module] = None, progress: bool = True) -> dict:
    """Run ``cfg.suite`` on ``(x, y)`` (images in [0, 1]) and return the eval.json content.

    The first ``cfg.n_examples`` examples are used when it is set. Under an initialised
    ``torch.distributed`` group every rank must call this with the same arguments; all get the result.
    """
    check_config(cfg)
    x, y = _examples(x, y, cfg)
    started, device = time.perf_counter(), model_device(model)
    with torch.inference_mode(), attack_mode(model):
        num_classes = model(x[:1].to(device)).shape[1]
    traits = model_traits(model, x, cfg.indicators)
    plan = plan_attacks(model, cfg, traits, surrogate)
    # a line before each stage of the full suite after the attacks (on a terminal too: they have no bar)
    stage = Progress(0, "evaluate", enabled=progress and cfg.suite == "full" and world()[0] == 0).say
    outcomes = run_plan(model, x, y, plan, cfg, progress)
    stage(f"attacks done; the indicators on {min(x.shape[0], cfg.indicators.examples)} examples")
    # The indicators that need the model run on the first examples, on rank 0; the others get its result.
    measured = measure_indicators(model, x, y, cfg, surrogate) if cfg.suite == "full" and world()[0] == 0 else {}
    outcomes, measured = gather(outcomes, measured)
    n = x.shape[0]
    summary = summarise(plan, outcomes, n, len(range(0, n, cfg.batch_size)))
    if cfg.suite == "full":
        tic = time.perf_counter()
        stage("indicators done; the binarization test")
        measured["binarization"] = binarization_indicator(model, x, plan, summary, cfg, traits)
        measured["binarization"]["seconds"] = time.perf_counter() - tic
    indicators, found_checks, line = judge(plan, summary, traits, cfg, num_classes, measured)
    main_worst = next(w for w in summary.worst_cases if w["eps"] == cfg.eps)
    budgets = budget_fractions(plan, cfg, n)
    drawn = over_draws(plan, outcomes, len(range(0, n, cfg.batch_size)))
    for row, found in drawn.items():
        target = next((w for w in summary.worst_cases if row == f"worst_case@{w['eps']:g}"), None)
        (target if target is not None else summary.attacks.get(row, {}))["over_draws"] = found
    line.update(provisional(budgets))
    return {
        "units": UNITS, "suite": cfg.suite, "n_examples": n, "seed": cfg.seed,
        "clean": summary.acc["clean"], "attacks": summary.attacks,
        "worst_case": main_worst, "worst_cases": summary.worst_cases,
        "verdict": line, "budgets": budgets, "indicators": indicators,
        "over_draws": {"clean": drawn["clean"], "worst_case": main_worst["over_draws"]} if drawn else None,
        "indicator_examples": min(n, cfg.indicators.examples) if cfg.suite == "full" else 0,
        "masking_checks": found_checks, "eps_curve": summary.eps_curve,
        "per_example": per_example(summary.merged),
        "model": {"stochastic": traits.stochastic, "routing": traits.routing, "num_classes": num_classes,
                  "adaptive_attacks": list(traits.adaptive)},
        "config": dataclasses.asdict(cfg),
        "timings": {"total_seconds": time.perf_counter() - started, "clean_seconds": outcomes.seconds["clean"],
                    "world_size": world()[1], "device": str(device)},
    }
