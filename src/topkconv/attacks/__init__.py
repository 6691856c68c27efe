"""Adversarial attacks on models that take images in [0, 1]; ``eps`` and step sizes are fractions of 1.

- :func:`fgsm`, :func:`pgd` (restarts, EOT, targeted, CE or margin loss): the paper's white-box protocol.
- :func:`autoattack`, :func:`square`: AutoAttack and the black-box Square attack via ``pyautoattack``.
- :func:`transfer`: PGD crafted on a surrogate model.
- BPDA through top-k: run :func:`pgd` inside :func:`topkconv.layers.dense_gradients`.
- :func:`accuracy`, :func:`correct`, :func:`attack_mode`: shared helpers.
- :mod:`topkconv.attacks.masking`: the automated gradient-masking checks.
"""

from .autoattack import autoattack, square
from .common import accuracy, attack_mode, correct, has_routing, is_stochastic, model_device, predict
from .gradient import attack_loss, fgsm, input_gradient, pgd
from .transfer import transfer

__all__ = ["fgsm", "pgd", "autoattack", "square", "transfer", "accuracy", "correct", "predict",
           "attack_mode", "model_device", "has_routing", "is_stochastic", "attack_loss", "input_gradient"]
