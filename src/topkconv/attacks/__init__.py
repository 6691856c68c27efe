"""Adversarial attacks on models that take images in [0, 1]; ``eps`` and step sizes are fractions of 1.

Every attack the evaluation runs is an entry of :data:`REGISTRY` (:mod:`.registry`): one file per attack,
each registering its name, function, budget dataclass and role. A new attack is one file plus its import
line below; the evaluation, the masking checks, the verdict and the CLI's flags read it from the registry.

- :func:`fgsm`, :func:`pgd` (zero or random start, restarts, EOT, targeted, CE or margin loss): the
  paper's white-box protocol (``fgsm``, ``pgd_zero``, ``pgd_random``, ``eot_pgd``, ``pgd_2x_*``).
- :func:`zeroth_order`: the gradient-free attack that broke k-WTA (Tramèr et al. 2020).
- :func:`autoattack`, :func:`square`: AutoAttack and the black-box Square attack via ``pyautoattack``.
- :func:`transfer`: PGD crafted on a surrogate model.
- BPDA through top-k (``bpda_dense``, ``bpda_soft``): :func:`pgd` inside
  :func:`topkconv.layers.dense_gradients` or :func:`topkconv.layers.soft_gradients`.
- :func:`accuracy`, :func:`correct`, :func:`attack_mode`, :func:`logit_change`: shared helpers.
- :mod:`topkconv.attacks.masking`: the accuracy-based gradient-masking checks.
- :mod:`topkconv.attacks.indicators`: masking indicators with values, thresholds and verdicts, and the
  one-line verdict per model.
"""

from .common import accuracy, attack_mode, correct, logit_change, model_device, predict
from .gradient import attack_loss, input_gradient
from .registry import REGISTRY, SUITES, WHITEBOX, Attack, Planned, PlanContext, Role, register, suite_attacks

# The registry, in the order the evaluation plans the attacks: the paper suite's, then the strong suite's.
from .fgsm import fgsm  # noqa: E402  (each module registers its attacks)
from .pgd import pgd  # noqa: E402
from . import eot  # noqa: E402,F401
from .autoattack import autoattack  # noqa: E402
from .square import square  # noqa: E402
from .transfer import transfer  # noqa: E402
from .zeroth_order import zeroth_order  # noqa: E402
from . import bpda  # noqa: E402,F401
from . import convergence  # noqa: E402,F401

__all__ = ["fgsm", "pgd", "zeroth_order", "autoattack", "square", "transfer", "accuracy", "correct", "predict",
           "attack_mode", "model_device", "logit_change", "attack_loss", "input_gradient", "REGISTRY", "SUITES",
           "WHITEBOX", "Attack", "Planned", "PlanContext", "Role", "register", "suite_attacks"]
