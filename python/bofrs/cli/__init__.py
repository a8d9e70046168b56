"""The ``bofrs`` command line: one module per command (``demo``, ``codebook``, ``quantize``, and
the evaluation commands ``eval``, ``sensitivity``, ``report``)."""

from __future__ import annotations

import argparse
import sys

from bofrs.cli import codebook, quantize
from bofrs.cli import eval as eval_command


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bofrs", description="4-bit weight quantization")
    commands = parser.add_subparsers(dest="command")
    demo = commands.add_parser("demo", help="quantize the embedded example with every format")
    demo.add_argument("--block-size", type=int, default=64)
    codebook.add_parser(commands)
    quantize.add_parser(commands)
    eval_command.add_parsers(commands)
    args = parser.parse_args(argv)
    handlers = {
        "codebook": codebook.run,
        "quantize": quantize.run,
        "eval": eval_command.run_eval,
        "report": eval_command.run_report,
        "sensitivity": eval_command.run_sensitivity,
    }
    if args.command in handlers:
        try:
            print(handlers[args.command](args))
        except (TypeError, ValueError, OSError) as err:
            print(f"bofrs: error: {err}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("bofrs: interrupted; no output was left behind", file=sys.stderr)
            return 130
        return 0
    if args.command in (None, "demo"):
        from bofrs.cli.demo import run

        try:
            print(run(getattr(args, "block_size", 64)))
        except (TypeError, ValueError) as err:
            print(f"bofrs: error: {err}", file=sys.stderr)
            return 2
        return 0
    parser.error(f"unknown command {args.command}")
    return 2

