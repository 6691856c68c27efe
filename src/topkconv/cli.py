"""Command line: argument parsing only; the work is done in the library modules.

Each sub-command has one ``_add_<name>`` function that declares its arguments and points at a
``_run_<name>`` function, which imports the library lazily so ``topkconv --help`` stays fast.
"""

from __future__ import annotations

import argparse
import sys

from . import __version__


def _add_train(sub) -> None:
    pass  # filled in by the pipeline issue


def _add_evaluate(sub) -> None:
    pass  # filled in by the evaluation issue


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


def _k_value(text: str):
    """A k on the command line: an int count ("10") or a fraction ("0.1")."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a count (10) or a fraction (0.1), got {text!r}") from None


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
