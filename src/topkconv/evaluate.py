"""Robustness evaluation of one model: the paper's protocol, stronger attacks and gradient-masking checks.

:func:`evaluate` runs a suite of attacks on ``(x, y)`` and returns the content of ``eval.json``;
:func:`evaluate_run` does it for a checkpoint folder and writes ``eval.json`` and ``acc-vs-eps.png``.

Suites (eps and step sizes in 0-255 units in the config and in the output, fractions of 1 in the attacks):

* ``paper``: clean, FGSM and PGD-16 (step 0.75) at ``eps`` (and at each of ``extra_eps``). PGD runs from a
  zero start (``pgd_zero``, the paper's reading) and from a random start (``pgd_random``); the row ``pgd``
  is their per-example worst. For a stochastic model (e.g. SAP) also EOT-PGD, the same PGD with the
  gradient averaged over ``eot_samples`` draws of the randomness.
* ``full``: the paper suite plus AutoAttack (``standard``, or ``rand`` for stochastic models), Square,
  transfer from a surrogate (if one is given), the zeroth-order attack that broke k-WTA
  (``zeroth_order``), BPDA-PGD through the dense stand-in (``bpda_dense``) and through a soft relaxation of
  the selection (``bpda_soft``) for models whose defence calls for them, PGD with doubled steps and
  doubled restarts, an accuracy-vs-eps curve, the masking indicators of
  :mod:`topkconv.attacks.indicators` (with the five checks of :mod:`topkconv.attacks.masking` among them)
  and one verdict line.

Per-example bookkeeping: an example is robust under an attack when it is classified correctly both clean
and attacked; ``worst_cases`` holds, for every eps at which attacks ran, the examples that survive *every*
attack at that eps, and ``worst_case`` is the one at ``eps``.

Which adaptive attacks a model gets (EOT, BPDA) comes from the defence registry
(:func:`topkconv.defenses.adaptive_attacks`); a forward pass found random on a probe also gets EOT.

Evaluating your own model: any ``nn.Module`` that takes images in [0, 1] (normalisation inside) works::

    from topkconv.config import AttackConfig
    from topkconv.evaluate import evaluate
    result = evaluate(model, x_test, y_test, AttackConfig(suite="full", eps=8, n_examples=200))
    print(result["verdict"]["text"], result["worst_case"]["accuracy"])

Sharding: the examples are cut into fixed chunks of ``cfg.batch_size``; under ``torchrun`` rank r attacks
chunks r, r + world, ... and the per-example masks are gathered with ``all_gather_object``. Every random
draw of an attack on a chunk (random starts, SAP's draws, AutoAttack's seed) is seeded from
``(cfg.seed, chunk, attack)``, so the numbers do not depend on the number of processes.
"""

from __future__ import annotations

import dataclasses
import io
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from .attacks import autoattack, correct, fgsm, pgd, square, transfer, zeroth_order
from .attacks.common import attack_mode, model_device, seeded
from .attacks.indicators import (NOT_STRONGER_THAN_WHITEBOX, gradient_agreement, incomplete_optimisation,
                                 not_applicable, randomness, run_traced, selection_flip_rate, silent_success,
                                 square_beats_whitebox, transfer_failure, unavailable_gradients,
                                 unconstrained_failure, unstable_predictions, verdict, zero_gradient_at_start)
from .attacks.masking import masking_checks
from .checkpoint import EVAL_FILE, PLOT_FILE
from .config import AttackConfig
from .layers import dense_gradients, soft_gradients

SUITES = ("paper", "full")
# The white-box gradient attacks whose survivors a cascaded attack (cfg.cascade_attacks) runs on; their
# per-example worst case is reported as the row "whitebox" when a cascade ran.
CASCADE_BASE = ("pgd_zero", "pgd_random", "eot_pgd", "pgd_2x_steps", "pgd_2x_restarts", "autoattack")
CASCADABLE = ("square", "transfer", "zeroth_order", "bpda_dense", "bpda_soft")


@dataclass
class PlannedAttack:
    name: str
    eps: float                     # 0-255 units
    params: dict                   # as reported, 0-255 units
    run: Callable[..., torch.Tensor]  # (x, y, generator, seed) -> x_adv
    examples: Optional[int] = None    # attack only the first N examples (the others are left clean)
    cascade: bool = False             # attack only the survivors of the CASCADE_BASE attacks at eps


@dataclass
class CombinedAttack:
    """A reported row that is the per-example worst of attacks that ran (an example is robust only if it
    survives each of ``parts``): the paper's "PGD" is the worst of the zero and the random start."""
    name: str
    eps: float
    parts: tuple


def _fmt(eps: float) -> str:
    return f"{eps:g}"


def _gradient_mode(bpda: Optional[str], tau: Optional[float]):
    """The layers' backward for a BPDA attack: exact (None), the dense stand-in, or the soft selection."""
    if bpda == "soft":
        return soft_gradients(tau=tau)
    return dense_gradients(bpda == "dense")


BPDA_DESCRIPTIONS = {"dense": "dense gradients through every top-k layer",
                     "soft": "a sigmoid relaxation of every top-k layer's selection (forward exact)"}


def _pgd_attack(name, model, eps, step, steps, start="random", restarts=1, eot=1, bpda=None,
                tau=None) -> PlannedAttack:
    def run(x, y, generator, seed):
        with _gradient_mode(bpda, tau):
            return pgd(model, x, y, eps / 255, step / 255, steps, start=start, restarts=restarts, eot_samples=eot,
                       generator=generator)

    params = {"eps": eps, "step_size": step, "steps": steps, "restarts": restarts, "start": start}
    if eot > 1:
        params["eot_samples"] = eot
    if bpda:
        params["bpda"] = BPDA_DESCRIPTIONS[bpda]
        if bpda == "soft":
            params["tau"] = "per layer from the score spread" if tau is None else tau
    return PlannedAttack(name, eps, params, run)


def _fgsm_attack(name, model, eps) -> PlannedAttack:
    return PlannedAttack(name, eps, {"eps": eps}, lambda x, y, g, s: fgsm(model, x, y, eps / 255))


def _zeroth_order_attack(name, model, eps, cfg: AttackConfig) -> PlannedAttack:
    params = {"eps": eps, "steps": cfg.zo_steps, "step_size": cfg.zo_step_size, "sigma": cfg.zo_sigma,
              "samples": cfg.zo_samples, "max_batch": cfg.zo_max_batch, "start": "zero"}
    if cfg.zo_examples is not None:
        params["examples"] = cfg.zo_examples
    return PlannedAttack(name, eps, params, lambda x, y, g, s: zeroth_order(
        model, x, y, eps / 255, steps=cfg.zo_steps, step_size=cfg.zo_step_size / 255, sigma=cfg.zo_sigma / 255,
        samples=cfg.zo_samples, max_batch=cfg.zo_max_batch, generator=g), examples=cfg.zo_examples)


def _paper_attacks(model, cfg: AttackConfig, eps: float, step: float, eot: bool,
                   suffix: str = "") -> tuple[list[PlannedAttack], list[CombinedAttack]]:
    """FGSM and PGD from both starts (reported each, and "pgd" as their per-example worst), plus EOT-PGD."""
    steps, restarts = cfg.pgd_steps, cfg.restarts
    plan = [_fgsm_attack(f"fgsm{suffix}", model, eps),
            _pgd_attack(f"pgd_zero{suffix}", model, eps, step, steps, "zero", restarts),
            _pgd_attack(f"pgd_random{suffix}", model, eps, step, steps, "random", restarts)]
    if eot:  # without EOT a randomised defence looks stronger than it is (Athalye et al. 2018)
        plan.append(_pgd_attack(f"eot_pgd{suffix}", model, eps, step, steps, "random", restarts,
                                eot=cfg.eot_samples))
    return plan, [CombinedAttack(f"pgd{suffix}", eps, (f"pgd_zero{suffix}", f"pgd_random{suffix}"))]


def plan_attacks(model: nn.Module, cfg: AttackConfig, traits: "ModelTraits",
                 surrogate: Optional[nn.Module] = None) -> tuple[list, list, list[tuple[float, str]]]:
    """The attacks of ``cfg.suite`` for this model: (attacks to run, combined rows, eps curve as
    ``[(eps, row name)]``). The adaptive attacks (EOT, BPDA) are those ``traits`` calls for."""
    if cfg.suite not in SUITES:
        raise ValueError(f"suite: expected one of {SUITES}, got {cfg.suite!r}")
    if not 0 <= cfg.eps <= 255 or any(not 0 <= e <= 255 for e in list(cfg.extra_eps) + list(cfg.eps_curve)):
        raise ValueError(f"eps, extra_eps and eps_curve are in 0-255 units, got {cfg.eps}, {cfg.extra_eps}, "
                         f"{cfg.eps_curve}")
    eps, step, steps = cfg.eps, cfg.pgd_step_size, cfg.pgd_steps
    ratio = step / eps if eps > 0 else 0.0   # other radii keep the paper's step/eps ratio
    eot = "eot" in traits.adaptive
    plan, combined = _paper_attacks(model, cfg, eps, step, eot)
    for extra in cfg.extra_eps:
        if extra != eps:
            more, rows = _paper_attacks(model, cfg, extra, ratio * extra, eot, f"@{_fmt(extra)}")
            plan += more
            combined += rows
    curve: list[tuple[float, str]] = []
    if cfg.suite == "full":
        whitebox = "eot_pgd" if eot else "pgd"
        version = "rand" if traits.stochastic else "standard"
        subset = list(cfg.autoattack_attacks) or None
        # The rand version's APGD averages as many draws as EOT-PGD does (eot_samples; AutoAttack's own: 20).
        eot_iter = cfg.eot_samples if version == "rand" else None
        plan.append(PlannedAttack(
            "autoattack", eps, {"eps": eps, "version": version, "attacks": subset, "n_iter": cfg.apgd_iters,
                                "square_queries": cfg.square_queries, "eot_iter": eot_iter},
            lambda x, y, g, s: autoattack(model, x, y, eps / 255, version=version, attacks=subset,
                                          n_iter=cfg.apgd_iters, square_queries=cfg.square_queries,
                                          seed=s, batch_size=cfg.batch_size, eot_iter=eot_iter)))
        plan.append(PlannedAttack(
            "square", eps, {"eps": eps, "n_queries": cfg.square_queries},
            lambda x, y, g, s: square(model, x, y, eps / 255, n_queries=cfg.square_queries, seed=s)))
        if surrogate is not None:
            plan.append(PlannedAttack(
                "transfer", eps, {"eps": eps, "step_size": step, "steps": steps, "surrogate": "pgd"},
                lambda x, y, g, s: transfer(surrogate, model, x, y, eps / 255, step / 255, steps, generator=g)))
        if cfg.zo_steps > 0:
            plan.append(_zeroth_order_attack("zeroth_order", model, eps, cfg))
        for mode in ("dense", "soft"):
            if f"bpda_{mode}" in traits.adaptive:
                plan.append(_pgd_attack(f"bpda_{mode}", model, eps, step, steps, "zero", cfg.restarts, bpda=mode,
                                        tau=cfg.bpda_soft_tau))
        plan.append(_pgd_attack("pgd_2x_steps", model, eps, step, 2 * steps, "random", cfg.restarts))
        plan.append(_pgd_attack("pgd_2x_restarts", model, eps, step, steps, "random", 2 * cfg.restarts))
        names = {a.name for a in plan} | {c.name for c in combined}
        for point in sorted(set(cfg.eps_curve) | {eps}):
            if point == 0:
                curve.append((0.0, "clean"))
            elif point == eps:
                curve.append((point, whitebox))
            else:  # one start per curve point: the zero start (EOT: the random one, as above)
                name = f"{'eot_pgd' if eot else 'pgd_zero'}@{_fmt(point)}"
                if name not in names:
                    plan.append(_pgd_attack(name, model, point, ratio * point, steps, "random" if eot else "zero",
                                            cfg.restarts, eot=cfg.eot_samples if eot else 1))
                curve.append((point, name))
    unknown = sorted(set(cfg.cascade_attacks) - set(CASCADABLE))
    if unknown:
        raise ValueError(f"cascade_attacks: expected names among {CASCADABLE}, got {unknown}")
    for attack in plan:
        attack.cascade = attack.name in cfg.cascade_attacks and attack.eps == eps
    # Cascaded attacks run last, once the survivors of every CASCADE_BASE attack are known.
    plan.sort(key=lambda attack: attack.cascade)
    return plan, combined, curve


@dataclass(frozen=True)
class ModelTraits:
    stochastic: bool
    routing: bool
    adaptive: tuple   # the adaptive attacks the model calls for: "eot", "bpda_dense", "bpda_soft", "zeroth_order"


def model_traits(model: nn.Module, x_probe: torch.Tensor) -> ModelTraits:
    """What the model is, for the attack plan, from the defence registry (:mod:`topkconv.defenses`); a forward
    pass that is random on ``x_probe`` counts as stochastic (and calls for EOT) whatever its layers."""
    from . import defenses

    routing, stochastic = defenses.has_routing(model), defenses.is_stochastic(model)
    adaptive = tuple(defenses.adaptive_attacks(model))
    if not stochastic and x_probe.numel():
        stochastic = randomness(model, x_probe, passes=2)["verdict"] == "flag"
    if stochastic and "eot" not in adaptive:
        adaptive += ("eot",)
    return ModelTraits(stochastic, routing, adaptive)


def _seed(base: int, chunk: int, name: str) -> int:
    return zlib.crc32(f"{base}/{chunk}/{name}".encode()) & 0x7FFFFFFF


def _world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _examples_in_chunk(attack: PlannedAttack, size: int, offset: int) -> int:
    """How many examples of a chunk of ``size`` starting at ``offset`` lie before ``attack.examples``."""
    return size if attack.examples is None else max(0, min(size, attack.examples - offset))


def _run_on_first(attack: PlannedAttack, xs, ys, offset: int, generator, seed) -> torch.Tensor:
    """The attack on a chunk starting at example ``offset``; with ``attack.examples`` only the examples
    before that index are attacked, the others returned as they are."""
    take = _examples_in_chunk(attack, len(xs), offset)
    if take == len(xs):
        return attack.run(xs, ys, generator, seed)
    x_adv = xs.clone()
    if take:
        x_adv[:take] = attack.run(xs[:take], ys[:take], generator, seed)
    return x_adv


def _run_on_survivors(model: nn.Module, attack: PlannedAttack, xs, ys, survivors, offset: int, generator, seed,
                      count: int) -> tuple[torch.Tensor, int]:
    """A cascaded attack on the examples of the chunk that ``survivors`` marks (and, with ``attack.examples``,
    only those before that index): its row is robust where the example survived the white-box attacks and
    this one. Unattacked survivors (beyond ``attack.examples``) count as surviving it, as in _run_on_first."""
    limit = _examples_in_chunk(attack, len(xs), offset)
    take = survivors.clone()
    take[limit:] = False
    robust = survivors.clone()
    index = take.nonzero().squeeze(1)
    if index.numel():
        x_adv = attack.run(xs[index], ys[index], generator, seed)
        robust[index] = correct(model, x_adv, ys[index])
    return robust, count + index.numel()


def chunk_order(n_chunks: int, rank: int, world: int) -> list[int]:
    """The chunks rank ``rank`` attacks, in order: r, r + world, ... Results must not depend on it."""
    return list(range(rank, n_chunks, world))


def _all_gather(obj) -> list:
    import torch.distributed as dist

    rank, world = _world()
    if world == 1:
        return [obj]
    gathered = [None] * world
    dist.all_gather_object(gathered, obj)
    return gathered


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: AttackConfig,
             surrogate: Optional[nn.Module] = None, progress: bool = True) -> dict:
    """Run ``cfg.suite`` on ``(x, y)`` (images in [0, 1]) and return the eval.json content.

    The first ``cfg.n_examples`` examples are used when it is set. Under an initialised
    ``torch.distributed`` group every rank must call this with the same arguments; all get the result.
    """
    if cfg.n_examples is not None:
        x, y = x[:cfg.n_examples], y[:cfg.n_examples]
    if x.shape[0] == 0:
        raise ValueError("evaluate: no examples to attack (x is empty)")
    if cfg.batch_size < 1:
        raise ValueError(f"batch_size: expected >= 1, got {cfg.batch_size}")
    started = time.perf_counter()
    device = model_device(model)
    with torch.no_grad(), attack_mode(model):
        num_classes = model(x[:1].to(device)).shape[1]
    traits = model_traits(model, x[:8])
    plan, combined, curve = plan_attacks(model, cfg, traits, surrogate)

    n = x.shape[0]
    chunks = list(range(0, n, cfg.batch_size))
    rank, world = _world()
    mine = chunk_order(len(chunks), rank, world)
    seconds = {attack.name: 0.0 for attack in plan}
    seconds["clean"] = 0.0
    masks: dict[int, dict[str, torch.Tensor]] = {}
    attacked = {attack.name: 0 for attack in plan if attack.cascade}  # examples each cascaded attack ran on
    from tqdm import tqdm

    bar = tqdm(total=len(mine) * (len(plan) + 1), desc="evaluate", unit="attack",
               disable=not progress or rank != 0 or not sys.stderr.isatty())
    for index in mine:
        xs = x[chunks[index]:chunks[index] + cfg.batch_size].to(device)
        ys = y[chunks[index]:chunks[index] + cfg.batch_size].to(device)
        tic = time.perf_counter()
        with seeded(model, _seed(cfg.seed, index, "clean")):
            clean = correct(model, xs, ys)
        _sync(device)
        seconds["clean"] += time.perf_counter() - tic
        result = {"clean": clean.cpu()}
        bar.update()
        survivors = clean.clone()  # robust to every CASCADE_BASE attack at cfg.eps so far
        for attack in plan:
            bar.set_postfix_str(attack.name)
            tic = time.perf_counter()
            seed = _seed(cfg.seed, index, attack.name)
            with seeded(model, seed) as generator:
                if attack.cascade:
                    robust, attacked[attack.name] = _run_on_survivors(model, attack, xs, ys, survivors, chunks[index],
                                                                      generator, seed, attacked[attack.name])
                else:
                    x_adv = _run_on_first(attack, xs, ys, chunks[index], generator, seed)
                    robust = correct(model, x_adv, ys) & clean
            _sync(device)
            seconds[attack.name] += time.perf_counter() - tic
            if attack.name in CASCADE_BASE and attack.eps == cfg.eps:
                survivors &= robust
            result[attack.name] = robust.cpu()
            bar.update()
        masks[index] = result
    bar.close()

    # The indicators that need the model run on the first examples, on rank 0; the others get its result.
    measured = (measure_indicators(model, x, y, cfg, traits, surrogate)
                if cfg.suite == "full" and rank == 0 else {})
    mine_attacked, attacked = attacked, dict.fromkeys(attacked, 0)
    for part in _all_gather({"masks": masks, "seconds": seconds, "indicators": measured, "attacked": mine_attacked}):
        masks.update(part["masks"])
        measured = measured or part["indicators"]
        for name, count in part["attacked"].items():
            attacked[name] += count
        for name, value in part["seconds"].items():  # ranks run side by side: the slowest sets the time
            seconds[name] = max(seconds[name], value)
    merged = {name: torch.cat([masks[i][name] for i in range(len(chunks))])
              for name in ["clean"] + [a.name for a in plan]}
    eps_of = {a.name: a.eps for a in plan}
    attacks = {a.name: {"params": a.params} for a in plan}
    cascaded = [a.name for a in plan if a.cascade]
    if cascaded:  # the reference the cascaded rows are read against: every CASCADE_BASE attack at eps
        base = tuple(a.name for a in plan if a.name in CASCADE_BASE and a.eps == cfg.eps)
        combined = combined + [CombinedAttack("whitebox", cfg.eps, base)]
    for row in combined:
        merged[row.name] = torch.stack([merged[part] for part in row.parts]).all(0)
        seconds[row.name] = sum(seconds[part] for part in row.parts)
        eps_of[row.name] = row.eps
        attacks[row.name] = {"params": {"eps": row.eps, "worst_of": list(row.parts)}}
    acc = {name: mask.sum().item() / n for name, mask in merged.items()}  # exact counts, in double
    for name in cascaded:
        attacks[name]["params"]["cascade"] = {"after": list(base),
                                              "n_attacked": attacked[name],
                                              "broke": round((acc["whitebox"] - acc[name]) * n)}
    for name, entry in attacks.items():
        entry.update(accuracy=acc[name], n=n, seconds=seconds[name])
    # An attack run on the first m examples only is compared with the others on those m examples.
    subsets = {}
    for attack in plan:
        if attack.examples is not None and attack.examples < n:
            m = attack.examples
            subset = {name: mask[:m].sum().item() / m for name, mask in merged.items()}
            attacks[attack.name]["accuracy_on_attacked"] = subset[attack.name]
            attacks[attack.name]["n_attacked"] = m
            subsets[attack.name] = (subset, m)

    worst_cases = []
    for eps in sorted(set(eps_of.values())):
        names = [a.name for a in plan if a.eps == eps]
        worst = merged["clean"].clone()
        for name in names:
            worst &= merged[name]
        merged[f"worst_case@{_fmt(eps)}"] = worst
        worst_cases.append({"eps": eps, "accuracy": worst.sum().item() / n, "attacks": names, "n": n})
    main_worst = next(w for w in worst_cases if w["eps"] == cfg.eps)
    merged["worst_case"] = merged[f"worst_case@{_fmt(cfg.eps)}"]
    # Per example, "1" = classified correctly (clean) or robust, in the order of x: what paired statistics
    # over seeds and examples (topkconv.reproduce) resample.
    per_example = {name: "".join("1" if bit else "0" for bit in mask.tolist()) for name, mask in merged.items()}
    eps_curve = [{"eps": eps, "accuracy": acc[name], "attack": name} for eps, name in curve]
    whitebox = "eot_pgd" if "eot" in traits.adaptive else "pgd"
    # A cascaded row holds "white-box and this attack": it is judged against the white-box worst case, so that
    # it counts only what the attack broke beyond every white-box gradient attack.
    bpda_cascaded = any(name.startswith("bpda_") for name in cascaded)
    checks = masking_checks(acc, n, num_classes, eps_curve, routing=traits.routing,
                            whitebox="whitebox" if cascaded else whitebox,
                            bpda_reference="whitebox" if bpda_cascaded else "pgd", outcomes=merged)
    if cfg.suite == "paper":
        # Only check 1 has its numbers in the paper suite; say so rather than leave the others blank.
        for name, check in checks.items():
            if check["verdict"] == "n/a" and name != "bpda_not_stronger":
                check["reason"] = "not run in the paper suite; use --suite full"
    at_eps = {name: value for name, value in acc.items() if eps_of.get(name) == cfg.eps}
    found = dict(measured)
    if cfg.suite == "full":
        white = [name for name in at_eps if name not in NOT_STRONGER_THAN_WHITEBOX]
        found["square_beats_whitebox"] = square_beats_whitebox(at_eps, white, n)
    found.update(checks)
    return {
        "units": "eps and step sizes in 0-255 units; accuracies are fractions of n",
        "suite": cfg.suite,
        "n": n,
        "n_examples": n,
        "seed": cfg.seed,
        "clean": acc["clean"],
        "attacks": attacks,
        "worst_case": main_worst,
        "worst_cases": worst_cases,
        "verdict": verdict(at_eps, found, ["pgd", "eot_pgd"], n, subsets, cascaded=cascaded, outcomes=merged),
        "indicators": found,
        "indicator_examples": min(n, cfg.indicator_examples) if cfg.suite == "full" else 0,
        "masking_checks": checks,
        "eps_curve": eps_curve,
        "per_example": per_example,
        "model": {"stochastic": traits.stochastic, "routing": traits.routing, "num_classes": num_classes,
                  "adaptive_attacks": list(traits.adaptive)},
        "config": dataclasses.asdict(cfg),
        "timings": {"total_seconds": time.perf_counter() - started, "clean_seconds": seconds["clean"],
                    "world_size": world, "device": str(device)},
    }


def measure_indicators(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: AttackConfig,
                       traits: ModelTraits, surrogate: Optional[nn.Module] = None) -> dict:
    """The indicators that run the model, on the first ``cfg.indicator_examples`` examples, each seeded
    and timed (``seconds``); see :mod:`topkconv.attacks.indicators`."""
    m = min(x.shape[0], cfg.indicator_examples)
    device = model_device(model)
    xi, yi = x[:m].to(device), y[:m].to(device)
    eps, steps = cfg.eps / 255, cfg.indicator_steps
    step = 2.5 * eps / max(steps, 1)   # Madry et al.'s rule: 2.5 x eps of travel over the steps

    def traced_pgd(xs, ys, trace):
        return pgd(model, xs, ys, eps, step, steps, start="zero", loss="margin", trace=trace)

    runs: dict = {}

    def traced(kind):
        if "run" not in runs:
            runs["run"] = run_traced(model, traced_pgd, xi, yi)
        return kind(runs["run"])

    def transferred(g):
        if surrogate is None:
            return not_applicable("needs a surrogate (--surrogate)")
        x_adv = transfer(surrogate, model, xi, yi, eps, cfg.pgd_step_size / 255, cfg.pgd_steps, generator=g)
        return transfer_failure(model, surrogate, xi, yi, x_adv)

    draws, batch = cfg.indicator_draws, cfg.zo_max_batch
    measures = {
        "unavailable_gradients": lambda g: unavailable_gradients(model, xi, yi),
        "unstable_predictions": lambda g: unstable_predictions(model, xi, yi, 8 / 255, draws, batch, g),
        "silent_success": lambda g: traced(silent_success),
        "incomplete_optimisation": lambda g: traced(incomplete_optimisation),
        "transfer_failure": transferred,
        "unconstrained_failure": lambda g: unconstrained_failure(model, xi, yi, steps, g),
        "randomness": lambda g: randomness(model, xi),
        "zero_gradient_at_start": lambda g: zero_gradient_at_start(model, xi, yi, eps, g),
        "selection_flip_rate": lambda g: selection_flip_rate(model, xi, 1 / 255, 4, g),
        "gradient_agreement": lambda g: gradient_agreement(model, xi, yi, 1 / 255, draws, batch, g),
    }
    found = {}
    for name, measure in measures.items():
        tic = time.perf_counter()
        with seeded(model, _seed(cfg.seed, -1, name)) as generator:
            found[name] = measure(generator)
        _sync(device)
        found[name]["seconds"] = time.perf_counter() - tic
    return found


def plot_accuracy_vs_eps(result: dict, title: str = "") -> bytes:
    """PNG bytes: accuracy against eps (the curve, or the PGD points of the paper suite), with chance."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [(p["eps"], p["accuracy"]) for p in result["eps_curve"]]
    label = "white-box PGD" + (" (EOT)" if result["model"]["stochastic"] else "")
    if not points:
        points = [(0.0, result["clean"])] + sorted(
            (a["params"]["eps"], a["accuracy"]) for name, a in result["attacks"].items()
            if name == "pgd" or name.startswith("pgd@"))
        label = "PGD"
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
    ax.plot([p[0] for p in points], [p[1] for p in points], "o-", label=label)
    eps = result["worst_case"]["eps"]
    for name in ("fgsm", "autoattack", "square", "transfer", "zeroth_order", "bpda_dense", "bpda_soft"):
        if name in result["attacks"]:
            ax.plot([eps], [result["attacks"][name]["accuracy"]], "x", label=name)
    ax.plot([eps], [result["worst_case"]["accuracy"]], "k*", label="worst case")
    ax.axhline(1.0 / result["model"]["num_classes"], color="grey", ls="--", lw=1, label="chance")
    ax.set_xlabel("eps (0-255 units)")
    ax.set_ylabel("accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(title or f"accuracy vs eps (n = {result['n']})", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def plot_path(out: Path) -> Path:
    """acc-vs-eps.png beside eval.json; ``<stem>-acc-vs-eps.png`` beside any other name, so two suites
    written to one folder keep their own plots."""
    out = Path(out)
    return out.parent / (PLOT_FILE if out.name == EVAL_FILE else f"{out.stem}-{PLOT_FILE}")


def write_results(result: dict, out: Path, title: str = "") -> None:
    """``out`` (eval.json), its Markdown (the same name with ``.md``: the verdict line first, then every
    attack and indicator) and its accuracy-vs-eps plot (:func:`plot_path`), each atomically."""
    from .io import atomic_write_bytes, atomic_write_json, atomic_write_text
    from .report import render_evaluation

    out = Path(out)
    atomic_write_json(out, result)
    atomic_write_text(out.with_suffix(".md"), render_evaluation(result, title))
    atomic_write_bytes(plot_path(out), plot_accuracy_vs_eps(result, title))


def evaluate_run(run_dir, suite: str = "paper", surrogate_dir=None, n_examples: Optional[int] = None,
                 eps: Optional[float] = None, out=None, overrides: Optional[dict] = None,
                 device: str = "auto", progress: bool = True, allow_unfinished: bool = False) -> dict:
    """Evaluate the checkpoint in ``run_dir``; write ``eval.json`` (or ``out``) and ``acc-vs-eps.png`` beside it.

    ``allow_unfinished`` evaluates the last finished epoch of a run that stopped early.

    The attack settings are the run's ``spec.attack`` with ``suite``, ``n_examples``, ``eps`` and any
    ``overrides`` (AttackConfig field names) applied. Under ``torchrun`` the ranks share the work and rank 0
    writes the files.
    """
    from . import distributed
    from .checkpoint import load_checkpoint
    from .data import load_data
    from .io import environment_info

    ctx = distributed.setup(device)
    try:
        model, spec = load_checkpoint(run_dir, allow_unfinished=allow_unfinished)
        model.to(ctx.device)
        changes = dict(overrides or {}, suite=suite)
        if n_examples is not None:
            changes["n_examples"] = n_examples
        if eps is not None:
            changes["eps"] = float(eps)
        unknown = set(changes) - {f.name for f in dataclasses.fields(AttackConfig)}
        if unknown:
            raise ValueError(f"overrides: unknown AttackConfig fields {sorted(unknown)}")
        cfg = dataclasses.replace(spec.attack, **changes)
        x, y = load_data(spec.data).test_tensors(limit=cfg.n_examples)
        surrogate = None
        if surrogate_dir is not None:
            surrogate = load_checkpoint(surrogate_dir)[0].to(ctx.device)
        result = evaluate(model, x, y, cfg, surrogate=surrogate, progress=progress)
        result["run"] = {"dir": str(Path(run_dir)), "name": spec.name, "hash": spec.hash(),
                         "surrogate": str(surrogate_dir) if surrogate_dir is not None else None}
        result["env"] = environment_info()
        if ctx.is_main:
            path = Path(out) if out is not None else _run_folder(run_dir) / EVAL_FILE
            write_results(result, path, title=f"{spec.name} ({cfg.suite} suite, n = {result['n']})")
        distributed.barrier(ctx)
        return result
    finally:
        distributed.teardown(ctx)


def evaluate_user_model(factory: str, weights, data, cfg: AttackConfig, out=None, surrogate_dir=None,
                        device: str = "auto", progress: bool = True) -> dict:
    """Evaluate a model from the user's own code: ``factory`` (``"package.module:factory"`` or
    ``"file.py:factory"``) builds it, ``weights`` (a safetensors file, never a pickle) fills it, and it is
    attacked on the test split of ``data`` (a :class:`~topkconv.config.DataConfig`) with ``cfg``; the result
    goes to ``out`` (eval.json and its plot) when given. The model takes images in [0, 1] (normalisation
    inside) at ``data.image_size``."""
    from . import distributed
    from .checkpoint import load_checkpoint
    from .data import load_data
    from .io import environment_info
    from .user_model import build_user_model

    ctx = distributed.setup(device)
    try:
        model = build_user_model(factory, weights).to(ctx.device)
        x, y = load_data(data).test_tensors(limit=cfg.n_examples)
        surrogate = load_checkpoint(surrogate_dir)[0].to(ctx.device) if surrogate_dir is not None else None
        result = evaluate(model, x, y, cfg, surrogate=surrogate, progress=progress)
        result["run"] = {"factory": factory, "weights": str(weights), "data": dataclasses.asdict(data),
                         "surrogate": str(surrogate_dir) if surrogate_dir is not None else None}
        result["env"] = environment_info()
        if ctx.is_main and out is not None:
            write_results(result, Path(out), title=f"{factory} ({cfg.suite} suite, n = {result['n']})")
        distributed.barrier(ctx)
        return result
    finally:
        distributed.teardown(ctx)


def _run_folder(path) -> Path:
    path = Path(path)
    return path.parent if path.suffix == ".safetensors" else path
