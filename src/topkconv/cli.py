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
        description="Train a VGG with a defence on a data set. Flags override the --spec file's values. The run "
                    "folder gets model.safetensors and the training state after every epoch, metrics.jsonl, and "
                    "run.json when the run is complete. Under torchrun it trains data-parallel "
                    "(torchrun --nproc_per_node=N -m topkconv.cli train ...).")
    p.add_argument("--spec", metavar="TOML", help="a RunSpec as TOML ([data], [model], [model.defense], [train])")
    p.add_argument("--out", metavar="DIR", help="run folder (default runs/<spec hash>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last finished epoch")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    data = p.add_argument_group("data")
    data.add_argument("--dataset", choices=("digits", "cifar10", "cinic10", "imagefolder"), help="data.name")
    data.add_argument("--data-root", metavar="DIR", help="data.root: the folder of a local data set")
    data.add_argument("--image-size", type=int, help="data.image_size: resize to this many pixels (paper: 224)")
    data.add_argument("--no-augment", action="store_true", help="no random crop and flip")
    data.add_argument("--limit-train", type=int, help="use only the first N training images")
    data.add_argument("--limit-test", type=int, help="use only the first N test images")
    data.add_argument("--workers", type=int, help="loader workers for streamed data sets")
    model = p.add_argument_group("model")
    model.add_argument("--model", dest="arch", choices=("vgg-small", "vgg16"), help="model.arch")
    model.add_argument("--width", type=float, help="vgg-small channel width multiplier")
    model.add_argument("--hidden", type=int, help="width of the penultimate FC layer")
    model.add_argument("--batch-norm", action=argparse.BooleanOptionalAction, default=None,
                       help="BatchNorm after each conv (default: on for vgg-small, off for vgg16)")
    model.add_argument("--pretrained", metavar="FILE", help="torchvision's vgg16-397923af.pth for `features`")
    model.add_argument("--defense", choices=("standard", "dropout", "dynamic_k", "topk_conv", "tkc_neuron", "sap",
                                             "pruned"), help="model.defense.kind")
    model.add_argument("--fc-k", type=_k_value, nargs="+", metavar="K",
                       help="Dynamic-k: k per FC layer, a count or a fraction (paper: 250 10)")
    model.add_argument("--fc-scope", choices=("final", "final2"), help="Dynamic-k in the last FC layer or both")
    model.add_argument("--conv-layers", type=int, help="topk_conv/tkc_neuron: how many of the last convs are routed")
    model.add_argument("--conv-k", type=_k_value, help="topk_conv/tkc_neuron: k (fraction of channels, or a count)")
    model.add_argument("--criterion", choices=("max", "sum"), help="topk_conv channel score")
    model.add_argument("--dropout-p", type=float, help="dropout: p in the FC layers")
    model.add_argument("--sap-frac", type=float, help="sap: fraction of activations drawn")
    train = p.add_argument_group("training")
    train.add_argument("--epochs", type=int)
    train.add_argument("--batch-size", type=int, help="global batch (split across torchrun processes)")
    train.add_argument("--lr", type=float)
    train.add_argument("--weight-decay", type=float)
    train.add_argument("--schedule", choices=("cosine", "step"))
    train.add_argument("--warmup-epochs", type=float)
    train.add_argument("--seed", type=int)
    train.add_argument("--device", choices=("auto", "cpu", "cuda"))
    train.add_argument("--amp", action="store_true", help="bf16 autocast (CUDA only)")
    p.set_defaults(func=_run_train)


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
    "pretrained": ("model", "pretrained"), "defense": ("model.defense", "kind"), "fc_k": ("model.defense", "fc_k"),
    "fc_scope": ("model.defense", "fc_scope"), "conv_layers": ("model.defense", "conv_layers"),
    "conv_k": ("model.defense", "conv_k"), "criterion": ("model.defense", "criterion"),
    "dropout_p": ("model.defense", "dropout_p"), "sap_frac": ("model.defense", "sap_frac"),
    "epochs": ("train", "epochs"), "batch_size": ("train", "batch_size"), "lr": ("train", "lr"),
    "weight_decay": ("train", "weight_decay"), "schedule": ("train", "schedule"),
    "warmup_epochs": ("train", "warmup_epochs"), "seed": ("train", "seed"), "device": ("train", "device"),
}


def _run_train(args) -> int:
    import os

    from .config import spec_from_dict
    from .io import read_toml
    from .train import fit

    spec = read_toml(args.spec, "spec file") if args.spec else {}
    flags_given = any(getattr(args, dest) is not None for dest in _TRAIN_FLAGS) or args.no_augment or args.amp
    if args.resume and args.out and not args.spec and not flags_given:
        spec = _spec_of_unfinished_run(args.out)  # `train --out DIR --resume` alone continues DIR's own run
    for dest, (section, key) in _TRAIN_FLAGS.items():
        value = getattr(args, dest)
        if value is not None:
            table = spec
            for part in section.split("."):
                table = table.setdefault(part, {})
            table[key] = value
    if args.no_augment:
        spec.setdefault("data", {})["augment"] = False
    if args.amp:
        spec.setdefault("train", {})["amp"] = True
    try:
        run_spec = spec_from_dict(spec)
    except ValueError as err:
        raise ValueError(f"{args.spec}: {err}" if args.spec else str(err)) from None
    out = args.out or f"runs/{run_spec.hash()}"
    _, summary = fit(run_spec, out, resume=args.resume, progress=not args.no_progress)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"trained {run_spec.model.arch} ({run_spec.model.defense.kind}) on {run_spec.data.name}: "
              f"test accuracy {summary['test_acc']:.4f} after {summary['epochs']} epochs -> {out}")
    return 0


def _spec_of_unfinished_run(out: str) -> dict:
    from pathlib import Path

    from .io import read_json
    from .checkpoint import STATE_FILE

    state_file = Path(out) / STATE_FILE
    if not state_file.is_file():
        raise FileNotFoundError(f"{state_file}: nothing to resume (no finished epoch in {out}); "
                                f"give the run's flags or --spec to start it")
    state = read_json(state_file)
    if "requested_spec" not in state:
        raise ValueError(f"{state_file}: written by an older version without its spec; "
                         f"give the run's flags or --spec together with --resume")
    return state["requested_spec"]


def _add_evaluate(sub) -> None:
    p = sub.add_parser(
        "evaluate", help="attack a trained checkpoint: the paper's FGSM/PGD, or the full suite with masking checks",
        description="Attack a checkpoint on its test set and write eval.json (clean accuracy, each attack, the "
                    "per-example worst case, the gradient-masking checks, the config, seed, n and timings) and "
                    "acc-vs-eps.png. eps and step sizes are in 0-255 units. paper: FGSM and PGD-16 (step 0.75) "
                    "at eps. full: also AutoAttack, Square, transfer from --surrogate, EOT-PGD (stochastic "
                    "models), BPDA-PGD (top-k models), doubled steps/restarts and an eps curve. Under torchrun "
                    "the examples are shared out (torchrun --nproc_per_node=N -m topkconv.cli evaluate ...).")
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="run folder (or its model.safetensors)")
    p.add_argument("--suite", default="paper", choices=("paper", "full"), help="attack suite (default paper)")
    p.add_argument("--surrogate", metavar="BASELINE_RUN_DIR", help="undefended model for the transfer attack")
    p.add_argument("--n", "--n-examples", dest="n", type=int, metavar="N",
                   help="attack only the first N test examples (under torchrun spell it --n-examples: "
                        "torchrun reads --n as one of its own options)")
    p.add_argument("--eps", type=float, help="L-inf radius in 0-255 units (default: the run's, 8)")
    p.add_argument("--extra-eps", type=float, nargs="+", metavar="EPS", help="more radii (0-255) for FGSM/PGD")
    p.add_argument("--steps", type=int, dest="pgd_steps", help="PGD steps (default 16)")
    p.add_argument("--step-size", type=float, dest="pgd_step_size", help="PGD step in 0-255 units (default 0.75)")
    p.add_argument("--restarts", type=int, help="PGD random restarts (default 1)")
    p.add_argument("--eot-samples", type=int, help="EOT draws for stochastic models (default 20)")
    p.add_argument("--eps-curve", type=float, nargs="+", metavar="EPS", help="radii (0-255) of the curve")
    p.add_argument("--apgd-iters", type=int, help="AutoAttack iterations (default 100; fewer = quicker, weaker)")
    p.add_argument("--square-queries", type=int, help="Square's query budget (default 5000)")
    p.add_argument("--autoattack-attacks", nargs="+", metavar="NAME",
                   help="run only these AutoAttack attacks (apgd-ce apgd-t fab-t square apgd-dlr fab)")
    p.add_argument("--batch-size", type=int, help="examples per attack batch (default 256)")
    p.add_argument("--seed", type=int, help="seed of every random draw (default 0)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--out", metavar="FILE", help="eval.json path (default CHECKPOINT/eval.json)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=_run_evaluate)


_EVALUATE_OVERRIDES = ("extra_eps", "pgd_steps", "pgd_step_size", "restarts", "eot_samples", "eps_curve",
                       "apgd_iters", "square_queries", "autoattack_attacks", "batch_size", "seed")


def _run_evaluate(args) -> int:
    import os

    from .evaluate import evaluate_run

    overrides = {name: getattr(args, name) for name in _EVALUATE_OVERRIDES if getattr(args, name) is not None}
    result = evaluate_run(args.checkpoint, suite=args.suite, surrogate_dir=args.surrogate, n_examples=args.n,
                          eps=args.eps, out=args.out, overrides=overrides, device=args.device,
                          progress=not args.no_progress)
    if int(os.environ.get("RANK", "0")) == 0:
        attacks = ", ".join(f"{name} {a['accuracy']:.4f}" for name, a in result["attacks"].items())
        flags = [name for name, c in result["masking_checks"].items() if c["verdict"] == "flag"]
        print(f"n={result['n']} clean {result['clean']:.4f}; {attacks}; "
              f"worst case {result['worst_case']['accuracy']:.4f}; masking flags: {', '.join(flags) or 'none'}")
    return 0


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
    p.add_argument("--epochs", type=int, default=3, help="fine-tuning epochs the schedule runs over (default 3)")
    p.add_argument("--lr", type=float, default=None, help="fine-tuning learning rate (default: a tenth of the "
                                                          "source run's train.lr)")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for the pruned run")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=_run_prune)


def _run_prune(args) -> int:
    import json

    from .checkpoint import read_run_json
    from .config import spec_from_dict
    from .pruning import prune_run, pruned_spec

    source = spec_from_dict(read_run_json(args.checkpoint)["spec"])
    spec = pruned_spec(source, args.scope, args.sparsity, args.epochs, lr=args.lr)
    _, summary = prune_run(args.checkpoint, spec, args.out, progress=not args.no_progress)
    print(json.dumps({k: summary[k] for k in ("scope", "sparsity", "test_acc_before", "test_acc")}, indent=2))
    return 0


def _add_reproduce(sub) -> None:
    p = sub.add_parser(
        "reproduce", help="train, attack and report a table or the figures of the paper",
        description="Train every model of a paper table (cached by spec hash under OUT/runs/<hash>/), attack "
                    "it, and write OUT/reports/<table>.md/.csv with our numbers beside the paper's. With no "
                    "arguments: Table III on the quick preset and the embedded digits.")
    p.add_argument("target", nargs="?", default="table3",
                   choices=("table1", "table2", "table3", "figures", "all"), help="what to make (default table3)")
    p.add_argument("--preset", default="quick", choices=("quick", "paper"),
                   help="quick: digits + small VGG on a CPU; paper: CINIC-10 + VGG16 at 224 px (GPUs)")
    p.add_argument("--spec", default=None, metavar="FILE",
                   help="a table spec TOML to use instead of experiments/<table>-<preset>.toml")
    p.add_argument("--data", default=None, metavar="PATH", help="root folder of the data set (paper: CINIC-10)")
    p.add_argument("--pretrained", default=None, metavar="PATH",
                   help="torchvision's vgg16-397923af.pth to initialise VGG16's features")
    p.add_argument("--out", default=".", metavar="DIR", help="where runs/ and reports/ go (default: .)")
    p.add_argument("--force", action="store_true", help="retrain and re-attack even when cached")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=_run_reproduce)


def _run_reproduce(args) -> int:
    from .reproduce import reproduce

    reproduce(args.target, preset=args.preset, data=args.data, pretrained=args.pretrained, out=args.out,
              force=args.force, progress=not args.no_progress, spec_file=args.spec)
    return 0


def _add_sweep(sub) -> None:
    p = sub.add_parser(
        "sweep", help="train and attack a grid of k values; clean and robust accuracy against k",
        description="Train one Table III column for every k (cached by spec hash), attack it, and write "
                    "OUT/reports/sweep-<layer>.md/.csv/.png.")
    p.add_argument("--k", nargs="+", required=True, type=_k_value, metavar="K",
                   help="k values: counts (10) or fractions of the fan-in (0.1)")
    p.add_argument("--layer", default="conv", choices=("conv", "fc"),
                   help="conv: TopKConv's conv_k (column TKC-max); fc: every Dynamic-k layer's k (column Dynamic-k)")
    p.add_argument("--column", default=None, help="the Table III column to vary (default by --layer)")
    p.add_argument("--preset", default="quick", choices=("quick", "paper"))
    p.add_argument("--spec", default=None, metavar="FILE", help="a table spec TOML instead of table3-<preset>.toml")
    p.add_argument("--data", default=None, metavar="PATH")
    p.add_argument("--pretrained", default=None, metavar="PATH")
    p.add_argument("--out", default=".", metavar="DIR")
    p.add_argument("--force", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_run_sweep)


def _run_sweep(args) -> int:
    from .reproduce import sweep

    sweep(args.k, layer=args.layer, preset=args.preset, column=args.column, data=args.data,
          pretrained=args.pretrained, out=args.out, force=args.force, progress=not args.no_progress,
          spec_file=args.spec)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="topkconv",
        description="Sparse top-k routing defences (Dynamic-k, TopKConv, TKC-neuron) and their robustness evaluation.")
    parser.add_argument("--version", action="version", version=f"topkconv {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in (_add_train, _add_evaluate, _add_prune, _add_reproduce, _add_sweep):
        add(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return args.func(args) or 0
    except (ValueError, FileNotFoundError) as err:
        print(f"topkconv {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
