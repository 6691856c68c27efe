"""Masking indicators that report numbers: each gives a ``value``, the ``threshold`` it was judged against and
a ``verdict`` (``flag``, ``pass`` or ``n/a`` with a ``reason``), plus the details it was decided on.

Sources:

- Pintor et al., "Indicators of Attack Failure: Debugging and Improving Optimization of Adversarial
  Examples" (NeurIPS 2022, code ``pralab/IndicatorsOfAttackFailure``): :func:`unavailable_gradients`,
  :func:`unstable_predictions`, :func:`silent_success`, :func:`incomplete_optimisation`,
  :func:`unconstrained_failure`, and their transfer failure on a routing model's own stand-in models,
  :func:`surrogate_transfer_failure`.
- Athalye, Carlini and Wagner 2018 (sec. 3.1) and Carlini et al. 2019: transfer from an undefended baseline
  must not beat the white-box attacks on the defended model: :func:`baseline_transfer` (named
  ``transfer_failure`` in eval.json files before, when it flagged transfer that merely failed;
  :func:`upgrade_indicator_names` reads those). Pintor's own fifth indicator, "transfer failure", is another
  check, on a surrogate of the *same* defended model: :func:`surrogate_transfer_failure`.
- AutoAttack's automatic flags (Croce and Hein 2020, ``fra31/auto-attack``, ``flags_doc.md``):
  :func:`randomness`, :func:`zero_gradient_at_start`, :func:`square_beats_whitebox`.
- For top-k routing (this project): :func:`selection_flip_rate` and :func:`gradient_agreement`.

The losses are the logit margin (best other logit minus the label's): unlike cross-entropy it does not
underflow to an exactly zero gradient on a confidently classified example, so a zero gradient here really
means that the model cuts or flattens the gradient. :func:`verdict` turns the indicators and the attacks'
accuracies into one line per model.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torch import nn

from ..config import IndicatorConfig
from . import registry
from .common import attack_mode, logit_change, routing_layers
from .gradient import attack_loss, input_gradient
from .masking import ROUNDING, DEFAULTS, not_applicable, paired_test, significant_gap, slack
from .registry import WHITEBOX
from .zeroth_order import estimate_gradient

# An attack for the traced indicators: (x, y, trace: list) -> x_adv, appending {"loss", "fooled"} per iterate.
TracedAttack = Callable[[torch.Tensor, torch.Tensor, list], torch.Tensor]


def flagged(value: float, threshold: float, above: bool = True, **details) -> dict:
    """An indicator result; flagged when ``value`` is above (or, ``above=False``, below) ``threshold``."""
    flag = value > threshold if above else value < threshold
    return {"value": value, "threshold": threshold, "verdict": "flag" if flag else "pass", **details}


def _margin(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """z_y - max_{j != y} z_j (positive when correct)."""
    return -attack_loss(model(x), y, "margin")


# ---------------------------------------------------------------- Pintor et al.'s six

def _zero_gradient_share(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, Optional[str]]:
    try:
        grad, _ = input_gradient(model, x, y, loss="margin")
    except Exception as error:  # noqa: BLE001 - a gradient call that fails is exactly what is reported
        return 1.0, f"{type(error).__name__}: {error}"
    flat = grad.flatten(1)
    unavailable = (flat.abs().sum(1) == 0) | ~torch.isfinite(flat).all(1)
    return unavailable.float().mean().item(), None


def unavailable_gradients(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict:
    """Pintor's first indicator: the share of examples whose input gradient at the clean point is all zero or
    not finite (1.0 when the gradient call fails). Any such example is a flag."""
    with attack_mode(model) as device:
        share, error = _zero_gradient_share(model, x.to(device), y.to(device))
    return flagged(share, 0.0, **({"error": error} if error else {}))


def unstable_predictions(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                         radius: float = DEFAULTS.unstable_radius / 255, draws: int = DEFAULTS.draws,
                         max_batch: int = 1024, generator: Optional[torch.Generator] = None,
                         threshold: float = DEFAULTS.unstable_threshold) -> dict:
    """Pintor's second indicator: over ``draws`` uniform perturbations in [-r/2, r/2], the mean of
    |L(x) - L(x + delta)| / |L(x)| (capped at 1), averaged over examples; L is the logit margin."""
    changes = []
    with attack_mode(model) as device, torch.inference_mode():
        gen_device = generator.device if generator is not None else device
        per_call = max(1, max_batch // draws)   # examples per forward call, each repeated ``draws`` times
        for i in range(0, x.shape[0], per_call):
            xs, ys = x[i:i + per_call].to(device), y[i:i + per_call].to(device)
            base = _margin(model, xs, ys)
            repeated = xs.repeat_interleave(draws, 0)
            noise = torch.rand(repeated.shape, generator=generator, device=gen_device, dtype=x.dtype).to(device)
            noisy = _margin(model, repeated + (noise - 0.5) * radius, ys.repeat_interleave(draws, 0))
            relative = (noisy.view(-1, draws) - base[:, None]).abs() / base.abs().clamp_min(1e-12)[:, None]
            changes.append(relative.clamp(max=1.0))
    return flagged(torch.cat(changes).mean().item(), threshold, radius=radius * 255, draws=draws)


def run_traced(model: nn.Module, attack: TracedAttack, x: torch.Tensor, y: torch.Tensor) -> dict:
    """Run ``attack`` with a trace: ``{"loss": (T, B), "fooled": (T, B), "returned_fooled": (B,)}``."""
    trace: list = []
    with attack_mode(model) as device:
        x_adv = attack(x.to(device), y.to(device), trace)
        with torch.no_grad():
            returned = model(x_adv.to(device)).argmax(1).cpu() != y.cpu()
    if not trace:
        raise ValueError("the traced attack recorded no iterate (pass the trace list on to the attack)")
    return {"loss": torch.stack([t["loss"] for t in trace]), "fooled": torch.stack([t["fooled"] for t in trace]),
            "returned_fooled": returned}


def _silent(run: dict) -> torch.Tensor:
    """Per example: some point of the attack's path was adversarial but the returned point is not."""
    return run["fooled"].any(0) & ~run["returned_fooled"]


def _still_moving(run: dict, window: int, tolerance: float) -> torch.Tensor:
    """Per example (False for one the attack fooled, which is finished): the loss trace rescaled to [0, 1],
    its best-so-far value rose by more than ``tolerance`` over the last ``window`` steps (Pintor et al.'s
    ``incomplete_optimization_indicator``)."""
    trace, open_ = run["loss"].double(), ~run["fooled"].any(0)
    low, high = trace.min(0).values, trace.max(0).values
    scaled = (trace - low) / (high - low).where(high > low, torch.ones_like(high))
    best = torch.cummax(scaled, 0).values
    start = max(0, best.shape[0] - 1 - window)
    return open_ & ((best[-1] - best[start]) > tolerance)


def silent_success(run: dict) -> dict:
    """Pintor's third indicator: the share of examples for which some point of the attack's path was
    adversarial but the returned point is not. Any such example is a flag (the attack returns the wrong point)."""
    silent = _silent(run)
    return flagged(silent.float().mean().item(), 0.0, examples=int(silent.sum()))


def incomplete_optimisation(run: dict, window: int = DEFAULTS.incomplete_window,
                            tolerance: float = DEFAULTS.incomplete_tolerance,
                            threshold: float = DEFAULTS.incomplete_threshold) -> dict:
    """Pintor's fourth indicator: per example the loss trace is rescaled to [0, 1] and its best-so-far value
    taken; the example is still moving when that rose by more than ``tolerance`` over the last ``window``
    steps. The value is the share of still-moving examples among those the attack never fooled (a fooled
    example is finished); flagged above ``threshold``."""
    open_ = ~run["fooled"].any(0)
    moving = _still_moving(run, window, tolerance)[open_]
    return flagged(moving.float().mean().item() if open_.any() else 0.0, threshold, window=window,
                   tolerance=tolerance, examples=int(open_.sum()), steps=int(run["loss"].shape[0] - 1))


def _per_attack(traces: dict, examples: int, settings: IndicatorConfig) -> dict:
    """Per traced attack, over its runs on the first ``examples`` examples: the per-example silent and
    still-moving masks with the examples' indices, and its own shares (Pintor's per-attack numbers)."""
    found = {}
    for name, records in traces.items():
        keep = [record["index"] < examples for record in records]
        runs = [{key: (value[..., mask]) for key, value in record.items()} for record, mask in zip(records, keep)
                if mask.any()]
        if not runs:
            continue
        silent = torch.cat([_silent(run) for run in runs])
        moving = torch.cat([_still_moving(run, settings.incomplete_window, settings.incomplete_tolerance)
                            for run in runs])
        open_ = torch.cat([~run["fooled"].any(0) for run in runs])
        found[name] = {"index": torch.cat([run["index"] for run in runs]), "silent": silent, "moving": moving,
                       "shares": {"silent_success": silent.double().mean().item(),
                                  "incomplete_optimisation": moving[open_].double().mean().item() if open_.any()
                                  else 0.0, "examples": int(silent.numel()),
                                  "steps": max(int(run["loss"].shape[0]) - 1 for run in runs)}}
    return found


def reported_attack_traces(traces: dict, worst_robust: torch.Tensor, examples: int,
                           settings: IndicatorConfig = DEFAULTS) -> dict:
    """Silent success and incomplete optimisation (Pintor et al. 2022) on the loss traces of the attacks an
    evaluation reports at its main eps (``traces``: row -> the records of :func:`.evaluate.run`'s runs: PGD and
    its variants, EOT-PGD, the BPDA stand-ins, the zeroth-order attack; AutoAttack and Square keep none), on
    the first ``examples`` examples, read against the per-example worst case ``worst_robust``.

    Each attack's own shares are in ``per_attack``. The verdicts are about the worst case, which is what the
    evaluation reports as robust: an example counts as a silent success when some attack's path was
    adversarial but the worst case still counts it robust (the evaluation lost an adversarial example it had
    found), and as incomplete when the worst case counts it robust and every traced attack on it was still
    moving (if one had settled, more steps of the others are not what it needs). Examples that only untraced
    attacks would have settled count too, so the value can only overstate."""
    per_attack = _per_attack(traces, examples, settings)
    if not per_attack:
        return dict.fromkeys(("silent_success", "incomplete_optimisation"),
                             not_applicable("no attack at the main eps kept a loss trace on the first examples"))
    traced_by, moving_in = torch.zeros(examples, dtype=torch.long), torch.zeros(examples, dtype=torch.long)
    silent_in = torch.zeros(examples, dtype=torch.bool)
    for found in per_attack.values():
        traced_by[found["index"]] += 1
        moving_in[found["index"]] += found["moving"].long()
        silent_in[found["index"]] |= found["silent"]
    traced, robust = traced_by > 0, torch.as_tensor(worst_robust[:examples]).bool().cpu()
    lost, considered = silent_in & robust, robust & traced
    incomplete = considered & (moving_in == traced_by)
    shares = {name: found["shares"] for name, found in per_attack.items()}
    share = incomplete.double().sum().item() / max(int(considered.sum()), 1)
    return {"silent_success": flagged(lost.double().sum().item() / int(traced.sum()), 0.0, examples=int(lost.sum()),
                                      traced_examples=int(traced.sum()), per_attack=shares),
            "incomplete_optimisation": flagged(share, settings.incomplete_threshold,
                                               window=settings.incomplete_window,
                                               tolerance=settings.incomplete_tolerance,
                                               examples=int(considered.sum()), per_attack=shares)}


# Indicators renamed since earlier eval.json files: old name -> name.
RENAMED = {"transfer_failure": "baseline_transfer"}


def upgrade_indicator_names(result):
    """An eval.json (or any part of one) with the indicators of earlier versions under their current names
    (:data:`RENAMED`), in place and returned; every ``indicators`` table, however deep, is renamed."""
    if isinstance(result, dict):
        table = result.get("indicators")
        if isinstance(table, dict) and set(table) & set(RENAMED):
            result["indicators"] = {RENAMED.get(name, name): value for name, value in table.items()}
        for value in result.values():
            upgrade_indicator_names(value)
    elif isinstance(result, list):
        for value in result:
            upgrade_indicator_names(value)
    return result


def _robust_on(model: nn.Module, x: torch.Tensor, y: torch.Tensor, x_adv: torch.Tensor) -> torch.Tensor:
    """Per example: classified correctly both clean and at ``x_adv`` (the project's "robust"), on the CPU."""
    with torch.inference_mode(), attack_mode(model) as device:
        y = y.to(device)
        return ((model(x.to(device)).argmax(1) == y) & (model(x_adv.to(device)).argmax(1) == y)).cpu()


def baseline_transfer(model: nn.Module, surrogate: nn.Module, x: torch.Tensor, y: torch.Tensor,
                      x_adv: torch.Tensor, x_whitebox: torch.Tensor, alpha: float = DEFAULTS.alpha,
                      slack_points: float = DEFAULTS.slack_points) -> dict:
    """Transfer from an undefended baseline ``surrogate`` is not stronger than a white-box attack on the
    target: ``x_adv`` (crafted on the surrogate) against ``x_whitebox`` (crafted on the model by a white-box
    attack), on the same examples.

    Athalye et al. 2018 (sec. 3.1, "black-box attacks are better than white-box attacks") and Carlini et al.
    2019 (the checklist: transfer and black-box attacks must not beat white-box ones) read masking from
    transfer that *succeeds where white-box attacks fail*. Transfer that merely fails is no such sign: it
    fails on a genuinely robust model too (measured: on the digits CNN adversarially trained at 32/255, 0.93
    of the surrogate's successes failed on it while PGD left it 0.63). So the value is the white-box accuracy
    minus the transfer accuracy, and it flags, as the masking checks do, only when that gap exceeds
    max(1 point, 1 example) *and* the exact sign test on the examples the two disagree on gives p < alpha
    (both ran on every example, so the test can fail both ways). The share of the surrogate's successes that
    fail on the model (this check's value before) is kept as ``surrogate_successes_failing``."""
    transfer_robust, whitebox_robust = _robust_on(model, x, y, x_adv), _robust_on(model, x, y, x_whitebox)
    with torch.inference_mode(), attack_mode(surrogate) as s_device:
        y_s = y.to(s_device)
        on_surrogate = ((surrogate(x.to(s_device)).argmax(1) == y_s)
                        & (surrogate(x_adv.to(s_device)).argmax(1) != y_s)).cpu()
    successes = on_surrogate & _robust_on(model, x, y, x)
    failing = (successes & transfer_robust).sum().item() / max(int(successes.sum()), 1)
    test = paired_test({"whitebox": whitebox_robust, "transfer": transfer_robust}, "whitebox", "transfer",
                       alpha=alpha)
    n = x.shape[0]
    gap = (whitebox_robust.sum().item() - transfer_robust.sum().item()) / n
    tolerance = slack(n, slack_points)
    stronger = significant_gap(gap > tolerance + ROUNDING, test)
    return {"value": gap, "threshold": tolerance, "verdict": "flag" if stronger else "pass",
            "whitebox_accuracy": whitebox_robust.double().mean().item(),
            "transfer_accuracy": transfer_robust.double().mean().item(), "paired_test": test,
            "surrogate_successes": int(successes.sum()), "surrogate_successes_failing": failing}


def unconstrained_failure(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int = DEFAULTS.steps,
                          generator: Optional[torch.Generator] = None,
                          slack_points: float = DEFAULTS.slack_points) -> dict:
    """Pintor's sixth indicator: the share of examples an attack with unbounded eps (the whole [0, 1] box)
    still fails on; it should be 0. PGD from the clean point on the margin loss, step 2 / ``steps``."""
    from .pgd import pgd

    x_adv = pgd(model, x, y, 1.0, 2.0 / max(steps, 1), steps, start="zero", loss="margin", generator=generator)
    with torch.inference_mode(), attack_mode(model) as device:
        survived = (model(x_adv.to(device)).argmax(1) == y.to(device)).float().mean().item()
    return flagged(survived, slack(x.shape[0], slack_points), steps=steps)


# An attack point counts as within eps up to float rounding of the projection.
WITHIN_EPS_TOLERANCE = 1e-6


def _stand_in_counts(model: nn.Module, within: Callable, x: torch.Tensor, y: torch.Tensor, x_adv: torch.Tensor,
                     eps: float, target_clean: torch.Tensor) -> dict:
    """For one stand-in model (``model`` inside ``within()``): ``successes``, the examples both models classify
    correctly clean whose attack point ``x_adv``, within ``eps``, fools the stand-in model; ``failing``, those of
    them the real model still classifies correctly at ``x_adv``; ``clean_disagreements``, the clean examples the
    two classify differently (right and wrong), which the attack had no work to do on. ``target_clean``: where
    the real model classifies ``x`` correctly (one forward pass serves every stand-in)."""
    with torch.no_grad(), attack_mode(model) as device:
        x, y, x_adv, target_clean = x.to(device), y.to(device), x_adv.to(device), target_clean.to(device)
        with within():
            surrogate_clean, surrogate_adv = model(x).argmax(1) == y, model(x_adv).argmax(1) == y
        target_adv = model(x_adv).argmax(1) == y
        inside = (x_adv - x).abs().flatten(1).amax(1) <= eps + WITHIN_EPS_TOLERANCE
    successes = surrogate_clean & target_clean & inside & ~surrogate_adv
    return {"successes": int(successes.sum()), "failing": int((successes & target_adv).sum()),
            "clean_disagreements": int((surrogate_clean != target_clean).sum())}


def surrogate_transfer_failure(model: nn.Module, stand_ins: dict, x: torch.Tensor, y: torch.Tensor, eps: float,
                               threshold: float = DEFAULTS.surrogate_transfer_threshold) -> dict:
    """Pintor's fifth indicator, transfer failure, on surrogates of the same defended model: a routing model's
    stand-in models (:func:`.bpda.stand_in_model`: every routing layer dense, or its soft relaxation, in the
    forward pass too). ``stand_ins`` maps a BPDA attack's name to ``(within, x_adv)``: ``within()`` a context
    in which ``model`` is that stand-in model, ``x_adv`` the final points of the attack run on it.

    Per stand-in, of the examples whose point fools the stand-in model within ``eps`` (both classified correctly
    clean), the share the real model still classifies correctly. The value is the smallest share over the
    stand-ins that had such examples (the best surrogate, named in ``stand_in``; every one is in
    ``per_stand_in``), flagged above ``threshold``: then no differentiable stand-in predicts the model near the
    data, so attacks through them, or through the model's own piecewise gradient, may fail for that reason and
    not for robustness. One poor stand-in alone is not that (the dense one of a small k differs from the model
    by construction: measured 0.75 on the digits Dynamic-k MLP at 8/255, its soft one 0.0). n/a without a
    stand-in (no routing layer) or when no point fooled one (nothing to transfer)."""
    if not stand_ins:
        return not_applicable("the model has no BPDA stand-in (no routing layer)")
    with torch.no_grad(), attack_mode(model) as device:
        target_clean = model(x.to(device)).argmax(1) == y.to(device)
    counts = {name: _stand_in_counts(model, within, x, y, x_adv, eps, target_clean)
              for name, (within, x_adv) in stand_ins.items()}
    shares = {name: found["failing"] / found["successes"] for name, found in counts.items() if found["successes"]}
    if not shares:
        return dict(not_applicable("no attack point fooled a stand-in model"), per_stand_in=counts)
    best = min(shares, key=shares.get)
    for name, share in shares.items():
        counts[name]["failing_share"] = share
    return flagged(shares[best], threshold, stand_in=best, per_stand_in=counts)


# ---------------------------------------------------------------- AutoAttack's flags

def randomness(model: nn.Module, x: torch.Tensor, passes: int = DEFAULTS.randomness_passes,
               threshold: float = DEFAULTS.randomness_threshold) -> dict:
    """AutoAttack's first flag: ``passes`` forward passes of the same inputs; the value is the largest L2
    change of an example's logits relative to their norm (:func:`.common.logit_change`; flagged above 1e-4)."""
    with torch.inference_mode():
        change = logit_change(model, x, passes)
    return flagged(change, threshold, passes=passes)


def zero_gradient_at_start(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float,
                           generator: Optional[torch.Generator] = None) -> dict:
    """AutoAttack's second flag: the share of examples with an all-zero (or non-finite) input gradient at a
    random start point in the eps-ball, where APGD begins. Any such example is a flag."""
    with attack_mode(model) as device:
        gen_device = generator.device if generator is not None else device
        noise = torch.rand(x.shape, generator=generator, device=gen_device, dtype=x.dtype).to(device)
        start = (x.to(device) + (2 * noise - 1) * eps).clamp(0.0, 1.0)
        share, error = _zero_gradient_share(model, start, y.to(device))
    return flagged(share, 0.0, **({"error": error} if error else {}))


def square_beats_whitebox(acc: dict, whitebox: list, n: int, threshold: float = DEFAULTS.square_threshold,
                          outcomes: Optional[dict] = None, subsets: Optional[dict] = None,
                          alpha: float = DEFAULTS.alpha) -> dict:
    """AutoAttack's third flag: Square (black-box) leaves less accuracy than the white-box attacks.

    AutoAttack (``checks.py``, ``check_square_sr``) flags when Square's robust accuracy lies more than 0.2
    points (absolute) below the other attacks', a threshold sized for its 10,000-example CIFAR-10 runs (20
    examples); it has no noise model, and on 100 examples its floor of one example fired on a genuinely robust
    model. So, like every other gap between two attacks here (:mod:`.masking`), the gap must exceed max(0.2
    points, 1 example) *and* the exact sign test on the per-example ``outcomes`` must give p < ``alpha``.

    The reference is the row Square is read against: the white-box worst case (``whitebox``, a combined row)
    when Square ran on its survivors only (a cascade, as in AutoAttack itself: its test can then only count
    extra breaks, ``one_sided``), else the strongest white-box row, on the first m examples when Square ran
    on those only (``subsets``)."""
    table, size = (subsets or {}).get("square", (acc, n))
    present = [name for name in whitebox if name in table]
    if "square" not in table or not present:
        return not_applicable("needs square and a white-box attack (full suite)")
    reference = WHITEBOX if WHITEBOX in present else min(present, key=lambda name: table[name])
    first = {name: mask[:size] for name, mask in outcomes.items()} if outcomes else None
    test = paired_test(first, reference, "square", alpha=alpha)
    gap, tolerance = table[reference] - table["square"], slack(size, threshold)
    stronger = significant_gap(gap > tolerance + ROUNDING, test)
    return {"value": gap, "threshold": tolerance, "verdict": "flag" if stronger else "pass",
            "square": table["square"], "whitebox": reference, "whitebox_accuracy": table[reference],
            "paired_test": test, "one_sided": reference == WHITEBOX, "n": size}


# ---------------------------------------------------------------- routing

def _selections(model: nn.Module, layers: list, x: torch.Tensor) -> list[torch.Tensor]:
    """Each routing layer's (example, output) selection for input ``x``: which inputs it routes."""
    inputs: dict[int, torch.Tensor] = {}
    hooks = [module.register_forward_pre_hook(lambda m, args, i=i: inputs.__setitem__(i, args[0].detach()))
             for i, (_, module) in enumerate(layers)]
    try:
        model(x)
    finally:
        for hook in hooks:
            hook.remove()
    masks = []
    for i, (_, module) in enumerate(layers):
        mask = module.selection_mask(inputs[i])
        masks.append(mask.flatten(2) if mask.dim() > 2 else mask.unsqueeze(-1))
    return masks


def selection_flip_rate(model: nn.Module, x: torch.Tensor, radius: float = DEFAULTS.flip_radius / 255,
                        draws: int = DEFAULTS.flip_draws, generator: Optional[torch.Generator] = None,
                        threshold: float = DEFAULTS.flip_threshold) -> dict:
    """For each routing layer, the share of (example, output) selections that change under uniform input
    noise in [-radius, radius] (averaged over ``draws``); the value is the largest layer's. High flip rates
    mean a discontinuous forward pass, k-WTA's failure mode (Tramer et al. 2020)."""
    layers = routing_layers(model)
    if not layers:
        return not_applicable("the model has no routing layer with selection_mask()")
    with torch.inference_mode(), attack_mode(model) as device:
        x = x.to(device)
        clean = _selections(model, layers, x)
        flips = torch.zeros(len(layers), dtype=torch.float64)
        gen_device = generator.device if generator is not None else device
        for _ in range(draws):
            noise = torch.rand(x.shape, generator=generator, device=gen_device, dtype=x.dtype).to(device)
            noisy = _selections(model, layers, (x + (2 * noise - 1) * radius).clamp(0.0, 1.0))
            for i, (a, b) in enumerate(zip(clean, noisy)):
                flips[i] += (a != b).any(-1).double().mean().item() / draws
    per_layer = {name: flips[i].item() for i, (name, _) in enumerate(layers)}
    return flagged(max(per_layer.values()), threshold, per_layer=per_layer, radius=radius * 255, draws=draws)


def gradient_agreement(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                       sigma: float = DEFAULTS.agreement_sigma / 255, samples: int = 200, max_batch: int = 1024,
                       generator: Optional[torch.Generator] = None,
                       fraction: float = DEFAULTS.agreement_fraction) -> dict:
    """The median over examples of the cosine between the autograd input gradient of the margin loss and
    its paired Gaussian finite-difference estimate at scale ``sigma`` with ``samples`` pairs.

    Even for a perfectly smooth loss a finite sample gives a cosine below 1: about sqrt(N / (N + d + 1)) for
    N pairs in d input dimensions. The threshold is half of that; below it the gradient does not describe
    the loss (a zero gradient counts as cosine 0)."""
    with attack_mode(model) as device:
        x, y = x.to(device), y.to(device)
        autograd, _ = input_gradient(model, x, y, loss="margin")
        with torch.inference_mode():
            estimate = estimate_gradient(model, x, y, sigma, samples, max_batch, generator)
        cosine = torch.nn.functional.cosine_similarity(autograd.flatten(1).double(), estimate.flatten(1).double(),
                                                       dim=1, eps=1e-30)
        cosine = torch.nan_to_num(cosine, nan=0.0)
    dims = x[0].numel()
    smooth = math.sqrt(samples / (samples + dims + 1))
    return flagged(cosine.median().item(), fraction * smooth, above=False, smooth_loss_cosine=smooth,
                   sigma=sigma * 255, samples=samples)


# ---------------------------------------------------------------- one verdict per model

def bounded_attacks() -> list:
    """The registered attacks that must not beat the white-box gradient attacks (one-step, gradient-free,
    transfer, BPDA): every entry with a ``must_not_beat``."""
    return [name for name, entry in registry.REGISTRY.items() if entry.must_not_beat]


def _gaps(acc: dict, beaten: str, n: int, subsets: dict, cascaded: set, outcomes: Optional[dict],
          settings: IndicatorConfig) -> dict:
    """Per bounded attack present: the reference it is read against, its gap to it, the gap beyond the
    slack, and the paired test (on the first m examples for an attack run on those only)."""
    found = {}
    for name in bounded_attacks():
        if name not in acc:
            continue
        table, size = subsets.get(name, (acc, n))
        reference = WHITEBOX if name in cascaded and WHITEBOX in table else beaten
        gap = table[reference] - table[name]
        first = {key: mask[:size] for key, mask in outcomes.items()} if outcomes else None
        found[name] = {"reference": reference, "gap": gap, "excess": gap - slack(size, settings.slack_points),
                       "test": paired_test(first, reference, name, alpha=settings.alpha)}
    return found


def _shown(attack: str, gap: dict, n: int, cascaded: bool) -> dict:
    """The verdict for an attack that broke examples the white-box attacks left robust: "masking shown" when
    it ran on every example (its sign test counts disagreements both ways), else, for a row run on the
    white-box survivors only, the count of what it found and that one-sided test's p-value."""
    points, beaten, test = 100 * gap["gap"], gap["reference"], gap["test"]
    if cascaded:
        count = test["broken_only_by"][attack] if test else round(gap["gap"] * n)
        p_value = f"p = {test['p_value']:.2g}" if test else "p not computed: no per-example outcomes"
        return {"verdict": "white-box misses found", "attack": attack, "beaten": beaten, "points": points,
                "examples": count, "paired_test": test,
                "text": f"found {count} examples the white-box attacks missed ({p_value}; attack {attack} on the "
                        f"white-box survivors)"}
    return {"verdict": "masking shown", "attack": attack, "beaten": beaten, "points": points, "paired_test": test,
            "text": f"masking shown: attack {attack} beat attack {beaten} by {points:.1f} points"}


# Flags that say the attack had not converged at its budget (a larger one still removed accuracy), a fault of
# the attack rather than a sign of masking; alone they give the verdict NOT_CONVERGED.
CONVERGENCE_FLAGS = ("incomplete_optimisation", "steps_restarts_converged")
NOT_CONVERGED = "attack not converged"


def too_weak(indicators: dict) -> Optional[dict]:
    """The verdict "attack too weak" when the binarization test flagged, whatever the other indicators say: an
    attack that misses adversarial examples known to exist leaves robust accuracies that cannot be trusted."""
    test = indicators.get("binarization") or {}
    if test.get("verdict") != "flag":
        return None
    low, high = test["interval"]
    flags = sorted(name for name, result in indicators.items() if result.get("verdict") == "flag")
    text = (f"attack too weak: robust accuracy not trustworthy (binarization test of {test['attack']}: "
            f"{test['passes']} of {test['passes'] + test['fails']} passed, {100 * test['confidence']:.0f}% "
            f"interval [{low:.2f}, {high:.2f}], below {test['threshold']:.2f})")
    return {"verdict": "attack too weak", "attack": test["attack"], "flags": flags, "text": text}


def verdict(acc: dict, indicators: dict, whitebox: list, n: int, subsets: Optional[dict] = None,
            cascaded: Optional[list] = None, outcomes: Optional[dict] = None,
            settings: IndicatorConfig = DEFAULTS) -> dict:
    """One line per model, from the attacks' accuracies at the main eps and the indicators, the first that holds:

    - ``masking shown: attack X beat attack Y by Z points`` when an attack that must not beat the white-box
      gradient attacks (:func:`bounded_attacks`), run on every example, leaves less accuracy than the strongest
      of them, Y (of the rows ``whitebox``), by more than max(1 point, 1 example);
    - ``found N examples the white-box attacks missed (p = ...)`` (kind ``white-box misses found``) when the gap
      is that of a ``cascaded`` row (below): such a row can only add breaks, so its sign test cannot fail the
      other way and it does not "show" masking;
    - ``attack too weak: robust accuracy not trustworthy`` when the binarization test flagged (:func:`too_weak`;
      the two above keep their line and say ``attack_too_weak``);
    - ``masking suspected (indicators ...)`` when a masking indicator is flagged (the line lists every flag,
      the convergence ones below included);
    - ``attack not converged: robust accuracy is an upper bound (...)`` when the only flags are the
      convergence ones (:data:`CONVERGENCE_FLAGS`): a larger budget still removes accuracy, which says the
      attack was under-budgeted, not that the model masks gradients (Carlini et al. 2019; Pintor et al. 2022
      fix incomplete optimisation with more iterations). It comes after "attack too weak", whose binarization
      test shows the weakness on examples known to be breakable;
    - ``no masking indicated`` otherwise.

    ``subsets`` maps an attack run on the first m examples only to ``(accuracies on those m, m)``: it is
    compared with the white-box attacks on the same examples. A ``cascaded`` attack ran only on the examples
    every white-box reference attack left robust, so its row is compared with that worst case (``whitebox``):
    the gap is what it broke beyond all of them. With ``outcomes`` (per-example robust masks) a gap counts
    only if the exact sign test on the examples the two attacks disagree on gives p < alpha
    (:func:`.masking.significant_gap`, as the checks do): on 100 examples 4 broken one way and none the other
    (p = 0.06) is not shown.
    """
    present = [name for name in whitebox if name in acc]
    beaten = min(present, key=lambda name: acc[name]) if present else None
    gaps = _gaps(acc, beaten, n, subsets or {}, set(cascaded or ()), outcomes, settings) if beaten else {}
    shown = {name: g["excess"] for name, g in gaps.items() if significant_gap(g["excess"] > 1e-9, g["test"])}
    flags = sorted(name for name, result in indicators.items() if result.get("verdict") == "flag")
    weak = too_weak(indicators)
    # "masking shown" only from a comparison whose sign test can fail both ways (an attack run on every example
    # against the white-box row); a cascaded row can only add breaks, so it reports what it found instead.
    both_ways = {name: excess for name, excess in shown.items() if gaps[name]["reference"] != WHITEBOX}
    if both_ways or shown:
        strongest = max(both_ways or shown, key=(both_ways or shown).get)
        found = _shown(strongest, gaps[strongest], n, cascaded=not both_ways)
        return dict(found, flags=flags, attack_too_weak=weak is not None)
    if weak is not None:
        return weak
    return _flagged(flags) or {"verdict": "no masking indicated", "flags": [], "text": "no masking indicated"}


def _flagged(flags: list) -> Optional[dict]:
    """"attack not converged" when every flag is a convergence one, "masking suspected" when any other is."""
    if not flags:
        return None
    if set(flags) <= set(CONVERGENCE_FLAGS):
        return {"verdict": NOT_CONVERGED, "flags": flags,
                "text": f"{NOT_CONVERGED}: robust accuracy is an upper bound ({', '.join(flags)})"}
    return {"verdict": "masking suspected", "flags": flags,
            "text": f"masking suspected (indicators {', '.join(flags)})"}
