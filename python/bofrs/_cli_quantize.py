"""``bofrs quantize IN OUT``: a whole safetensors checkpoint into a bofrs checkpoint."""

from __future__ import annotations

import argparse

from ._convert import quantize_checkpoint
from ._quantize import QuantConfig


def add_parser(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Registers the command."""
    p = commands.add_parser("quantize", help="quantize a safetensors checkpoint (directory or file)")
    p.add_argument("src", help="transformers checkpoint directory or .safetensors file")
    p.add_argument("dst", help="output directory (must not exist)")
    p.add_argument("--codebook", default="bof4s", help="codebook name, or 'higgs' (default bof4s)")
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--scale-dtype", default="bfloat16")
    p.add_argument("--opq", type=float, default=None, help="OPQ quantile, e.g. 0.95 (default off)")
    p.add_argument("--rotation", default=None, help="'hadamard' or a group size (default off)")
    p.add_argument("--bits", type=int, default=4, help="HIGGS bits per weight")
    p.add_argument("--p", type=int, default=2, help="HIGGS grid dimension")
    p.add_argument("--group-size", type=int, default=1024, help="HIGGS group size")
    p.add_argument("--skip", nargs="*", default=["lm_head"], help="module-name patterns to keep")
    p.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> str:
    """Runs the conversion; returns the summary line."""
    rotation: str | int | None = args.rotation
    if isinstance(rotation, str) and rotation.isdigit():
        rotation = int(rotation)
    config = QuantConfig(
        codebook=args.codebook, block_size=args.block_size, scale_dtype=args.scale_dtype,
        opq=args.opq, rotation=rotation, bits=args.bits, p=args.p, group_size=args.group_size,
        skip=tuple(args.skip),
    )  # fmt: skip
    stats = quantize_checkpoint(args.src, args.dst, config, progress=not args.no_progress)
    seconds = max(stats["seconds"], 1e-9)
    return (
        f"bofrs: {int(stats['quantized'])} of {int(stats['tensors'])} tensors quantized, "
        f"{stats['bytes_in'] / 1e6:.1f} MB -> {stats['bytes_out'] / 1e6:.1f} MB in {seconds:.1f} s "
        f"({stats['tensors'] / seconds:.1f} tensors/s, {stats['bytes_in'] / 1e6 / seconds:.1f} MB/s); "
        f"wrote {args.dst}"
    )
