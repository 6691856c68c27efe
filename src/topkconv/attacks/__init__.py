"""Adversarial attacks on models that take images in [0, 1]; ``eps`` and step sizes are fractions of 1.

- :func:`fgsm`, :func:`pgd` (zero or random start, restarts, EOT, targeted, CE or margin loss): the
  paper's white-box protocol.
- :func:`zeroth_order`: the gradient-free attack that broke k-WTA (Tramèr et al. 2020).
- :func:`autoattack`, :func:`square`: AutoAttack and the black-box Square attack via ``pyautoattack``.
- :func:`transfer`: PGD crafted on a surrogate model.
- BPDA through top-k: run :func:`pgd` inside :func:`topkconv.layers.dense_gradients` (the dense stand-in)
  or :func:`topkconv.layers.soft_gradients` (a smooth relaxation of each layer's selection).
- :func:`accuracy`, :func:`correct`, :func:`attack_mode`: shared helpers.
- :mod:`topkconv.attacks.masking`: the five accuracy-based gradient-masking checks.
- :mod:`topkconv.attacks.indicators`: masking indicators with values, thresholds and verdicts, and the
  one-line verdict per model.
"""

from .autoattack import autoattack, square
from .common import accuracy, attack_mode, correct, has_routing, is_stochastic, model_device, predict
from .gradient import attack_loss, fgsm, input_gradient, pgd
from .transfer import transfer
from .zeroth_order import zeroth_order

__all__ = ["fgsm", "pgd", "zeroth_order", "autoattack", "square", "transfer", "accuracy", "correct", "predict",
           "attack_mode", "model_device", "has_routing", "is_stochastic", "attack_loss", "input_gradient"]
