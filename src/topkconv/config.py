"""Typed run configuration. One :class:`RunSpec` describes a whole run: data, model, training, attacks.

Specs are read from TOML (``topkconv/experiments/*.toml``) or built in code; unknown keys are errors that name
the key, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import typing
from dataclasses import dataclass, field
from typing import Any, Optional, Union

@dataclass
class DataConfig:
    name: str = "digits"              # digits | cifar10 | cinic10 | imagefolder
    root: Optional[str] = None        # folder of a real data set (not needed for digits)
    image_size: int = 32              # resize to this many pixels (the paper's preset: 224)
    augment: bool = True              # random crop + horizontal flip on the training batches
    split_seed: int = 0               # the fixed, seeded stratified split of digits
    limit_train: Optional[int] = None  # use only the first N training images (tests, quick runs)
    limit_test: Optional[int] = None   # use only the first N test images
    workers: int = 2                  # loader workers for streaming data sets (cinic10, imagefolder)


def defense_config(kind: str = "standard", **options):
    """The config dataclass of defence ``kind`` (from :mod:`topkconv.defenses`) with ``options``.

    Each defence has its own dataclass (``DynamicKConfig``, ``TopKConvConfig`` ...) holding only its options;
    an option the defence does not have is an error naming the option and the defence.
    """
    from . import defenses  # lazily: defenses imports torch, and this module stays light

    return defenses.make_config(kind, **options)


@dataclass
class ModelConfig:
    arch: str = "vgg-small"           # vgg16 (the paper's variant) | vgg-small (32 px, CPU) | torchvision:NAME
    num_classes: int = 10
    in_channels: int = 3
    image_size: int = 32
    hidden: int = 512                 # width of the penultimate FC layer
    width: float = 1.0                # vgg-small: channel width multiplier
    batch_norm: Optional[bool] = None  # BatchNorm after each conv; None: the arch's default (vgg-small yes, vgg16 no)
    pretrained: Optional[str] = None  # local torchvision vgg16-397923af.pth for `features`
    mean: list = field(default_factory=lambda: [0.5, 0.5, 0.5])  # normalisation inside the model
    std: list = field(default_factory=lambda: [0.25, 0.25, 0.25])
    defense: Any = field(default_factory=defense_config, metadata={"from_dict": "defense"})  # a defence's config


ADVERSARIAL_METHODS = ("none", "pgd", "trades", "fgsm")


@dataclass
class AdversarialConfig:
    """Adversarial training (:mod:`topkconv.adversarial`); radii and steps in 0-255 units, as in ``[attack]``.

    pgd: Madry et al. 2018 (CE on PGD examples from a random start); trades: Zhang et al. 2019 (CE(clean) +
    beta * KL(clean || adversarial), the inner maximum on the KL); fgsm: Wong et al. 2020's fast training (one
    step of step_size, default 1.25 * eps, from a uniform random start; ``steps`` is not used).
    """
    method: str = "none"              # none | pgd | trades | fgsm
    eps: float = 8.0                  # L-inf radius of the training examples, 0-255 units
    steps: int = 10                   # inner steps of pgd and trades
    step_size: Optional[float] = None  # 0-255 units; None: 2.5 * eps / steps (pgd, trades), 1.25 * eps (fgsm)
    beta: float = 6.0                 # trades: weight of the KL term (Zhang et al.'s CIFAR-10 value)
    check_examples: int = 200         # after each epoch, PGD-10 at eps on the first N test images (0: off); it
                                      # shows fgsm's catastrophic overfitting (robust accuracy collapsing)

    def __post_init__(self):
        def bad(key, expected, value):
            return ValueError(f"train.adversarial.{key}: expected {expected}, got {value!r}")

        if self.method not in ADVERSARIAL_METHODS:
            raise bad("method", f"one of {', '.join(ADVERSARIAL_METHODS)}", self.method)
        if isinstance(self.eps, bool) or not isinstance(self.eps, (int, float)) or not 0 < self.eps <= 255:
            raise bad("eps", "a radius in (0, 255] (0-255 units: 8 means 8/255)", self.eps)
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise bad("steps", "an integer >= 1", self.steps)
        if self.step_size is not None and (isinstance(self.step_size, bool) or not isinstance(
                self.step_size, (int, float)) or not 0 < self.step_size <= 255):
            raise bad("step_size", "a step in (0, 255] (0-255 units), or unset", self.step_size)
        if isinstance(self.beta, bool) or not isinstance(self.beta, (int, float)) or not 0 < self.beta < float("inf"):
            raise bad("beta", "a positive number", self.beta)
        if isinstance(self.check_examples, bool) or not isinstance(self.check_examples, int) \
                or self.check_examples < 0:
            raise bad("check_examples", "an integer >= 0", self.check_examples)

    @property
    def enabled(self) -> bool:
        return self.method != "none"


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 128             # global batch (split across torchrun ranks)
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"          # cosine | step
    step_size: int = 30               # step schedule: epochs per decay
    gamma: float = 0.1                # step schedule: decay factor
    seed: int = 0
    amp: bool = False                 # bf16 autocast, CUDA only
    device: str = "auto"              # auto | cpu | cuda
    warmup_epochs: float = 0.0        # linear learning-rate warm-up before the schedule (VGG has no BatchNorm)
    eval_examples: Optional[int] = None  # test images scored after each epoch (None: the whole test split)
    adversarial: AdversarialConfig = field(default_factory=AdversarialConfig)  # [train.adversarial]


@dataclass
class IndicatorConfig:
    """The masking indicators' settings (radii in 0-255 units, draws, steps, examples) and every threshold
    the indicators, the masking checks and the verdict judge against: the ``[attack.indicators]`` table."""
    examples: int = field(default=100, metadata={"flag": "--indicator-examples",
                                                 "help": "examples the indicators run on"})
    draws: int = field(default=100, metadata={"flag": "--indicator-draws",
                                              "help": "noise draws per example (unstable predictions; the "
                                                      "finite-difference pairs of gradient agreement)"})
    steps: int = field(default=50, metadata={"flag": "--indicator-steps",
                                             "help": "steps of the indicators' own PGD (the white-box reference of "
                                                     "baseline_transfer; and eps = infinity)"})
    unstable_radius: float = 8.0      # Pintor: uniform noise in [-r/2, r/2], r = 8/255 (0-255 units)
    flip_radius: float = 1.0          # selection flips: uniform noise in [-r, r] (0-255 units)
    flip_draws: int = 4
    agreement_sigma: float = 1.0      # gradient agreement's finite-difference scale (0-255 units)
    randomness_passes: int = 5        # AutoAttack: 5 forward passes
    probe_examples: int = 8           # examples of the behavioural randomness probe that decides EOT
    probe_passes: int = 2
    unstable_threshold: float = 0.1   # mean relative margin change under noise (our choice)
    incomplete_window: int = 10       # Pintor: the last 10 steps ...
    incomplete_tolerance: float = 0.05  # ... of the [0, 1]-rescaled best-so-far loss move by more than 0.05
    incomplete_threshold: float = 0.1  # share of worst-case-robust examples every traced attack left still moving
                                       # (our choice)
    randomness_threshold: float = 1e-4  # AutoAttack: relative L2 change of the logits
    # Pintor's transfer failure on a routing model's own stand-in models (surrogate_transfer_failure): flag when,
    # of the examples whose attack point fools a stand-in model, more than this share the real model still
    # classifies correctly. Pintor flags any failure, with a surrogate whose forward pass is the model's own; a
    # stand-in differs from the routed model by construction, so a few failures near the boundary are expected.
    # Half is where the stand-in's successes stop predicting the model's: most of its points fail on it.
    surrogate_transfer_threshold: float = 0.5
    # AutoAttack: Square beats the white-box attacks by more than 0.2 points (and by 1 example, and by the sign
    # test at alpha: AutoAttack's bare 0.2 points was sized for 10,000 examples)
    square_threshold: float = 0.002
    flip_threshold: float = 0.1       # share of (example, output) selections that change under noise (our choice)
    agreement_fraction: float = 0.5   # gradient agreement must reach half of what a smooth loss gives
    slack_points: float = 0.01        # two accuracies differ beyond max(1 point, 1 example)
    chance_slack: float = 0.05        # "falls to chance": within 5 points of 1 / classes
    alpha: float = 0.05               # the sign test's level for a gap between two attacks on the same examples
    # The binarization test (Zimmermann et al. 2022) of the evaluation's strongest white-box attack, on the first
    # N examples (0: off). Small by default: each example fits a readout and runs the attack once (measured on
    # the digits MLP: about 0.1 s an example); the verdict presets raise it.
    binarization_examples: int = field(default=5, metadata={"flag": "--binarization-examples",
                                                            "help": "examples of the binarization test (0: off)"})
    # Flag the attack as too weak when the pass rate's 95% Clopper-Pearson upper bound lies below 0.9: a sound
    # attack finds the adversarial example that provably exists nearly always (the paper's sound evaluations pass
    # on about all examples, its broken ones on few), and judging the upper bound means a small sample flags only
    # when the data rule out a 90% pass rate (0 of 5 passes: bound 0.52; 2 of 5: 0.85; 3 of 5: 0.95, not flagged).
    binarization_threshold: float = 0.9
    # On a random model (SAP) the readout is fitted on, and every point judged by, features averaged over this
    # many forward passes (the reference's repeated inference). Too few and the draws' noise decides the labels:
    # on the digits SAP MLP at 32/255 (20 examples), a valid task's known corner held on a third judgement on
    # 0.33-0.6 of them at 20 draws and 0.84-0.95 at 400, and with one draw 18-19 of 20 tasks were invalid;
    # at 100 draws EOT-PGD 40 x 16 passed every one of 13-18 valid examples, one step of eps / 10 none.
    binarization_draws: int = field(default=100, metadata={
        "flag": "--binarization-draws", "minimum": 1,
        "help": "forward passes a random model's features are averaged over in the binarization test"})

    def __post_init__(self):
        if not isinstance(self.binarization_draws, int) or self.binarization_draws < 1:
            raise ValueError("attack.indicators.binarization_draws: expected an integer >= 1, "
                             f"got {self.binarization_draws!r}")


# Keys of the flat [attack] table of earlier versions (spec files, run.json) -> (sub-table, key).
LEGACY_ATTACK_KEYS = {
    "pgd_steps": ("pgd", "steps"), "pgd_step_size": ("pgd", "step_size"), "restarts": ("pgd", "restarts"),
    "eot_samples": ("eot_pgd", "samples"), "apgd_iters": ("autoattack", "iterations"),
    "autoattack_attacks": ("autoattack", "attacks"), "square_queries": ("square", "queries"),
    "zo_steps": ("zeroth_order", "steps"), "zo_step_size": ("zeroth_order", "step_size"),
    "zo_sigma": ("zeroth_order", "sigma"), "zo_samples": ("zeroth_order", "samples"),
    "zo_max_batch": ("zeroth_order", "max_batch"), "zo_examples": ("zeroth_order", "examples"),
    "bpda_soft_tau": ("bpda_soft", "tau"), "indicator_examples": ("indicators", "examples"),
    "indicator_draws": ("indicators", "draws"), "indicator_steps": ("indicators", "steps"),
}


@dataclass
class AttackConfig:
    """What an evaluation runs. The budget of each attack is its own config dataclass, declared beside the
    attack in :mod:`topkconv.attacks` and held in ``budgets`` (one ``[attack.<name>]`` table each in a spec,
    e.g. ``[attack.pgd]``); :meth:`budget` reads one, with the attack's defaults for any not given."""
    suite: str = "paper"              # a suite of topkconv.attacks.SUITES: paper (FGSM + PGD) | full (+ the strong attacks)
    eps: float = 8.0                  # L-inf radius, 0-255 units
    extra_eps: list = field(default_factory=list)  # more radii for the paper's attacks (0-255 units)
    eps_curve: list = field(default_factory=lambda: [0, 2, 4, 8, 16, 32, 64])  # 0-255 units
    n_examples: Optional[int] = None  # attack only the first N test examples
    batch_size: int = 256
    seed: int = 0
    # Attacks run only on the examples that every white-box reference attack at eps left robust (AutoAttack's
    # cascade): the per-example worst case is the same, the cost is that of the survivors; their rows then
    # hold "white-box and this attack". Only attacks registered as cascadable. [] = every attack on every example.
    cascade_attacks: list = field(default_factory=list)
    indicators: IndicatorConfig = field(default_factory=IndicatorConfig)
    budgets: dict = field(default_factory=dict, metadata={"from_dict": "attack_budgets"})

    def __post_init__(self):
        if isinstance(self.indicators, dict):
            self.indicators = from_dict(IndicatorConfig, self.indicators, "attack.indicators")
        self.budgets = budgets_from_dict(self.budgets or {}, "attack")

    def budget(self, name: str):
        """The budget (config dataclass) of the attacks that read the ``[attack.<name>]`` table."""
        if name not in self.budgets:
            raise ValueError(f"attack.{name}: no such budget; expected one of {', '.join(sorted(self.budgets))}")
        return self.budgets[name]

    def with_budget(self, name: str, **changes) -> "AttackConfig":
        """A copy with fields of budget ``name`` replaced."""
        budgets = dict(self.budgets, **{name: dataclasses.replace(self.budget(name), **changes)})
        return dataclasses.replace(self, budgets=budgets)


def attack_config_with(cfg: AttackConfig, changes: dict, where: str = "attack") -> AttackConfig:
    """``cfg`` with ``changes``, an ``[attack]`` table (sub-tables merge key by key: ``{"pgd": {"steps": 3}}``
    changes PGD's steps only); unknown keys are errors naming them."""
    base, extra = attack_table_in_shape(dataclasses.asdict(cfg), where), attack_table_in_shape(changes, where)
    for table in ("indicators", "budgets"):
        extra[table] = {**base.get(table, {}), **extra.get(table, {})}
    for name, value in extra["budgets"].items():
        if isinstance(value, dict) and isinstance(base["budgets"].get(name), dict):
            extra["budgets"][name] = {**base["budgets"][name], **value}
    return from_dict(AttackConfig, {**base, **extra}, where)


def budgets_from_dict(data: dict, where: str) -> dict:
    """Every registered attack budget, from ``{name: table or dataclass}`` (unknown names and keys are errors
    naming them), with the attack's defaults for the budgets not given."""
    from .attacks.registry import budget_configs  # lazily: the attacks import torch

    configs = budget_configs()
    unknown = sorted(set(data) - set(configs))
    if unknown:
        raise ValueError(f"unknown key {where}.{unknown[0]!r}; expected an attack budget among "
                         f"{', '.join(sorted(configs))}")
    out = {}
    for name, config in configs.items():
        value = data.get(name, {})
        out[name] = value if isinstance(value, config) else from_dict(config, value, f"{where}.{name}",
                                                                      owner=f"attack {name!r}")
    return out


def attack_table_in_shape(data: dict, where: str = "attack") -> dict:
    """An ``[attack]`` table in AttackConfig's shape: ``[attack.<budget>]`` sub-tables go to ``budgets``, and
    the flat keys of earlier versions (``pgd_steps``, ``zo_samples`` ...) to their sub-table."""
    from .attacks.registry import budget_configs

    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a table, got {type(data).__name__}")
    out, budgets, names = {}, dict(data.get("budgets") or {}), set(budget_configs())
    for key, value in data.items():
        if key in LEGACY_ATTACK_KEYS:
            table, field_name = LEGACY_ATTACK_KEYS[key]
            target = out.setdefault("indicators", {}) if table == "indicators" else budgets.setdefault(table, {})
            target[field_name] = value
        elif key in names:
            budgets[key] = dict(budgets.get(key, {}), **value) if isinstance(value, dict) else value
        elif key == "indicators" and isinstance(value, dict):
            out["indicators"] = dict(out.get("indicators", {}), **value)
        elif key != "budgets":
            out[key] = value
    if budgets:
        out["budgets"] = budgets
    return out


@dataclass
class RunSpec:
    name: str = "run"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def hash(self) -> str:
        """Hash of everything that changes the trained weights (not the attacks)."""
        d = self.to_dict()
        d.pop("attack")
        d.pop("name")
        if not self.train.adversarial.enabled:  # so runs from before adversarial training keep their hash
            d["train"].pop("adversarial")
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]


# Keys earlier versions wrote that this version no longer reads -> why. A spec file that sets one gets an
# error saying so; a run.json that holds one (its attack section never changes the weights) is still loaded.
RETIRED_KEYS = {
    "attack.indicators.transfer_threshold": "baseline_transfer is a sign test against white-box PGD since "
                                            "363f8c3, with no threshold to set",
}


def without_retired_keys(data: dict) -> dict:
    """A copy of a stored spec (run.json) without the :data:`RETIRED_KEYS` an earlier version wrote."""
    out = copy.deepcopy(data)
    for dotted in RETIRED_KEYS:
        table, key = _dotted_parent(out, dotted, create=False)
        if table is not None:
            table.pop(key, None)
    return out


def _dotted_parent(table: dict, dotted: str, create: bool):
    """(the table that holds the last part of ``dotted``, that part) inside ``table``; missing tables on the
    way are added when ``create``, else the parent is None."""
    *sections, key = dotted.split(".")
    for part in sections:
        if not isinstance(table, dict):
            return None, key
        table = table.setdefault(part, {}) if create else table.get(part)
    return (table if isinstance(table, dict) else None), key


def from_dict(cls, data: dict, where: str = "", owner: str = ""):
    """Build dataclass ``cls`` from ``data``; an unknown key or a wrong type raises ValueError naming it.

    Types come from the field annotations: ``Union[int, float]`` keeps an int an int (a count) and a float
    a float (a fraction); a ``float`` field takes an int as a float. ``owner`` names whose keys these are
    in the unknown-key message (e.g. ``defense 'standard'``).
    """
    if not isinstance(data, dict):
        raise ValueError(f"{where or cls.__name__}: expected a table, got {type(data).__name__}")
    if cls is AttackConfig:
        data = attack_table_in_shape(data, where or "attack")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else key
        if key not in fields and path in RETIRED_KEYS:
            raise ValueError(f"{path} is no longer read: {RETIRED_KEYS[path]}; remove it")
        if key not in fields:
            expected = f"expected one of {sorted(fields)}" if fields else "it takes no options"
            raise ValueError(f"unknown key {path!r}{f' for {owner}' if owner else ''}; {expected}")
        if fields[key].metadata.get("from_dict") == "defense":
            kwargs[key] = defense_from_dict(value, path)
        elif fields[key].metadata.get("from_dict") == "attack_budgets":
            kwargs[key] = budgets_from_dict(value, where or "attack")
        else:
            kwargs[key] = _check_type(path, value, hints[key])
    return cls(**kwargs)  # a defence config checks its own values (errors name e.g. defense.dropout_p)


# The keys of the one flat defence config that run.json files of earlier versions hold for every defence.
_LEGACY_DEFENSE_KEYS = {"kind", "dropout_p", "fc_k", "fc_scope", "positive_only", "conv_layers", "conv_k",
                        "criterion", "sap_frac", "prune_scope", "prune_sparsity", "prune_epochs", "prune_lr"}


def defense_from_dict(data: dict, where: str = "model.defense"):
    """The chosen defence's config from a ``[model.defense]`` table: ``kind`` picks the dataclass."""
    from . import defenses

    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a table, got {type(data).__name__}")
    kind = data.get("kind", "standard")
    if kind not in defenses.REGISTRY:
        raise ValueError(f"{where}.kind: expected one of {', '.join(defenses.REGISTRY)}, got {kind!r}")
    defense = defenses.get(kind)
    options = {key: value for key, value in data.items() if key != "kind"}
    if set(data) == _LEGACY_DEFENSE_KEYS:  # a run.json of an earlier version: keep the chosen defence's keys
        known = set(defenses.config_fields(defense))
        options = {key: value for key, value in options.items() if key in known}
    return from_dict(defense.config, options, where, owner=f"defense {kind!r}")


def _check_type(path: str, value, hint):
    """``value`` checked against the annotation ``hint`` (int -> float for a float field only)."""
    if hint is Any:
        return value
    origin = typing.get_origin(hint)
    if origin is Union:
        options = typing.get_args(hint)
        if value is None:
            if type(None) in options:
                return None
            raise ValueError(f"{path}: expected {_describe(hint)}, got None")
        for option in options:  # an exact match first: 10 stays an int where int is allowed
            if option is not type(None) and _exact(value, option):
                return _check_type(path, value, option)
        for option in options:
            if option is not type(None):
                try:
                    return _check_type(path, value, option)
                except ValueError:
                    pass
        raise ValueError(f"{path}: expected {_describe(hint)}, got {value!r}")
    if origin in (list, tuple) or hint in (list, tuple):
        if not isinstance(value, list):
            raise ValueError(f"{path}: expected a list, got {value!r}")
        args = typing.get_args(hint)
        return [_check_type(f"{path}[{i}]", item, args[0]) for i, item in enumerate(value)] if args else value
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, path)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(hint, type) and not _exact(value, hint):
        raise ValueError(f"{path}: expected {_describe(hint)}, got {value!r}")
    return value


def _exact(value, hint) -> bool:
    if not isinstance(hint, type):
        return False
    if hint is bool or isinstance(value, bool):
        return hint is bool and isinstance(value, bool)
    return isinstance(value, hint)


def _describe(hint) -> str:
    if typing.get_origin(hint) is Union:
        return " or ".join(_describe(a) for a in typing.get_args(hint))
    names = {int: "an int", float: "a number", str: "a string", bool: "true or false", list: "a list",
             type(None): "nothing (unset)"}
    return names.get(hint, getattr(hint, "__name__", str(hint)))


def with_keys(table: dict, values: dict) -> dict:
    """A copy of ``table`` (a spec as read from TOML) with each dotted key of ``values`` set, e.g.
    ``{"model.defense.kind": "sap"}``: what the command line's flags change in a spec."""
    out = copy.deepcopy(table)
    for dotted, value in values.items():
        target, key = _dotted_parent(out, dotted, create=True)
        target[key] = value
    return out


def spec_from_dict(data: dict) -> RunSpec:
    return from_dict(RunSpec, data)
