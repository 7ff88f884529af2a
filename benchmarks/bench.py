#!/usr/bin/env python
"""SAISA vs transformers' LLaVA: `python benchmarks/bench.py [--quick] [--json] [--out DIR] [--repeats N] [--threads N]`.

The same as `saisa bench`; see docs/benchmarks.md for what is measured and how to read it.
"""

from __future__ import annotations

import argparse
import sys

from modeling_saisa.cli.bench import add_arguments, run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/bench.py", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
