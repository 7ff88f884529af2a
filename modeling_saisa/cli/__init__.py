"""The `saisa` console script.

Each subcommand lives in its own module of this package and exposes `register(subparsers)`, which adds its
parser and sets `func` (called with the parsed namespace; its return value is the exit code). Modules are found
by name, so adding a subcommand never touches this file.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="saisa",
        description="SAISA multimodal LLMs on transformers: generate, chat, convert, train, measure.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, OSError) as err:  # user errors: one clear line, no traceback
        print(f"saisa {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
