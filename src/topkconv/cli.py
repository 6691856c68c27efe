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
    pass  # filled in by the baselines issue


def _add_reproduce(sub) -> None:
    pass  # filled in by the reproduction issue


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="topkconv",
        description="Sparse top-k routing defences (Dynamic-k, TopKConv, TKC-neuron) and their robustness evaluation.")
    parser.add_argument("--version", action="version", version=f"topkconv {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in (_add_train, _add_evaluate, _add_prune, _add_reproduce):
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
