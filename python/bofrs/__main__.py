"""``python -m bofrs`` / ``bofrs``: command line entry point."""

from __future__ import annotations

import argparse
import sys

from . import _cli_codebook, _cli_eval, _cli_quantize


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bofrs", description="4-bit weight quantization")
    commands = parser.add_subparsers(dest="command")
    demo = commands.add_parser("demo", help="quantize the embedded example with every format")
    demo.add_argument("--block-size", type=int, default=64)
    _cli_codebook.add_parser(commands)
    _cli_quantize.add_parser(commands)
    _cli_eval.add_parsers(commands)
    args = parser.parse_args(argv)
    handlers = {
        "codebook": _cli_codebook.run,
        "quantize": _cli_quantize.run,
        "eval": _cli_eval.run_eval,
        "report": _cli_eval.run_report,
        "sensitivity": _cli_eval.run_sensitivity,
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
        from ._demo import run

        try:
            print(run(getattr(args, "block_size", 64)))
        except (TypeError, ValueError) as err:
            print(f"bofrs: error: {err}", file=sys.stderr)
            return 2
        return 0
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
