"""The binarization test (Zimmermann, Brendel, Tramèr and Carlini, NeurIPS 2022, "Increasing Confidence in
Adversarial Robustness Evaluations"; reference code ``google-research/active-adversarial-tests``,
``active_tests/decision_boundary_binarization.py``): can the attack find an adversarial example that is
*known* to exist?

For each test example ``x``:

1. **A binary task around x.** Inner points: ``x`` itself and ``n_inner - 1`` points drawn uniformly within
   ``eta * eps`` of it (L-inf, clipped to [0, 1]), label 0. Boundary points: ``n_boundary`` corners of the
   eps-ball (every pixel moved by +eps or -eps, clipped to [0, 1]), label 1. With eta < 1 the two sets are
   apart by ``(1 - eta) * eps``.
2. **A new linear readout on the defended model's own features.** The features are the input of the model's
   last ``nn.Linear`` (a routing ``TopKLinear`` counts: it subclasses it), read with a forward pre-hook, so
   the model's layers up to its classifier are used as they are, and whatever follows that layer is
   bypassed. A logistic regression (scikit-learn; class-balanced, weakly regularised) is fitted on the
   features of the binary task, and its two logits are rescaled to a unit range over the training points
   (the reference's "fixed" rescaling, so a cross-entropy attack's gradient does not saturate).
3. **Validity.** The example counts only when the readout classifies every inner point (the clean image
   included) as 0 and at least one boundary point as 1, and when, judged again as an attack's output is
   judged (:func:`_found`, on fresh draws of a random model), the clean image is still 0 and some boundary
   point 1, confirmed by one more such judgement: then the binarized model (features -> readout) has an
   adversarial example within eps of ``x`` for certain (on a random model: one that held twice). Otherwise the
   example is **invalid** (neither a pass nor a fail), e.g. when the features cannot tell the points apart, or
   when a random model's fresh draws undo the points the readout was fitted on.
4. **The attack** ``attack(binarized, x, y, eps) -> x_adv`` runs against the binarized model with label 0.
   The test **passes** on the example when ``x_adv`` lies within eps of ``x`` and in [0, 1] and the
   binarized model labels it 1; it **fails** otherwise.

The report gives the counts and the pass rate over the valid examples with its exact binomial
(Clopper-Pearson) interval. A low pass rate means the attack could not find adversarial examples that
exist: the robust accuracy it reports for that model is not to be trusted.

**A random model** (SAP): its features change with every forward pass, so a readout fitted on one draw and a
point judged on another need not agree. With ``draws`` > 1 (the reference's repeated inference) the features
of the fit and of the judgement are the mean over that many forward passes; the attack itself still sees one
draw per query, so it needs EOT, as on the defended model. Even so a judgement is a random event, which is
why validity is judged anew and confirmed (step 3), and the known adversarial example of a valid task is
judged a third time, on draws of its own: the share of valid examples where it holds (``known_rate``) says how
noisy the judgement is at this eps. It is not a ceiling: an attack may go deeper into label 1 than the corner
the readout was fitted on (measured on the tests' SAP MLP at 32/255 with 100 draws: EOT-PGD passed 18 of 18
valid examples where the known corners held on 13). On a deterministic model every judgement is the same and
``known_rate`` is 1.

Not built (the reference's options): attack-found boundary points, far-off reference points.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch
from torch import nn

from .common import attack_mode, check_inputs

Attack = Callable[[nn.Module, torch.Tensor, torch.Tensor, float], torch.Tensor]
OUTCOMES = ("pass", "fail", "invalid")
TOLERANCE = 1e-6  # float slack on the eps-ball and the [0, 1] box when checking an attack's output


@dataclass
class BinarizationConfig:
    n_inner: int = 50          # inner points per example, the clean image included (label 0)
    n_boundary: int = 10       # eps-ball corners per example (label 1)
    eta: float = 0.95          # inner points lie within eta * eps
    readout_c: float = 1e4     # inverse L2 strength of the logistic regression (large: nearly unregularised)
    confidence: float = 0.95   # of the Clopper-Pearson interval
    seed: int = 0
    draws: int = 1             # forward passes averaged for the features of the fit and the judgement

    def __post_init__(self):
        if not isinstance(self.draws, int) or self.draws < 1:
            raise ValueError(f"binarization.draws: expected an integer >= 1, got {self.draws!r}")
        if not isinstance(self.n_inner, int) or self.n_inner < 1:
            raise ValueError(f"binarization.n_inner: expected an integer >= 1, got {self.n_inner!r}")
        if not isinstance(self.n_boundary, int) or self.n_boundary < 1:
            raise ValueError(f"binarization.n_boundary: expected an integer >= 1, got {self.n_boundary!r}")
        if not 0 < self.eta < 1:
            raise ValueError(f"binarization.eta: expected a fraction in (0, 1), got {self.eta!r}")
        if not self.readout_c > 0:
            raise ValueError(f"binarization.readout_c: expected a positive number, got {self.readout_c!r}")
        if not 0 < self.confidence < 1:
            raise ValueError(f"binarization.confidence: expected a fraction in (0, 1), got {self.confidence!r}")


@dataclass
class BinarizationResult:
    eps: float
    outcomes: list = field(default_factory=list)  # one of OUTCOMES per example, in order
    confidence: float = 0.95
    known_holds: list = field(default_factory=list)  # per valid example: the known example judged 1 again

    @property
    def known_rate(self) -> Optional[float]:
        """The share of valid examples whose known adversarial example passed a judgement of its own (None when
        no example was valid): what an attack that returned exactly that example would score."""
        return sum(self.known_holds) / len(self.known_holds) if self.known_holds else None

    def count(self, outcome: str) -> int:
        return sum(1 for o in self.outcomes if o == outcome)

    @property
    def pass_rate(self) -> Optional[float]:
        """Passes over valid examples (None when no example was valid)."""
        valid = self.count("pass") + self.count("fail")
        return self.count("pass") / valid if valid else None

    @property
    def interval(self) -> Optional[tuple[float, float]]:
        """The exact (Clopper-Pearson) interval of the pass rate."""
        from scipy.stats import binomtest

        valid = self.count("pass") + self.count("fail")
        if not valid:
            return None
        ci = binomtest(self.count("pass"), valid).proportion_ci(self.confidence, method="exact")
        return float(ci.low), float(ci.high)

    def to_dict(self) -> dict:
        return {"eps": self.eps, "passes": self.count("pass"), "fails": self.count("fail"),
                "invalid": self.count("invalid"), "pass_rate": self.pass_rate,
                "interval": list(self.interval) if self.interval else None, "confidence": self.confidence,
                "known_passes": sum(self.known_holds), "known_rate": self.known_rate, "outcomes": list(self.outcomes)}


def feature_layer(model: nn.Module) -> nn.Linear:
    """The model's last ``nn.Linear`` in module order: the classifier whose input are the features."""
    linears = [module for module in model.modules() if isinstance(module, nn.Linear)]
    if not linears:
        raise ValueError("binarization test: the model has no nn.Linear layer whose input could serve as features")
    return linears[-1]


def _features(model: nn.Module, layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """The input of ``layer`` while ``model`` runs on ``x`` (flattened per example; gradients kept)."""
    captured = []
    handle = layer.register_forward_pre_hook(lambda module, args: captured.append(args[0]))
    try:
        model(x)
    finally:
        handle.remove()
    if not captured:
        raise ValueError("binarization test: the model's last nn.Linear did not run in its forward pass")
    return captured[-1].flatten(1)


def _mean_features(model: nn.Module, layer: nn.Linear, x: torch.Tensor, draws: int) -> torch.Tensor:
    """The features of ``x`` averaged over ``draws`` forward passes (no gradients): a random model's
    expected features."""
    with torch.no_grad():
        return torch.stack([_features(model, layer, x) for _ in range(draws)]).mean(0)


class Binarized(nn.Module):
    """The defended model's features followed by a two-class linear readout (label 1: "adversarial")."""

    def __init__(self, model: nn.Module, readout: nn.Linear):
        super().__init__()
        self.model, self.readout = model, readout
        self.layer = feature_layer(model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.readout(_features(self.model, self.layer, x))


def binary_task(x: torch.Tensor, eps: float, cfg: BinarizationConfig,
                generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``(points, labels)`` around one image ``x`` (C, H, W): inner points (the first is ``x``) label 0,
    eps-ball corners label 1."""
    shape = (cfg.n_inner - 1, *x.shape)
    inner = x + (2 * torch.rand(shape, generator=generator, dtype=x.dtype) - 1) * cfg.eta * eps
    signs = torch.randint(0, 2, (cfg.n_boundary, *x.shape), generator=generator).to(x.dtype) * 2 - 1
    corners = x + signs * eps
    points = torch.cat([x[None], inner, corners]).clamp(0.0, 1.0)
    labels = torch.cat([torch.zeros(cfg.n_inner, dtype=torch.long), torch.ones(cfg.n_boundary, dtype=torch.long)])
    return points, labels


def fit_readout(features: torch.Tensor, labels: torch.Tensor, cfg: BinarizationConfig) -> Optional[nn.Linear]:
    """A two-logit linear readout (logit 1 - logit 0 = the logistic regression's score), rescaled to a unit
    logit range; None when it does not classify every inner point as 0 and some boundary point as 1."""
    from sklearn.linear_model import LogisticRegression

    features_np = features.detach().cpu().double().numpy()
    regression = LogisticRegression(C=cfg.readout_c, class_weight="balanced", max_iter=2000)
    regression.fit(features_np, labels.numpy())
    scores = features_np @ regression.coef_[0] + regression.intercept_[0]
    inner, boundary = scores[labels.numpy() == 0], scores[labels.numpy() == 1]
    if not (np.all(inner < 0) and np.any(boundary > 0)):
        return None
    scale = max(float(scores.max() - scores.min()), 1e-12)
    readout = nn.Linear(features.shape[1], 2).to(dtype=features.dtype, device=features.device)
    weight = torch.as_tensor(regression.coef_[0] / scale / 2, dtype=features.dtype, device=features.device)
    bias = float(regression.intercept_[0]) / scale / 2
    with torch.no_grad():
        readout.weight.copy_(torch.stack([-weight, weight]))
        readout.bias.copy_(torch.tensor([-bias, bias]))
    return readout


def _labelled_adversarial(binarized: Binarized, points: torch.Tensor, draws: int) -> torch.Tensor:
    """(N,) bool: the readout labels each point 1, from its features averaged over ``draws`` passes."""
    with torch.no_grad(), attack_mode(binarized):
        features = _mean_features(binarized.model, binarized.layer, points, draws)
        return binarized.readout(features).argmax(1) == 1


def _found(binarized: Binarized, x: torch.Tensor, x_adv: torch.Tensor, eps: float, draws: int = 1) -> bool:
    """Whether ``x_adv`` is a valid adversarial example of the binarized model: inside the ball and the box,
    labelled 1 (by the readout of its features averaged over ``draws`` passes)."""
    x_adv = x_adv.detach().to(x.device)
    if (x_adv - x).abs().max() > eps + TOLERANCE or x_adv.min() < -TOLERANCE or x_adv.max() > 1 + TOLERANCE:
        return False
    return bool(_labelled_adversarial(binarized, x_adv, draws).item())


def _known_adversarial(binarized: Binarized, clean: torch.Tensor, boundary: torch.Tensor,
                       draws: int) -> Optional[torch.Tensor]:
    """The first boundary point (1, C, H, W) labelled 1 while the clean image is labelled 0, judged anew (on fresh
    draws of a random model, where the fit's labels need not hold) and then confirmed by one more judgement on
    draws of its own; None when there is none. The pick alone would be a winner's curse: among ten corners whose
    label the draws' noise decides, some corner looks adversarial by chance (measured on the quick SAP model at
    8/255, 10 draws: the picked corner held on 0 of 12 re-judgements)."""
    picked = _labelled_adversarial(binarized, torch.cat([clean, boundary]), draws)
    if picked[0] or not picked[1:].any():
        return None
    known = boundary[picked[1:].nonzero()[0]]
    confirmed = _labelled_adversarial(binarized, torch.cat([clean, known]), draws)
    return known if confirmed[1] and not confirmed[0] else None


def binarization_test(model: nn.Module, x: torch.Tensor, attack: Attack, eps: float,
                      cfg: Optional[BinarizationConfig] = None) -> BinarizationResult:
    """Run the binarization test of ``attack`` on ``model`` at ``eps`` (a fraction of 1) for each image of
    ``x`` (N, C, H, W, in [0, 1]); see the module docstring. The model is in eval mode throughout and its
    modes are restored."""
    return binarization_tests(model, x, {"attack": attack}, eps, cfg)["attack"]


def binarization_tests(model: nn.Module, x: torch.Tensor, attacks: dict, eps: float,
                       cfg: Optional[BinarizationConfig] = None) -> dict:
    """:func:`binarization_test` of several attacks ({name: attack}) on the same tasks: each image's readout is
    fitted and judged valid once, then every attack runs against it in turn ({name: BinarizationResult}). On a
    random model with many draws the fits cost more than an attack (SAP at 400 draws: most of 28 s an image), and
    the attacks meet the same valid tasks and the same re-judged known examples, so their pass rates pair up."""
    cfg = cfg or BinarizationConfig()
    check_inputs(x, torch.zeros(len(x), dtype=torch.long), eps)
    generator = torch.Generator().manual_seed(cfg.seed)
    layer = feature_layer(model)
    with attack_mode(model) as device:
        # every task is fitted and judged valid before any attack runs: the attack's own use of a random model's
        # draws cannot change which examples are valid, so every attack at the same seed meets the same tasks
        tasks = [_valid_task(model, layer, image, eps, cfg, generator, device) for image in x.detach().cpu()]
        known_holds = [_found(binarized, clean, known, eps, cfg.draws) for binarized, clean, known in
                       filter(None, tasks)]
        return {name: BinarizationResult(
                    eps=eps, confidence=cfg.confidence, known_holds=list(known_holds),
                    outcomes=["invalid" if task is None else _attacked(task, attack, eps, cfg.draws) for task in tasks])
                for name, attack in attacks.items()}


def _attacked(task: tuple, attack: Attack, eps: float, draws: int) -> str:
    """"pass" when ``attack`` finds an adversarial example of the task's binarized model, else "fail"."""
    binarized, clean, _ = task
    x_adv = attack(binarized, clean, torch.zeros(1, dtype=torch.long, device=clean.device), eps)
    return "pass" if _found(binarized, clean, x_adv, eps, draws) else "fail"


def _valid_task(model: nn.Module, layer: nn.Linear, image: torch.Tensor, eps: float, cfg: BinarizationConfig,
                generator: torch.Generator, device) -> Optional[tuple]:
    """(binarized model, clean image, its known adversarial example) of one image's binary task, or None when the
    task is invalid (no separating readout, or the fit's labels do not hold when judged anew)."""
    points, labels = binary_task(image, eps, cfg, generator)
    readout = fit_readout(_mean_features(model, layer, points.to(device), cfg.draws), labels, cfg)
    if readout is None:
        return None
    binarized = Binarized(model, readout)
    clean = image[None].to(device)
    known = _known_adversarial(binarized, clean, points[labels == 1].to(device), cfg.draws)
    return None if known is None else (binarized, clean, known)
