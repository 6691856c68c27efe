"""Robustness evaluation of one model: the paper's protocol, stronger attacks and gradient-masking checks.

:func:`evaluate` runs a suite of attacks on ``(x, y)`` and returns the content of ``eval.json``;
:func:`evaluate_run` does it for a checkpoint folder and writes ``eval.json`` and ``acc-vs-eps.png``.

It is a pipeline, one module per stage:

- :mod:`.plan`: which attacks run (the suite's registry entries that apply to this model), at which eps;
- :mod:`.run`: every attack on every chunk of examples (sharded under ``torchrun``), per-example masks;
- :mod:`.summarise`: accuracies, combined rows, first-N subsets, the per-example worst case per eps;
- :mod:`.measure` and :mod:`.judge`: the masking indicators, the checks and the one-line verdict;
- :mod:`.files`: a checkpoint folder or a user's model in, eval.json and its plot out;
- :mod:`.strength`: the binarization test of the strongest white-box attack (an indicator; a flag makes the
  verdict "attack too weak"), each budget as a fraction of its reference (``budgets``; the verdict is
  ``provisional`` below it) and, on a random model, every row judged over draws (``over_draws``);
- :mod:`.curves`: attack-strength curves (``topkconv evaluate RUN --curves N``).

Suites (eps and step sizes in 0-255 units in the config and in the output, fractions of 1 in the attacks):
``paper`` is clean, FGSM and PGD-16 (step 0.75) from a zero and a random start (``pgd`` is their per-example
worst), and EOT-PGD on a random model, at ``eps`` and each of ``extra_eps``; ``full`` adds every strong
attack of :data:`topkconv.attacks.REGISTRY` that applies (AutoAttack, Square, transfer, zeroth-order, BPDA on
a routing model, doubled steps and restarts), an accuracy-vs-eps curve, the indicators and one verdict line.

Evaluating your own model: any ``nn.Module`` that takes images in [0, 1] (normalisation inside) works::

    from topkconv.config import AttackConfig
    from topkconv.evaluate import evaluate
    result = evaluate(model, x_test, y_test, AttackConfig(suite="full", eps=8, n_examples=200))
    print(result["verdict"]["text"], result["worst_case"]["accuracy"])
"""

from ..attacks.registry import SUITES
from .files import evaluate_run, evaluate_user_model, plot_path, write_results
from .measure import measure_indicators
from .pipeline import evaluate
from .plan import CombinedAttack, ModelTraits, Plan, PlannedAttack, model_traits, plan_attacks
from .run import chunk_order

__all__ = ["evaluate", "evaluate_run", "evaluate_user_model", "write_results", "plot_path", "measure_indicators",
           "plan_attacks", "model_traits", "ModelTraits", "Plan", "PlannedAttack", "CombinedAttack", "SUITES",
           "chunk_order"]
