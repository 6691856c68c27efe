"""Typed run configuration. One :class:`RunSpec` describes a whole run: data, model, training, attacks.

Specs are read from TOML (``experiments/*.toml``) or built in code; unknown keys are errors that name
the key, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Optional, Union

KSpec = Union[int, float]


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


@dataclass
class DefenseConfig:
    kind: str = "standard"            # standard | dropout | dynamic_k | topk_conv | tkc_neuron | sap | pruned
    dropout_p: float = 0.5            # dropout: p in the FC layers
    fc_k: list = field(default_factory=lambda: [250, 10])  # Dynamic-k: k per FC layer (count or fraction)
    fc_scope: str = "final2"          # Dynamic-k in the final FC layer only ("final") or both ("final2")
    positive_only: bool = False       # Dynamic-k: the paper's |R| <= k reading
    conv_layers: int = 2              # topk_conv / tkc_neuron: how many of the last convs are routed
    conv_k: KSpec = 0.1               # topk_conv / tkc_neuron: k as a fraction of the channels
    criterion: str = "max"            # topk_conv: "max" or "sum"
    sap_frac: float = 0.8             # sap: SAP-80
    prune_scope: str = "final"        # pruned: final | final2 | all
    prune_sparsity: float = 0.9       # pruned: final sparsity
    prune_epochs: int = 3             # pruned: fine-tuning epochs over which the schedule runs
    prune_lr: Optional[float] = None  # pruned: fine-tuning learning rate (None: a tenth of train.lr)


@dataclass
class ModelConfig:
    arch: str = "vgg-small"           # vgg16 (the paper's variant) | vgg-small (32 px, CPU)
    num_classes: int = 10
    in_channels: int = 3
    image_size: int = 32
    hidden: int = 512                 # width of the penultimate FC layer
    width: float = 1.0                # vgg-small: channel width multiplier
    batch_norm: Optional[bool] = None  # BatchNorm after each conv; None: the arch's default (vgg-small yes, vgg16 no)
    pretrained: Optional[str] = None  # local torchvision vgg16-397923af.pth for `features`
    mean: list = field(default_factory=lambda: [0.5, 0.5, 0.5])  # normalisation inside the model
    std: list = field(default_factory=lambda: [0.25, 0.25, 0.25])
    defense: DefenseConfig = field(default_factory=DefenseConfig)


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


@dataclass
class AttackConfig:
    suite: str = "paper"              # paper (FGSM + PGD) | full (+ AutoAttack, Square, transfer, EOT, BPDA, checks)
    eps: float = 8.0                  # L-inf radius, 0-255 units
    extra_eps: list = field(default_factory=list)  # more radii to report (0-255 units)
    pgd_steps: int = 16
    pgd_step_size: float = 0.75       # 0-255 units
    restarts: int = 1
    eot_samples: int = 20             # EOT draws for stochastic defences
    eps_curve: list = field(default_factory=lambda: [0, 2, 4, 8, 16, 32, 64])  # 0-255 units
    n_examples: Optional[int] = None  # attack only the first N test examples
    batch_size: int = 256
    seed: int = 0
    apgd_iters: int = 100             # AutoAttack's APGD/FAB iterations (100 = AutoAttack; lower = quick preset)
    square_queries: int = 5000        # Square's query budget (5000 = AutoAttack; lower = quick preset)
    autoattack_attacks: list = field(default_factory=list)  # [] = the version's own; e.g. ["apgd-ce", "apgd-t"] (quick)


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
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]


def from_dict(cls, data: dict, where: str = ""):
    """Build dataclass ``cls`` from ``data``; an unknown key or a wrong type raises ValueError naming it."""
    if not isinstance(data, dict):
        raise ValueError(f"{where or cls.__name__}: expected a table, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else key
        if key not in fields:
            raise ValueError(f"unknown key {path!r}; expected one of {sorted(fields)}")
        default = fields[key].default
        if default is dataclasses.MISSING and fields[key].default_factory is not dataclasses.MISSING:
            default = fields[key].default_factory()
        if dataclasses.is_dataclass(default):
            kwargs[key] = from_dict(type(default), value, path)
        else:
            kwargs[key] = _check_type(path, value, default)
    return cls(**kwargs)


def _check_type(path: str, value, default):
    if default is None or value is None:
        return value
    if isinstance(default, bool) != isinstance(value, bool):
        raise ValueError(f"{path}: expected a {type(default).__name__}, got {value!r}")
    if isinstance(default, (int, float)) and not isinstance(value, (int, float)):
        raise ValueError(f"{path}: expected a number, got {value!r}")
    if isinstance(default, str) and not isinstance(value, str):
        raise ValueError(f"{path}: expected a string, got {value!r}")
    if isinstance(default, list) and not isinstance(value, list):
        raise ValueError(f"{path}: expected a list, got {value!r}")
    if isinstance(default, float) and isinstance(value, int):
        return float(value)
    return value


def spec_from_dict(data: dict) -> RunSpec:
    return from_dict(RunSpec, data)
