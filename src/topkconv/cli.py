"""Command line: argument parsing only; the work is done in the library modules.

Each sub-command has one ``_add_<name>`` function that declares its arguments and points at a
``_run_<name>`` function, which imports the library lazily so ``topkconv --help`` stays fast.
"""

from __future__ import annotations

import argparse
import sys

from . import __version__


def _add_train(sub) -> None:
    p = sub.add_parser(
        "train", help="train a model (a RunSpec from --spec and/or flags) into a run folder",
        description="Train a model (a VGG, or any torchvision classifier) with a registered defence on a data set. Flags override the --spec file's values. The run "
                    "folder gets model.safetensors and the training state after every epoch, metrics.jsonl, and "
                    "run.json when the run is complete. Under torchrun it trains data-parallel "
                    "(torchrun --nproc_per_node=N -m topkconv.cli train ...).")
    p.add_argument("--spec", metavar="TOML", help="a RunSpec as TOML ([data], [model], [model.defense], [train])")
    p.add_argument("--out", metavar="DIR", help="run folder (default runs/<spec hash>)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last finished epoch; with a larger --epochs, extend "
                        "a finished run")
    p.add_argument("--force", action="store_true",
                   help="replace a finished run in --out (it stays intact until the new run's first epoch is done)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    data = p.add_argument_group("data")
    data.add_argument("--dataset", choices=("digits", "fashion-mnist", "fashion-mnist-val", "cifar10", "cinic10",
                                            "imagefolder"), help="data.name")  # = data.LOADERS (a test checks)
    data.add_argument("--data-root", metavar="DIR", help="data.root: the folder of a local data set (fashion-mnist: "
                      "default /usr/share/datasets/fashion-mnist, where Debian's dataset-fashion-mnist puts it)")
    data.add_argument("--image-size", type=_at_least(1), help="data.image_size: resize to this many pixels (paper: 224)")
    data.add_argument("--no-augment", action="store_true", help="no random crop and flip")
    data.add_argument("--limit-train", type=_at_least(1), help="use only the first N training images")
    data.add_argument("--limit-test", type=_at_least(1), help="use only the first N test images")
    data.add_argument("--workers", type=_at_least(0), help="loader workers for streamed data sets (0: none)")
    model = p.add_argument_group("model")
    model.add_argument("--model", dest="arch", type=_arch_value, metavar="ARCH",
                       help="model.arch: vgg-small, vgg16, or torchvision:NAME (any torchvision classifier, e.g. "
                            "torchvision:resnet18; weights=None; needs the `vision` extra)")
    model.add_argument("--width", type=_positive_number, help="vgg-small channel width multiplier")
    model.add_argument("--hidden", type=_at_least(1), help="width of the penultimate FC layer")
    model.add_argument("--batch-norm", action=argparse.BooleanOptionalAction, default=None,
                       help="BatchNorm after each conv (default: on for vgg-small, off for vgg16)")
    model.add_argument("--pretrained", metavar="FILE", help="torchvision's vgg16-397923af.pth for `features`")
    p.later(_add_defense_options)  # from the defence registry, added when `train` is parsed
    train = p.add_argument_group("training")
    train.add_argument("--epochs", type=_at_least(1))
    train.add_argument("--batch-size", type=_at_least(1), help="global batch (split across torchrun processes)")
    train.add_argument("--lr", type=_positive_number)
    train.add_argument("--weight-decay", type=float)
    train.add_argument("--schedule", choices=("cosine", "step"))
    train.add_argument("--warmup-epochs", type=_non_negative_number)
    train.add_argument("--seed", type=int)
    train.add_argument("--device", choices=("auto", "cpu", "cuda"))
    train.add_argument("--amp", action="store_true", help="bf16 autocast (CUDA only)")
    adv = p.add_argument_group("adversarial training ([train.adversarial]; radii in 0-255 units)")
    adv.add_argument("--adversarial", choices=("none", "pgd", "trades", "fgsm"),
                     help="pgd (Madry et al.), trades (Zhang et al.) or fgsm (fast, Wong et al.); default none")
    adv.add_argument("--adv-eps", type=_positive_number, help="training radius (default 8)")
    adv.add_argument("--adv-steps", type=_at_least(1), help="inner steps of pgd and trades (default 10)")
    adv.add_argument("--adv-step-size", type=_positive_number,
                     help="inner step (default 2.5 * eps / steps; fgsm: 1.25 * eps)")
    adv.add_argument("--adv-beta", type=_positive_number, help="trades: weight of the KL term (default 6)")
    adv.add_argument("--adv-check-examples", type=_at_least(0),
                     help="PGD-10 check after each epoch on the first N test images (default 200; 0: off)")
    p.set_defaults(func=_run_train)


def _at_least(minimum: int):
    """An argparse type: an integer >= ``minimum``; argparse names the flag in its error."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {value}")
        return value

    parse.__name__ = f"integer >= {minimum}"
    return parse


def _number(text: str) -> float:
    import math

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _positive_number(text: str) -> float:
    value = _number(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text}")
    return value


def _share(text: str) -> float:
    value = _number(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a share in (0, 1], got {text}")
    return value


def _non_negative_number(text: str) -> float:
    value = _number(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text}")
    return value


def _arch_value(text: str) -> str:
    """``--model``: a VGG plan's name or ``torchvision:NAME``."""
    from .models.vgg import PLANS

    if text in PLANS or (text.startswith("torchvision:") and len(text) > len("torchvision:")):
        return text
    raise argparse.ArgumentTypeError(f"expected one of {', '.join(PLANS)} or torchvision:NAME, got {text!r}")


class _Parser(argparse.ArgumentParser):
    """Every parser of the CLI: an argument error is one line naming the flag (argparse's default prints the
    whole usage first), and :meth:`later` adds arguments on first use, so that building the parser
    (``topkconv --help``, other commands) does not import torch through the registries."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._later: list = []

    def later(self, add) -> None:
        """``add(parser)`` runs when this parser first parses or prints its help."""
        self._later.append(add)

    def _add_later(self) -> None:
        while self._later:
            self._later.pop(0)(self)

    def parse_known_args(self, args=None, namespace=None):
        self._add_later()
        return super().parse_known_args(args, namespace)

    def format_help(self):
        self._add_later()
        return super().format_help()

    def format_usage(self):
        self._add_later()
        return super().format_usage()

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _add_defense_options(parser) -> None:
    """``--defense`` (the registry's names) and one flag per defence option, made from the registered config
    dataclasses: ``--conv-k`` sets ``conv_k`` and so on. Which defence uses a flag is checked in ``_run_train``."""
    import dataclasses
    import typing

    from . import defenses

    group = parser.add_argument_group("defence (options of the registered defences)")
    group.add_argument("--defense", choices=tuple(defenses.REGISTRY), metavar="DEFENSE",
                       help="model.defense.kind: " + "; ".join(f"{d.name} ({d.description})" if d.description
                                                               else d.name for d in defenses.REGISTRY.values()))
    added = set()
    for entry in defenses.REGISTRY.values():
        hints = typing.get_type_hints(entry.config)
        for field in dataclasses.fields(entry.config):
            if field.name == "kind" or field.name in added:
                continue
            added.add(field.name)
            users = [d.name for d in defenses.REGISTRY.values() if field.name in defenses.config_fields(d)]
            help_text = field.metadata.get("help", field.name)
            parsing = _option_parsing(hints[field.name], field.metadata)
            if "type" in parsing and "nargs" not in parsing:
                parsing["metavar"] = field.name.upper()
            group.add_argument(_option_flag(field.name), dest=f"defense_{field.name}", default=None,
                               help=f"{help_text} [{', '.join(users)}]", **parsing)


def _option_flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _option_parsing(hint, metadata) -> dict:
    """argparse keywords for a config field of type ``hint``: a k (count or fraction), a list, a flag ..."""
    import typing

    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) is typing.Union and len(args) == 1:  # Optional[X]
        hint = args[0]
    if hint is bool:
        return {"action": argparse.BooleanOptionalAction}
    if typing.get_origin(hint) in (list, tuple):
        item = (typing.get_args(hint) or (str,))[0]
        return {"nargs": "+", "metavar": metadata.get("metavar", "VALUE"), **_option_parsing(item, {})}
    if set(typing.get_args(hint)) == {int, float}:
        return {"type": _k_value}
    if "choices" in metadata:
        return {"choices": tuple(metadata["choices"])}
    return {"type": {int: int, float: _number}.get(hint, str)}


def _defense_options(args, spec: dict) -> dict:
    """The defence options given as flags, checked against the chosen defence (errors name the flag)."""
    from . import defenses

    given = _defense_flags_given(args)
    kind = spec.get("model", {}).get("defense", {}).get("kind", "standard")
    if not given or kind not in defenses.REGISTRY:
        return given  # an unknown kind from a spec file is reported by the spec parser
    known = defenses.config_fields(defenses.get(kind))
    for name, value in given.items():
        if name not in known:
            raise ValueError(f"{_option_flag(name)}: defense {kind!r} has no option {name} "
                             f"(its options: {', '.join(_option_flag(k) for k in known) or 'none'})")
        try:
            defenses.make_config(kind, **{name: value})
        except ValueError as err:
            raise ValueError(f"{_option_flag(name)}: {err}") from None
    return given


def _defense_flags_given(args) -> dict:
    """``{option: value}`` of the defence flags given (their dests are ``defense_<option>``)."""
    return {dest[len("defense_"):]: value for dest, value in vars(args).items()
            if dest.startswith("defense_") and value is not None}


def _k_value(text: str):
    """A k on the command line: ``250`` is a count, ``0.01`` a fraction."""
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a count or a fraction, got {text!r}") from None


_TRAIN_FLAGS = {  # CLI destination -> (spec section, key)
    "dataset": ("data", "name"), "data_root": ("data", "root"), "image_size": ("data", "image_size"),
    "limit_train": ("data", "limit_train"), "limit_test": ("data", "limit_test"), "workers": ("data", "workers"),
    "arch": ("model", "arch"), "width": ("model", "width"), "hidden": ("model", "hidden"), "batch_norm": ("model", "batch_norm"),
    "pretrained": ("model", "pretrained"), "defense": ("model.defense", "kind"),  # + the defence options
    "epochs": ("train", "epochs"), "batch_size": ("train", "batch_size"), "lr": ("train", "lr"),
    "weight_decay": ("train", "weight_decay"), "schedule": ("train", "schedule"),
    "warmup_epochs": ("train", "warmup_epochs"), "seed": ("train", "seed"), "device": ("train", "device"),
    "adversarial": ("train.adversarial", "method"), "adv_eps": ("train.adversarial", "eps"),
    "adv_steps": ("train.adversarial", "steps"), "adv_step_size": ("train.adversarial", "step_size"),
    "adv_beta": ("train.adversarial", "beta"), "adv_check_examples": ("train.adversarial", "check_examples"),
}


def _run_train(args) -> int:
    from . import distributed
    from .checkpoint import requested_spec
    from .config import spec_from_dict, with_keys
    from .errors import UserError
    from .io import read_toml
    from .train import fit

    if args.resume and not args.out:
        raise UserError("--resume needs --out DIR: the run folder to continue")
    if args.resume and args.force:
        raise UserError("--resume and --force: choose one (continue the run in --out, or replace it)")
    spec = read_toml(args.spec, "spec file") if args.spec else {}
    flags = _train_flags(args)
    if args.resume and not args.spec:
        # `train --out DIR --resume [--epochs N]` continues (or extends) DIR's own run; other flags override it.
        spec = requested_spec(args.out, required=not flags) or spec
    spec = with_keys(spec, flags)
    spec = with_keys(spec, {f"model.defense.{k}": v for k, v in _defense_options(args, spec).items()})
    try:
        run_spec = spec_from_dict(spec)
    except ValueError as err:
        raise ValueError(f"{args.spec}: {err}" if args.spec else str(err)) from None
    out = args.out or f"runs/{run_spec.hash()}"
    _, summary = fit(run_spec, out, resume=args.resume, progress=not args.no_progress, force=args.force)
    if distributed.context().is_main:
        print(f"trained {run_spec.model.arch} ({run_spec.model.defense.kind}) on {run_spec.data.name}: "
              f"test accuracy {summary['test_acc']:.4f} after {summary['epochs']} epochs -> {out}")
    return 0


def _train_flags(args) -> dict:
    """The spec keys the train flags set, dotted (``{"data.name": "digits", ...}``); defence options apart."""
    flags = {f"{section}.{key}": getattr(args, dest) for dest, (section, key) in _TRAIN_FLAGS.items()
             if getattr(args, dest) is not None}
    if args.no_augment:
        flags["data.augment"] = False
    if args.amp:
        flags["train.amp"] = True
    return dict(flags, **{f"model.defense.{k}": v for k, v in _defense_flags_given(args).items()})


def _add_evaluate(sub) -> None:
    p = sub.add_parser(
        "evaluate", help="attack a trained checkpoint: the paper's FGSM/PGD, or the full suite with masking checks",
        description="Attack a checkpoint (or your own model: --model MODULE:FACTORY --weights FILE.safetensors "
                    "--dataset NAME) on its test set and write eval.json (clean accuracy, each attack, the "
                    "per-example worst case at every eps, the masking indicators with values and thresholds, one "
                    "verdict line, the config, seed, n and timings), eval.md (the same, verdict first) and "
                    "acc-vs-eps.png. eps and step sizes are in 0-255 units. paper: FGSM and PGD-16 (step 0.75) "
                    "at eps from a zero and a random start ('pgd' is the per-example worst of the two). full: also "
                    "AutoAttack, Square, transfer from --surrogate, the zeroth-order attack that broke k-WTA, "
                    "EOT-PGD (stochastic models), dense and soft BPDA (top-k models), doubled steps/restarts, an "
                    "eps curve and the indicators. Under torchrun the examples are shared out "
                    "(torchrun --nproc_per_node=N -m topkconv.cli evaluate ...).")
    p.add_argument("checkpoint", metavar="CHECKPOINT", nargs="?",
                   help="run folder (or its model.safetensors); or give --model, --weights and --dataset")
    p.add_argument("--suite", default="paper", choices=("paper", "full"), help="attack suite (default paper)")
    p.add_argument("--surrogate", metavar="BASELINE_RUN_DIR", help="undefended model for the transfer attack")
    own = p.add_argument_group("your own model (instead of CHECKPOINT)")
    own.add_argument("--model", metavar="MODULE:FACTORY",
                     help="'package.module:factory' or 'file.py:factory': called with no arguments, it returns an "
                          "nn.Module taking images in [0, 1] (normalisation inside)")
    own.add_argument("--weights", metavar="FILE", help="its weights, a .safetensors file (never a pickle)")
    own.add_argument("--dataset", metavar="NAME", help="test set to attack: digits, fashion-mnist, cifar10, cinic10, "
                                                      "imagefolder")
    own.add_argument("--data", dest="data_root", metavar="PATH", help="folder of the data set (not for digits)")
    own.add_argument("--image-size", type=_at_least(1), help="image size the model takes (default 32)")
    p.add_argument("--n", "--n-examples", dest="n", type=_at_least(1), metavar="N",
                   help="attack only the first N test examples (under torchrun spell it --n-examples: "
                        "torchrun reads --n as one of its own options)")
    p.add_argument("--eps", type=float, help="L-inf radius in 0-255 units (default: the run's, 8)")
    p.add_argument("--extra-eps", type=float, nargs="+", metavar="EPS", help="more radii (0-255) for FGSM/PGD")
    p.add_argument("--eps-curve", type=float, nargs="+", metavar="EPS",
                   help=f"radii (0-255) of the curve (default {_attack_default('eps_curve')})")
    p.add_argument("--batch-size", type=_at_least(1),
                   help=f"examples per attack batch (default {_attack_default('batch_size')})")
    p.later(_add_attack_options)  # from the attack registry, added when `evaluate` is parsed
    p.add_argument("--seed", type=int, help=f"seed of every random draw (default {_attack_default('seed')})")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--out", metavar="FILE", help="eval.json path (default CHECKPOINT/eval.json)")
    p.add_argument("--allow-unfinished", action="store_true",
                   help="evaluate the last finished epoch of a run that stopped early (killed, or a NaN loss)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument("--curves", type=_at_least(0), metavar="N",
                   help="attack-strength curves (PGD steps 10-1000, restarts 1-10, eps 1-32 and unbounded, "
                        "zeroth-order pairs up to --curves-zo-share of the reference's) on the first N test examples: "
                        "strength-curves.json and .png beside eval.json (default: 20 with --suite full, none with "
                        "--suite paper; 0: none)")
    p.add_argument("--curves-zo-share", type=_share, metavar="SHARE",
                   help="the zeroth-order curve's largest share of the reference budget, in (0, 1] (default 0.01; "
                        "1 = the reference: over a million forward passes an example)")
    p.set_defaults(func=_run_evaluate)


def _attack_default(name: str, config=None):
    """A config field's default as the help shows it (from the dataclass: the one place it is written)."""
    import dataclasses

    from .config import AttackConfig

    field = next(f for f in dataclasses.fields(config or AttackConfig) if f.name == name)
    value = field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default
    if isinstance(value, list):
        return " ".join(":".join(map(str, v)) if isinstance(v, list) else str(v) for v in value) or "none"
    return "unset" if value is None else value


def _add_attack_options(parser) -> None:
    """``--cascade-attacks`` (the registry's cascadable attacks) and one flag per field of every attack's
    budget dataclass (``[attack.<budget>]``) and of the indicators' settings that name a flag: the flag is the
    field's ``flag`` metadata, else ``--<budget>-<field>``; its help ends with the dataclass default."""
    import dataclasses

    from .attacks import registry
    from .config import IndicatorConfig

    group = parser.add_argument_group("attacks (budgets of the registered attacks; spec: [attack.<name>])")
    group.add_argument("--cascade-attacks", nargs="+", metavar="NAME", choices=registry.cascadable(),
                       help="run these only on the examples every white-box reference attack left robust "
                            "(AutoAttack's cascade: same worst case, less cost): " + ", ".join(registry.cascadable()))
    tables = dict(registry.budget_configs(), indicators=IndicatorConfig)
    for table, config in tables.items():
        for field in dataclasses.fields(config):
            if table == "indicators" and "flag" not in field.metadata:
                continue  # the thresholds stay in the spec's [attack.indicators]
            flag = field.metadata.get("flag") or _option_flag(f"{table}_{field.name}")
            help_text = f"{field.metadata.get('help', field.name)} (default {_attack_default(field.name, config)})"
            group.add_argument(flag, dest=f"attack__{table}__{field.name}", default=None,
                               help=help_text.replace("%", "%%"), **_budget_parsing(config, field))


def _budget_parsing(config, field) -> dict:
    """argparse keywords for a budget field: its type, with the metadata's bounds, choices and parser."""
    import typing

    metadata = field.metadata
    if metadata.get("parse") == "sample_schedule":
        return {"type": _sample_step, "nargs": "+", "metavar": metadata.get("metavar", "VALUE"),
                "action": _ScheduleAction}
    hint = typing.get_type_hints(config)[field.name]
    parsing = _option_parsing(list[str] if hint is list else hint, metadata)
    if parsing.get("type") is int and "minimum" in metadata:
        parsing["type"] = _at_least(metadata["minimum"])
    elif parsing.get("type") is _number and metadata.get("positive"):
        parsing["type"] = _positive_number
    if "choices" in metadata and "nargs" in parsing:
        parsing.update(choices=tuple(metadata["choices"]), type=str)
    parsing.setdefault("metavar", metadata.get("metavar") or field.name.upper()) if "type" in parsing else None
    return parsing


def _attack_overrides(args) -> dict:
    """The attack flags given, as an ``[attack]`` table: ``{"pgd": {"steps": 3}, "seed": 1, ...}``."""
    changes: dict = {}
    for name in ("extra_eps", "eps_curve", "batch_size", "seed", "cascade_attacks"):
        if getattr(args, name, None) is not None:
            changes[name] = getattr(args, name)
    for dest, value in vars(args).items():
        if dest.startswith("attack__") and value is not None:
            _, table, field = dest.split("__")
            changes.setdefault(table, {})[field] = value
    return changes


def _sample_step(text: str):
    """``--zo-samples 0:100``: from step 0 on, 100 noise pairs per step; or a schedule's name."""
    from .attacks.zeroth_order import SCHEDULES

    if text in SCHEDULES:
        return text
    start, sep, count = text.partition(":")
    if not sep or not start.isdigit() or not count.isdigit() or int(count) < 1:
        raise argparse.ArgumentTypeError(f"expected FROM_STEP:PAIRS such as 0:100, or one of "
                                         f"{', '.join(SCHEDULES)}, got {text!r}")
    return [int(start), int(count)]


class _ScheduleAction(argparse.Action):
    """A sample schedule: ``FROM:PAIRS ...`` pairs, or one schedule name standing alone."""

    def __call__(self, parser, namespace, values, option_string=None):
        names = [value for value in values if isinstance(value, str)]
        if names and len(values) > 1:
            parser.error(f"argument {option_string}: a schedule's name ({names[0]}) stands alone")
        setattr(namespace, self.dest, names[0] if names else values)


def _run_evaluate_user_model(args, overrides: dict) -> int:
    """``evaluate --model MODULE:FACTORY --weights FILE --dataset NAME``: the user's own model."""
    import dataclasses

    from .checkpoint import EVAL_FILE
    from .config import AttackConfig, DataConfig, attack_config_with
    from .evaluate import evaluate_user_model

    if args.checkpoint is not None:
        raise ValueError(f"evaluate: give either CHECKPOINT ({args.checkpoint}) or --model, not both")
    missing = [flag for flag, value in (("--weights", args.weights), ("--dataset", args.dataset)) if value is None]
    if missing:
        raise ValueError(f"evaluate --model: also needs {' and '.join(missing)}")
    data = DataConfig(name=args.dataset, root=args.data_root, augment=False,
                      **({"image_size": args.image_size} if args.image_size else {}))
    changes = dict(overrides, suite=args.suite, **({"n_examples": args.n} if args.n else {}),
                   **({"eps": float(args.eps)} if args.eps is not None else {}))
    out = _writable_output(args.out or EVAL_FILE)
    cfg = attack_config_with(AttackConfig(), changes)
    result = evaluate_user_model(args.model, args.weights, data, cfg, out=out, surrogate_dir=args.surrogate,
                                 device=args.device, progress=not args.no_progress)
    _print_evaluation(result)
    from .evaluate.curves import curves_for_user_model

    _strength_curves(args, out, lambda: curves_for_user_model(
        args.model, args.weights, data, cfg, args.curves, out, device=args.device,
        zo_share=args.curves_zo_share))
    return 0


def _print_evaluation(result: dict) -> None:
    from . import distributed
    from .report import verdict_line

    if distributed.context().is_main:
        attacks = ", ".join(f"{name} {a['accuracy']:.4f}" for name, a in result["attacks"].items())
        print(f"{verdict_line(result['verdict'])}\nn={result['n_examples']} clean {result['clean']:.4f}; {attacks}; "
              f"worst case {result['worst_case']['accuracy']:.4f}")
        drawn = (result.get("over_draws") or {}).get("worst_case")
        if drawn:
            print(f"random model: worst case expected over {drawn['draws']} draws {drawn['expected']:.4f} "
                  f"[{drawn['interval'][0]:.4f}, {drawn['interval'][1]:.4f}], worst draw {drawn['worst']:.4f}")


def _run_evaluate(args) -> int:
    from .checkpoint import EVAL_FILE, run_folder
    from .evaluate import evaluate_run

    overrides = _attack_overrides(args)
    args.curves = _curve_examples(args)
    if args.model is not None:
        return _run_evaluate_user_model(args, overrides)
    if args.checkpoint is None:
        raise ValueError("evaluate: give a CHECKPOINT (run folder), or --model, --weights and --dataset")
    out = _writable_output(args.out or run_folder(args.checkpoint) / EVAL_FILE)  # before any attack runs
    from .evaluate.curves import curves_for_run

    with _run_lock_if_main(out.parent):  # the curves too: they are files of this evaluation
        result = evaluate_run(args.checkpoint, suite=args.suite, surrogate_dir=args.surrogate, n_examples=args.n,
                              eps=args.eps, out=out, overrides=overrides, device=args.device,
                              progress=not args.no_progress, allow_unfinished=args.allow_unfinished)
        _print_evaluation(result)
        _strength_curves(args, out, lambda: curves_for_run(
            args.checkpoint, args.curves, out, eps=args.eps, overrides=overrides, device=args.device,
            allow_unfinished=args.allow_unfinished, zo_share=args.curves_zo_share))
    return 0


def _curve_examples(args) -> int:
    """``evaluate --curves``: N as given, else the full suite's default (strength curves are part of it)."""
    from .evaluate.curves import FULL_SUITE_EXAMPLES

    examples = args.curves if args.curves is not None else FULL_SUITE_EXAMPLES if args.suite == "full" else 0
    if args.curves_zo_share is not None and not examples:
        raise ValueError("evaluate --curves-zo-share: draws no curve without --curves N (or --suite full)")
    return examples


def _strength_curves(args, out, draw) -> None:
    """``draw()`` the curves beside the evaluation ``out`` when ``--curves`` asks for them, in one process (they
    are not split across ranks)."""
    from . import distributed
    from .checkpoint import CURVES_FILE, beside

    if args.curves and distributed.context().is_main:
        curves = draw()
        print(f"strength curves ({beside(out, CURVES_FILE)}, n = {curves['n']}): {curves['text']}")


def _writable_output(path):
    """``evaluate --out``: a file path whose folder can be written (checked before any compute)."""
    from pathlib import Path

    from .errors import UserError
    from .io import check_writable_file

    path = Path(path)
    if path.is_dir():
        raise UserError(f"--out {path}: is a folder; expected a file path such as {path / 'eval.json'}")
    return check_writable_file(path, "--out")


def _run_lock_if_main(folder):
    """The run folder's lock, held by the process that writes (rank 0 under torchrun)."""
    import contextlib

    from . import distributed
    from .checkpoint import run_lock

    return run_lock(folder) if distributed.context().is_main else contextlib.nullcontext()


def _add_prune(sub) -> None:
    p = sub.add_parser(
        "prune", help="gradual magnitude pruning of a trained standard model, fine-tuning its FC layers",
        description="Prune a trained standard checkpoint by weight magnitude (per layer) on Zhu and Gupta's cubic "
                    "schedule over the fine-tuning epochs, with the conv kernels frozen and only the FC layers "
                    "updated; then make the masks permanent and save a checkpoint whose run.json reports the "
                    "measured sparsity of each pruned layer.")
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="run folder (or its model.safetensors) of a standard model")
    p.add_argument("--scope", default="final", choices=("final", "final2", "all"),
                   help="layers pruned: the last FC layer, both FC layers, or every conv and FC layer (default final)")
    p.add_argument("--sparsity", type=float, default=0.9,
                   help="final fraction of zero weights in each pruned layer, in [0, 1) (default 0.9)")
    p.add_argument("--epochs", type=_at_least(1), default=3, help="fine-tuning epochs the schedule runs over (default 3)")
    p.add_argument("--lr", type=float, default=None, help="fine-tuning learning rate (default: a tenth of the "
                                                          "source run's train.lr)")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for the pruned run")
    p.add_argument("--force", action="store_true",
                   help="replace a finished run in --out (it stays intact until the pruned run is complete)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=_run_prune)


def _run_prune(args) -> int:
    import json

    from .checkpoint import read_run_json
    from .config import spec_from_dict
    from .pruning import prune_run, pruned_spec

    source = spec_from_dict(read_run_json(args.checkpoint)["spec"])
    spec = pruned_spec(source, args.scope, args.sparsity, args.epochs, lr=args.lr)
    with _run_lock_if_main(args.out):
        _, summary = prune_run(args.checkpoint, spec, args.out, progress=not args.no_progress,
                                 force=args.force)
    print(json.dumps({k: summary[k] for k in ("scope", "sparsity", "test_acc_before", "test_acc")}, indent=2))
    return 0


def _add_reproduce(sub) -> None:
    p = sub.add_parser(
        "reproduce", help="train, attack and report a table or the figures of the paper",
        description="Train every model of a paper table (cached by spec hash under OUT/runs/<hash>/), attack "
                    "it, and write OUT/reports/<table>.md/.csv with our numbers beside the paper's. With no "
                    "arguments: Table III on the quick preset and the embedded digits.")
    p.add_argument("target", nargs="?", default="table3",
                   choices=("table1", "table2", "table3", "tableat", "figures", "all"),  # = TARGETS (a test checks)
                   help="what to make (default table3); tableat: the project's adversarial-training table (quick "
                        "preset only, about 25 minutes on 2 cores); all: the paper's three tables and the figures")
    p.add_argument("--preset", default="quick", choices=("quick", "paper", "fashion", "cifar10"),
                   help="quick: digits + small VGG on a CPU; paper: CINIC-10 + VGG16 at 224 px (GPUs); fashion: "
                        "Fashion-MNIST + small VGG on a CPU; cifar10: Table III, full-width small VGG (a GPU)")
    p.add_argument("--spec", default=None, metavar="FILE",
                   help="a table spec TOML to use instead of the shipped topkconv/experiments/<table>-<preset>.toml")
    p.add_argument("--data", default=None, metavar="PATH", help="root folder of the data set (paper: CINIC-10)")
    p.add_argument("--pretrained", default=None, metavar="PATH",
                   help="torchvision's vgg16-397923af.pth to initialise VGG16's features")
    p.add_argument("--out", default=".", metavar="DIR", help="where runs/ and reports/ go (default: .)")
    p.add_argument("--force", action="store_true", help="retrain and re-attack even when cached")
    _add_seeds_and_jobs(p)
    p.add_argument("--no-progress", action="store_true", help="hide the one-line-per-job progress")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default=None,
                   help="train.device for every run (default: the spec's, auto)")
    p.add_argument("--yes", action="store_true", help="go on with --preset paper on a machine without a GPU")
    p.add_argument("--zo-reference", action="store_true",
                   help="the zeroth-order attack at its reference budget in every run (Tramer et al. 2020: 100 "
                        "steps of 0.01 from 50, 500 then 10,000 noise pairs) on every example the white-box "
                        "attacks leave robust: with the verdict presets' other reference budgets, a verdict that "
                        "is not provisional. A GPU job: on one CPU core 7-9 minutes for each example it cannot "
                        "break (measured on the quick routing models); the trainings are reused")
    p.set_defaults(func=_run_reproduce)


def _add_seeds_and_jobs(p) -> None:
    p.add_argument("--seeds", type=int, default=None, metavar="N",
                   help="training seeds per column (default: the spec's `seeds`, 3); each (column, seed) is its "
                        "own cached run, and every cell gets a 95%% interval over seeds and test examples")
    p.add_argument("--jobs", type=int, default=None, metavar="N",
                   help="worker processes for the independent trainings and evaluations (default: the number "
                        "of CPU cores, or 1 when a GPU is used; capped at the CPUs and at what the free memory "
                        "holds); --jobs 2 gives the same reports as --jobs 1")


def _run_reproduce(args) -> int:
    from .reproduce import reproduce
    from .reproduce.driver import refuse_paper_preset_without_gpu

    if args.preset == "paper" and not args.yes and args.device != "cpu":
        refuse_paper_preset_without_gpu()
    overrides = {"train": {"device": args.device}} if args.device else {}
    if args.zo_reference:
        from .attacks.zeroth_order import reference_budget

        overrides["attack"] = {"zeroth_order": reference_budget()}
    reproduce(args.target, preset=args.preset, data=args.data, pretrained=args.pretrained, out=args.out,
              force=args.force, progress=not args.no_progress, spec_file=args.spec, seeds=args.seeds,
              jobs=args.jobs, overrides=overrides or None)
    return 0


def _add_sweep(sub) -> None:
    p = sub.add_parser(
        "sweep", help="train and attack a table's columns over values of any spec key, over seeds",
        description="Train and attack the columns of a table (default Table III) for every VALUE of KEY, a dotted "
                    "spec key (model.defense.conv_k, model.width, train.epochs), each (value, column, seed) its own "
                    "cached run; every value is checked before the first training. Writes "
                    "OUT/reports/sweep-<KEY>.md/.csv/.json/.png: clean, paper-attack and worst-case accuracy with "
                    "95%% intervals, and the verdicts on the table's claims at each value.")
    p.add_argument("key", nargs="?", metavar="KEY", help="a dotted spec key, e.g. model.defense.conv_k")
    p.add_argument("values", nargs="*", metavar="VALUE",
                   help="values, read as TOML: 10 (a count), 0.1, [0.05, 0.1], true, text")
    p.add_argument("--columns", nargs="+", default=None, metavar="LABEL",
                   help="the table's columns to vary (default: the spec's sweep_columns, else every reproduced column)")
    p.add_argument("--table", default="table3", choices=("table1", "table2", "table3", "tableat"))  # = TABLES
    p.add_argument("--preset", default="quick", choices=("quick", "paper", "fashion", "cifar10"))
    p.add_argument("--spec", default=None, metavar="FILE", help="a table spec TOML instead of <table>-<preset>.toml")
    p.add_argument("--data", default=None, metavar="PATH")
    p.add_argument("--pretrained", default=None, metavar="PATH")
    p.add_argument("--out", default=".", metavar="DIR")
    p.add_argument("--force", action="store_true")
    _add_seeds_and_jobs(p)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_run_sweep)


def _run_sweep(args) -> int:
    from .reproduce.sweep import sweep

    options = dict(data=args.data, pretrained=args.pretrained, out=args.out, force=args.force,
                   progress=not args.no_progress, seeds=args.seeds, jobs=args.jobs)
    if args.key is None or not args.values:
        raise ValueError("sweep: give a spec KEY and at least one VALUE (e.g. `sweep model.width 0.25 0.5`)")
    sweep(args.key, args.values, preset=args.preset, columns=args.columns, table=args.table, spec_file=args.spec,
          **options)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="topkconv",
        description="Sparse top-k routing defences (Dynamic-k, TopKConv, TKC-neuron) and their robustness evaluation.")
    parser.add_argument("--version", action="version", version=f"topkconv {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of an error (also: TOPKCONV_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for add in (_add_train, _add_evaluate, _add_prune, _add_reproduce, _add_sweep):
        add(sub)
    for command in sub.choices.values():  # --debug is also accepted after the command's name
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                             help="show the full traceback of an error (also: TOPKCONV_DEBUG=1)")
    return parser


# Exit statuses: 2 for a mistake the user can fix (a flag, a file, a folder in use), 1 for a failure of the
# computation itself, 130 for Ctrl-C (128 + SIGINT, as shells report it).
EXIT_USER_ERROR, EXIT_FAILURE, EXIT_INTERRUPTED = 2, 1, 130


def main(argv=None) -> int:
    import os

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    debug = args.debug or os.environ.get("TOPKCONV_DEBUG", "") not in ("", "0")
    try:
        return args.func(args) or 0
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"topkconv {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as err:
        if debug:
            raise
        from .errors import one_line

        status, kind, hint = _exit_status(err)
        print(f"topkconv {args.command}: {kind}: {one_line(err)}{hint}", file=sys.stderr)
        return status


def _exit_status(err: Exception) -> tuple[int, str, str]:
    """(status, kind, hint): 2 for a user error (:func:`topkconv.errors.is_user_error`, a run folder in use,
    a corrupt weights file), 1 for a failure of the computation (a RuntimeError such as out of memory), and 1
    as an ``internal error`` for anything else: a bug, even one that raises ValueError."""
    from .checkpoint import RunLockedError
    from .errors import is_user_error

    if is_user_error(err) or isinstance(err, RunLockedError) or type(err).__name__ == "SafetensorError":
        return EXIT_USER_ERROR, "error", ""
    if isinstance(err, RuntimeError):
        return EXIT_FAILURE, "error", " (--debug shows the traceback)"
    return EXIT_FAILURE, "internal error", " (rerun with --debug for the traceback)"


if __name__ == "__main__":
    sys.exit(main())
