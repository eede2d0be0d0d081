"""The ``robalign`` command line: ``robalign {demo,weigh,train,bench} ...``.

Errors a user can fix (a missing file, a bad argument, an unknown subcommand) print one line
and exit with status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


class UsageError(Exception):
    """A one-line, user-facing error: printed as ``robalign <cmd>: <message>``, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _existing_file(value: str) -> Path:
    path = Path(value)
    if not path.is_file():
        raise UsageError(f"no such file: {value}")
    return path


def _cmd_demo(args) -> int:
    from .quickstart import run

    run(steps=args.steps, seed=args.seed)
    return 0


def _not_yet(name: str):
    def command(args) -> int:
        for field in ("data", "config"):
            value = getattr(args, field, None)
            if value is not None:
                _existing_file(value)
        raise UsageError(f"`robalign {name}` is not available in robalign {_version()} yet")
    return command


def _version() -> str:
    from . import __version__

    return __version__


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="robalign", description="Fused kernels for distribution-aware robust preference alignment (DoRA).")
    parser.add_argument("--version", action="version", version=f"robalign {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="{demo,weigh,train,bench}", parser_class=_Parser)
    sub.required = True

    demo = sub.add_parser("demo", help="run the end-to-end example on the embedded default")
    demo.add_argument("--steps", type=int, default=30, help="training steps (default 30)")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_cmd_demo)

    weigh = sub.add_parser("weigh", help="fit the distribution classifier and add DoRA weights to a dataset")
    weigh.add_argument("data", help="listwise or pairwise JSONL file")
    weigh.add_argument("--target-source", required=False)
    weigh.add_argument("--out")
    weigh.set_defaults(func=_not_yet("weigh"))

    train = sub.add_parser("train", help="train a causal LM with DoRA")
    train.add_argument("--model")
    train.add_argument("--data")
    train.add_argument("--config")
    train.set_defaults(func=_not_yet("train"))

    bench = sub.add_parser("bench", help="run the benchmark suite")
    bench.add_argument("--quick", action="store_true")
    bench.set_defaults(func=_not_yet("bench"))
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except UsageError as err:
        print(f"robalign {args.command}: {err}", file=sys.stderr)
        return 2
