"""``bofrs quantize IN OUT``: a whole safetensors checkpoint into a bofrs checkpoint."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from bofrs.io.convert import DEFAULT_MENU, allocation_config, quantize_checkpoint
from bofrs.nn.quantize import QuantConfig


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
    p.add_argument("--budget", type=float, default=None,
                   help="average bits per weight: a per-layer allocation by the linearity "
                        "theorem (needs --alphas)")
    p.add_argument("--alphas", help="JSON {layer: alpha} from `bofrs sensitivity`")
    p.add_argument("--menu", default=",".join(DEFAULT_MENU),
                   help="comma-separated format specs the allocation chooses from")
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
    allocated = ""
    if args.budget is not None or args.alphas:
        if args.budget is None or not args.alphas:
            raise ValueError("budget: --budget and --alphas go together")
        alphas = _read_alphas(Path(args.alphas))
        menu = [m.strip() for m in args.menu.split(",") if m.strip()]
        if Path(args.dst).exists():  # refuse before the (long) measuring pass
            raise FileExistsError(f"dst: {args.dst} already exists; remove it or choose another path")
        config, plan = allocation_config(
            args.src, alphas, args.budget, menu, config, progress=not args.no_progress
        )
        counts = {m: plan.choices.count(m) for m in menu if m in plan.choices}
        allocated = f"; allocation at {plan.average_bits:.4f} bits/weight: {counts}"
    stats = quantize_checkpoint(args.src, args.dst, config, progress=not args.no_progress)
    seconds = max(stats["seconds"], 1e-9)
    return (
        f"bofrs: {int(stats['quantized'])} of {int(stats['tensors'])} tensors quantized, "
        f"{stats['bytes_in'] / 1e6:.1f} MB -> {stats['bytes_out'] / 1e6:.1f} MB in {seconds:.1f} s "
        f"({stats['tensors'] / seconds:.1f} tensors/s, {stats['bytes_in'] / 1e6 / seconds:.1f} MB/s); "
        f"wrote {args.dst}{allocated}"
    )


def _read_alphas(path: Path) -> dict[str, float]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"alphas: cannot read {path} ({err})") from None
    if not isinstance(data, dict) or not all(
        isinstance(k, str) and isinstance(v, (int, float)) and math.isfinite(v) for k, v in data.items()
    ):
        raise ValueError(f"alphas: {path} must hold a JSON object {{layer: finite number}}")
    return {k: float(v) for k, v in data.items()}
