"""Attack-strength curves (Carlini et al. 2019: report the curve, not one point): robust accuracy under PGD as
its steps grow (10 -> 1,000 on a log scale), as its restarts grow (1 -> 10), and as eps grows (1/255 -> 32/255,
then unbounded); and under the zeroth-order attack as its noise pairs grow towards the reference's (Tramer et
al. 2020: 100 steps of 50, 500 then 10,000 pairs, 611,000 pairs an example; each point runs that attack with
every step's pairs scaled by a share of it). A budget curve whose last doubling still removes more than
``still_falling_points`` is flagged **still falling**: the attack had not converged at the budget the
evaluation used.

Each PGD point starts at random and steps by Madry et al.'s 2.5 eps / steps, so every budget can cross the
ball; on a random model each gradient is averaged over ``[attack.eot_pgd] samples`` draws (EOT). The curves go
to ``strength-curves.json`` and ``strength-curves.png`` (``topkconv evaluate RUN --curves N``).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Optional

import torch
from torch import nn

from ..attacks.common import correct, seeded
from ..attacks.masking import slack
from ..attacks.pgd import pgd
from ..attacks.zeroth_order import PAPER_SAMPLES, PAPER_SIGMA, PAPER_STEP_SIZE, PAPER_STEPS, total_pairs, zeroth_order
from ..config import AttackConfig
from .plan import model_traits
from .run import attack_seed

UNBOUNDED = 255.0   # eps = 255/255: the whole box, so the attack must win (0-255 units)
# `topkconv evaluate --suite full` draws the curves on this many examples unless --curves N says otherwise: enough
# to see a budget still falling, few enough that the curves cost about what the full suite does (docs/audit.md)
FULL_SUITE_EXAMPLES = 20


@dataclass
class CurveConfig:
    examples: int = 100                                                            # the first N test examples
    steps: list = field(default_factory=lambda: [10, 20, 50, 100, 200, 500, 1000])  # ends on a doubling
    restarts: list = field(default_factory=lambda: [1, 2, 5, 10])                   # ends on a doubling
    restart_steps: int = 50                                                         # steps per restart
    eps: list = field(default_factory=lambda: [1, 2, 4, 8, 16, 32, UNBOUNDED])      # 0-255 units
    # shares of the reference zeroth-order attack's noise pairs (1.0 = the reference); ends on a doubling ([]: no
    # zeroth-order curve). The default stops at 1%, about 6,000 pairs an example: the reference itself takes over
    # a million forward passes an example, hours on a CPU (topkconv evaluate --curves-zo-share 1 asks for it)
    zo_shares: list = field(default_factory=lambda: [0.0025, 0.005, 0.01])
    still_falling_points: float = 0.01   # the last doubling may remove at most 1 point

    def __post_init__(self):
        if self.examples < 1:
            raise ValueError(f"curves: examples: expected >= 1, got {self.examples}")
        if not all(0 < share <= 1 for share in self.zo_shares):
            raise ValueError(f"curves: zo_shares: expected shares of the reference budget in (0, 1], "
                             f"got {self.zo_shares}")
        for name in ("steps", "restarts") + (("zo_shares",) if self.zo_shares else ()):  # []: no zeroth-order curve
            values = getattr(self, name)
            if len(values) < 2 or values[-1] != 2 * values[-2] or sorted(values) != list(values):
                raise ValueError(f"curves: {name}: expected an increasing list ending on a doubling, got {values}")


def _accuracy_under(model: nn.Module, y, clean, seed: int, attack) -> float:
    """The share of examples clean and still correct on ``attack(generator)``'s adversarial images."""
    with seeded(model, seed) as generator:
        return (correct(model, attack(generator), y) & clean).double().mean().item()


def _robust(model: nn.Module, x, y, clean, eps: float, steps: int, restarts: int, eot: int, seed: int) -> float:
    """Robust accuracy under PGD at ``eps`` (0-255 units) with ``steps`` x ``restarts``."""
    return _accuracy_under(model, y, clean, seed, lambda generator: pgd(
        model, x, y, eps / 255, 2.5 * eps / 255 / steps, steps, start="random", restarts=restarts, eot_samples=eot,
        generator=generator))


def zo_schedule(share: float) -> list:
    """The reference zeroth-order schedule with every step's pairs scaled by ``share`` (at least one pair)."""
    return [[start, max(1, round(pairs * share))] for start, pairs in PAPER_SAMPLES]


def _robust_zo(model: nn.Module, x, y, clean, eps: float, share: float, seed: int) -> float:
    """Robust accuracy under the reference zeroth-order attack at ``eps`` (0-255) with ``share`` of its pairs."""
    return _accuracy_under(model, y, clean, seed, lambda generator: zeroth_order(
        model, x, y, eps / 255, steps=PAPER_STEPS, step_size=PAPER_STEP_SIZE, sigma=PAPER_SIGMA,
        samples=zo_schedule(share), generator=generator))


def _curve(name: str, points: list, measure, budget: bool, tolerance: float) -> dict:
    """One curve; a budget curve says whether its last doubling removed more than ``tolerance``."""
    tic = time.perf_counter()
    found = [{"x": point, "accuracy": measure(point)} for point in points]
    curve = {"name": name, "points": found, "seconds": time.perf_counter() - tic}
    if budget:
        drop = found[-2]["accuracy"] - found[-1]["accuracy"]
        curve.update(last_doubling_drop=drop, tolerance=tolerance, still_falling=drop > tolerance + 1e-9)
    return curve


def strength_curves(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: AttackConfig,
                    curves: Optional[CurveConfig] = None) -> dict:
    """The curves at ``cfg.eps`` on the first ``curves.examples`` examples (see the module docstring)."""
    curves = curves or CurveConfig()
    x, y = x[:curves.examples], y[:curves.examples]
    traits = model_traits(model, x, cfg.indicators)
    eot = cfg.budget("eot_pgd").samples if traits.stochastic else 1
    with seeded(model, attack_seed(cfg.seed, -3, "clean")):
        clean = correct(model, x, y)
    seed = lambda name: attack_seed(cfg.seed, -3, name)   # noqa: E731 - one seed per curve, the same per point
    # max(1 point, 1 example), as the masking checks' slack: one example never decides it on a small sample
    eps, falling = cfg.eps, slack(int(x.shape[0]), curves.still_falling_points)
    found = [
        _curve("steps", curves.steps, lambda s: _robust(model, x, y, clean, eps, s, 1, eot, seed("steps")),
               True, falling),
        _curve("restarts", curves.restarts, lambda r: _robust(model, x, y, clean, eps, curves.restart_steps, r, eot,
                                                              seed("restarts")), True, falling),
        _curve("eps", curves.eps, lambda e: _robust(model, x, y, clean, e, curves.restart_steps, 1, eot, seed("eps")),
               False, falling),
    ]
    if curves.zo_shares:
        found.append(_curve("zeroth_order", curves.zo_shares, lambda share: _robust_zo(
            model, x, y, clean, eps, share, seed("zeroth_order")), True, falling))
        for point in found[-1]["points"]:  # each share also as the pairs it draws an example, at most
            point["pairs"] = total_pairs(zo_schedule(point["x"]), PAPER_STEPS)
    still = [c["name"] for c in found if c.get("still_falling")]
    return {"eps": eps, "n": int(x.shape[0]), "clean": clean.double().mean().item(), "eot_samples": eot,
            "config": asdict(curves), "curves": {c["name"]: c for c in found}, "still_falling": still,
            "text": ("still falling: " + ", ".join(still) + " (the last doubling removed more than "
                     f"{100 * falling:.3g} points)") if still else "flattened: no budget curve still falling"}


def plot_curves(result: dict, path, title: str = "") -> str:
    """The curves side by side, on log scales, as a PNG at ``path``."""
    from ..figures import _matplotlib, save_figure

    plt = _matplotlib()
    panels = [("steps", "PGD steps"), ("restarts", "restarts"), ("eps", "eps (255 = unbounded)"),
              ("zeroth_order", "zeroth-order: share of the reference's pairs")]
    panels = [(name, label) for name, label in panels if name in result["curves"]]  # files from before the 4th
    fig, axes = plt.subplots(1, len(panels), figsize=(3.7 * len(panels), 3.4), dpi=110)
    for ax, (name, label) in zip(axes, panels):
        curve = result["curves"][name]
        ax.plot([p["x"] for p in curve["points"]], [p["accuracy"] for p in curve["points"]], "o-")
        ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(name + (" (still falling)" if curve.get("still_falling") else ""), fontsize=9)
    axes[0].set_ylabel("robust accuracy")
    fig.suptitle(title or f"attack strength at eps {result['eps']:g} (n = {result['n']})", fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)


def write_curves(result: dict, out, title: str = "") -> None:
    """``strength-curves.json`` and ``.png`` beside the evaluation ``out`` (``eval.json``; ``<stem>-strength-curves``
    beside another name, as :func:`topkconv.checkpoint.beside` names them), each atomically."""
    from ..checkpoint import CURVES_FILE, CURVES_PLOT, beside
    from ..io import atomic_write_json

    atomic_write_json(beside(out, CURVES_FILE), result)
    plot_curves(result, beside(out, CURVES_PLOT), title)


def curves_for_model(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: AttackConfig, examples: int,
                     out, title: str, zo_share: Optional[float] = None, run: Optional[dict] = None) -> dict:
    """The strength curves of ``model`` on the first ``examples`` of ``x, y`` at ``cfg.eps``, written beside the
    evaluation ``out`` (:func:`write_curves`) with ``run`` (what was evaluated) in the JSON. ``zo_share``: the
    zeroth-order curve's largest share of the reference budget (its points: a quarter, a half and all of it)."""
    shares = {"zo_shares": [zo_share / 4, zo_share / 2, zo_share]} if zo_share is not None else {}
    result = strength_curves(model, x, y, cfg, CurveConfig(examples=examples, **shares))  # it takes the first N
    result["run"] = run or {}
    write_curves(result, out, title=f"{title}: attack strength at eps {cfg.eps:g} (n = {result['n']})")
    return result


def curves_for_run(run_dir, examples: int, out, eps: Optional[float] = None, overrides: Optional[dict] = None,
                   device: str = "cpu", allow_unfinished: bool = False, zo_share: Optional[float] = None) -> dict:
    """:func:`curves_for_model` for the checkpoint in ``run_dir`` on its test split, with the run's ``[attack]``
    settings and ``overrides`` (``eps`` replaces the run's)."""
    from ..checkpoint import load_checkpoint
    from ..config import attack_config_with
    from ..data import load_data
    from ..distributed import pick_device

    model, spec = load_checkpoint(run_dir, allow_unfinished=allow_unfinished)
    cfg = attack_config_with(spec.attack, dict(overrides or {}, **({"eps": float(eps)} if eps is not None else {})))
    model = model.to(pick_device(device))
    x, y = load_data(spec.data).test_tensors(limit=examples)
    return curves_for_model(model, x, y, cfg, examples, out, spec.name, zo_share,
                            run={"dir": str(run_dir), "name": spec.name, "hash": spec.hash()})


def curves_for_user_model(factory: str, weights, data, cfg: AttackConfig, examples: int, out,
                          device: str = "auto", zo_share: Optional[float] = None) -> dict:
    """:func:`curves_for_model` for ``evaluate --model FACTORY --weights FILE``, on the test split of ``data``."""
    from ..data import load_data
    from ..distributed import pick_device
    from ..user_model import build_user_model

    model = build_user_model(factory, weights).to(pick_device(device))
    x, y = load_data(data).test_tensors(limit=examples)
    return curves_for_model(model, x, y, cfg, examples, out, factory, zo_share,
                            run={"factory": factory, "weights": str(weights)})
