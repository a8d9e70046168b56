"""Benchmark bofrs NF4 pack/unpack against bitsandbytes and torchao on CPU.

Run from the repository root:

    python benches/bench_pack_vs_peers.py
    python benches/bench_pack_vs_peers.py --repeat 3 --shape 1024 4096 --json out.json

One process, one input: a ``torch.randn`` tensor of shape ``--shape`` (default
4096x11008, a Llama-7B MLP weight) with a fixed seed, cast to bfloat16. Every
library quantizes that same tensor to NF4 with block size 64:

* bofrs        ``bofrs.pack(w, codebook="nf4", block_size=64, scale_dtype="float32")``
               and ``packed.dequantize()``. fp32 scales match bitsandbytes'
               fp32 absmax, so the comparison is like for like.
* bitsandbytes ``bitsandbytes.functional.quantize_4bit(w, blocksize=64, quant_type="nf4")``
               and ``dequantize_4bit(q, state)``.
* torchao      ``to_nf4(w, block_size=64, scaler_block_size=256)`` and
               ``nf4.get_original_weight()``. Note: torchao double-quantizes the
               scales (int8 per block + one factor per 256 scales).

Peers are optional: one that does not import or fails on CPU is skipped with a
note. If bofrs itself is not installed the peers still run.

Reported per operation: median wall time over ``--repeat`` runs after one
warm-up, effective GB/s (bytes read + bytes written, using each library's real
packed size), the ratio peer_time / bofrs_time, and the fraction of memory
bandwidth reached, where bandwidth is measured in the same run by timing
``dst.copy_(src)`` on a ~500 MB buffer (read + write bytes counted). Also the
round-trip MSE against the original (NF4 at block 64 with fp32 scales gives
about 8.5e-3 * var for Gaussian data).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

BLOCK_SIZE = 64
TORCHAO_SCALER_BLOCK = 256
COPY_BYTES = 512 * 1024 * 1024
ALL_PEERS = ("bitsandbytes", "torchao")


@dataclass
class Library:
    """How to pack/unpack with one library and how big its packed form is."""

    name: str
    version: str
    pack: Callable[[torch.Tensor], Any]
    unpack: Callable[[Any], torch.Tensor]
    packed_nbytes: Callable[[Any], int]
    note: str = ""


@dataclass
class Row:
    """One timed operation of one library."""

    op: str
    library: str
    median_ms: float
    times_ms: list = field(default_factory=list)
    bytes_moved: int = 0
    gbps: float = 0.0
    frac_bw: float = 0.0
    ratio_vs_bofrs: Optional[float] = None


# --------------------------------------------------------------------------- #
# Library adapters
# --------------------------------------------------------------------------- #


def load_bofrs(scale_dtype: str) -> Library:
    import bofrs

    def pack(w):
        return bofrs.pack(w, codebook="nf4", block_size=BLOCK_SIZE, scale_dtype=scale_dtype)

    return Library(
        name="bofrs",
        version=getattr(bofrs, "__version__", "?"),
        pack=pack,
        unpack=lambda p: p.dequantize(),
        packed_nbytes=lambda p: int(p.nbytes),
        note=f"scale_dtype={scale_dtype}, threads={bofrs.num_threads()}",
    )


def load_bitsandbytes() -> Library:
    import bitsandbytes
    import bitsandbytes.functional as bnbf

    def pack(w):
        return bnbf.quantize_4bit(w, blocksize=BLOCK_SIZE, quant_type="nf4")

    def unpack(packed):
        q, state = packed
        return bnbf.dequantize_4bit(q, state)

    def nbytes(packed):
        q, state = packed
        return tensor_bytes(q) + tensor_bytes(state.absmax)

    return Library(
        name="bitsandbytes",
        version=bitsandbytes.__version__,
        pack=pack,
        unpack=unpack,
        packed_nbytes=nbytes,
        note="fp32 absmax, no double quant",
    )


def load_torchao() -> Library:
    import torchao

    try:
        from torchao.dtypes.nf4tensor import to_nf4  # torchao < 0.15 or so
    except ImportError:
        from torchao.quantization import to_nf4

    def pack(w):
        return to_nf4(w, block_size=BLOCK_SIZE, scaler_block_size=TORCHAO_SCALER_BLOCK)

    def nbytes(nf4):
        parts = (nf4.quantized_data, nf4.quantized_scalers, nf4.quantization_factor, nf4.scaler_mean)
        return sum(tensor_bytes(t) for t in parts)

    return Library(
        name="torchao",
        version=torchao.__version__,
        pack=pack,
        unpack=lambda nf4: nf4.get_original_weight(),
        packed_nbytes=nbytes,
        note=f"double-quantized int8 scales (scaler_block_size={TORCHAO_SCALER_BLOCK})",
    )


PEER_LOADERS = {"bitsandbytes": load_bitsandbytes, "torchao": load_torchao}


def try_load(name: str, loader: Callable[[], Library]) -> Optional[Library]:
    """Import a library; print a note and return None if that fails."""
    try:
        return loader()
    except Exception as exc:  # noqa: BLE001 - any import/setup failure means skip
        print(f"note: {name} not available, skipped ({type(exc).__name__}: {exc})")
        return None


# --------------------------------------------------------------------------- #
# Measurement helpers
# --------------------------------------------------------------------------- #


def tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def make_input(shape: tuple, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen).to(torch.bfloat16)


def time_call(fn: Callable[[], Any], repeat: int, warmup: int = 1) -> tuple:
    """Return (list of seconds per call, last result). CPU ops are synchronous."""
    result = None
    for _ in range(warmup):
        result = fn()
    times = []
    for _ in range(repeat):
        result = None  # free the previous output before the next run
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return times, result


def measure_copy_bandwidth(repeat: int, nbytes: int = COPY_BYTES) -> float:
    """Memory bandwidth in GB/s from dst.copy_(src), counting read + write bytes."""
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8)
    dst = torch.empty_like(src)
    times, _ = time_call(lambda: dst.copy_(src), repeat=max(repeat, 5), warmup=2)
    return 2 * nbytes / statistics.median(times) / 1e9


def round_trip_mse(original: torch.Tensor, restored: torch.Tensor) -> float:
    diff = restored.float().reshape(original.shape) - original.float()
    return diff.pow(2).mean().item()


def make_row(op: str, lib: str, times: list, bytes_moved: int, copy_gbps: float) -> Row:
    median_s = statistics.median(times)
    gbps = bytes_moved / median_s / 1e9
    return Row(
        op=op,
        library=lib,
        median_ms=median_s * 1e3,
        times_ms=[t * 1e3 for t in times],
        bytes_moved=bytes_moved,
        gbps=gbps,
        frac_bw=gbps / copy_gbps,
    )


def bench_library(lib: Library, w: torch.Tensor, repeat: int, copy_gbps: float) -> tuple:
    """Time pack and unpack of one library. Returns (rows, stats dict)."""
    in_bytes = tensor_bytes(w)
    pack_times, packed = time_call(lambda: lib.pack(w), repeat)
    packed_bytes = lib.packed_nbytes(packed)
    unpack_times, restored = time_call(lambda: lib.unpack(packed), repeat)
    out_bytes = tensor_bytes(restored)
    rows = [
        make_row("pack", lib.name, pack_times, in_bytes + packed_bytes, copy_gbps),
        make_row("unpack", lib.name, unpack_times, packed_bytes + out_bytes, copy_gbps),
    ]
    var = w.float().var().item()
    mse = round_trip_mse(w, restored)
    stats = {
        "version": lib.version,
        "note": lib.note,
        "packed_bytes": packed_bytes,
        "bits_per_weight": 8 * packed_bytes / w.numel(),
        "output_dtype": str(restored.dtype),
        "mse": mse,
        "mse_over_var": mse / var,
    }
    return rows, stats


def fill_ratios(rows: list) -> None:
    """Set peer_time / bofrs_time on every row that has a bofrs counterpart."""
    base = {r.op: r.median_ms for r in rows if r.library == "bofrs"}
    for r in rows:
        if r.op in base:
            r.ratio_vs_bofrs = r.median_ms / base[r.op]


# --------------------------------------------------------------------------- #
# Output
# --------------------------------------------------------------------------- #


def print_timing_table(rows: list) -> None:
    header = f"{'operation':<9} {'library':<13} {'median ms':>10} {'GB/s':>8} {'% copy BW':>10} {'peer/bofrs':>11}"
    print(header)
    print("-" * len(header))
    for r in sorted(rows, key=lambda r: (r.op != "pack", r.library != "bofrs", r.library)):
        ratio = f"{r.ratio_vs_bofrs:.2f}x" if r.ratio_vs_bofrs is not None else "n/a"
        print(
            f"{r.op:<9} {r.library:<13} {r.median_ms:>10.2f} {r.gbps:>8.2f} "
            f"{100 * r.frac_bw:>9.1f}% {ratio:>11}"
        )


def print_accuracy_table(stats: dict) -> None:
    header = f"{'library':<13} {'version':<10} {'bits/w':>7} {'MSE':>11} {'MSE/var':>9}  note"
    print(header)
    print("-" * len(header))
    for name, s in stats.items():
        print(
            f"{name:<13} {s['version']:<10} {s['bits_per_weight']:>7.3f} "
            f"{s['mse']:>11.4e} {s['mse_over_var']:>9.4e}  {s['note']}"
        )


def print_bofrs_summary(rows: list, copy_gbps: float) -> None:
    for r in rows:
        if r.library == "bofrs":
            print(f"bofrs {r.op}: {r.gbps:.2f} GB/s = {100 * r.frac_bw:.1f}% of copy bandwidth ({copy_gbps:.2f} GB/s)")


def write_json(path: str, payload: dict) -> None:
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)
    print(f"wrote {path}")


# --------------------------------------------------------------------------- #
# Main
# --------------------------------------------------------------------------- #


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeat", type=int, default=5, help="timed runs per operation (after 1 warm-up)")
    p.add_argument("--shape", type=int, nargs=2, default=(4096, 11008), metavar=("R", "C"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--peers", nargs="*", default=list(ALL_PEERS), choices=ALL_PEERS,
                   help="peer libraries to run (default: all)")
    p.add_argument("--bofrs-scale-dtype", default="float32", choices=("float32", "bfloat16"),
                   help="bofrs scale dtype (float32 matches bitsandbytes' fp32 absmax)")
    p.add_argument("--json", metavar="PATH", help="also write results as JSON")
    return p.parse_args(argv)


def load_libraries(args) -> list:
    libs = []
    try:
        libs.append(load_bofrs(args.bofrs_scale_dtype))
    except ImportError as exc:
        print(f"bofrs not installed ({exc}): running peers only")
    for name in args.peers:
        lib = try_load(name, PEER_LOADERS[name])
        if lib is not None:
            libs.append(lib)
    return libs


def main(argv=None) -> dict:
    args = parse_args(argv)
    warnings.filterwarnings("ignore")
    libs = load_libraries(args)

    w = make_input(tuple(args.shape), args.seed)
    print(f"input: {tuple(w.shape)} {w.dtype}, {tensor_bytes(w) / 1e6:.1f} MB, seed {args.seed}, block {BLOCK_SIZE}")
    print(f"torch {torch.__version__}, torch threads {torch.get_num_threads()}, "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}, {platform.processor() or platform.machine()}")
    print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs (timings are noisy if this is high)")
    for lib in libs:
        print(f"{lib.name} {lib.version}: {lib.note}")

    copy_gbps = measure_copy_bandwidth(args.repeat)
    print(f"memory bandwidth (copy_ of {COPY_BYTES >> 20} MiB, read+write): {copy_gbps:.2f} GB/s\n")

    rows, stats = [], {}
    for lib in libs:
        try:
            lib_rows, stats[lib.name] = bench_library(lib, w, args.repeat, copy_gbps)
            rows.extend(lib_rows)
        except Exception as exc:  # noqa: BLE001 - a peer failing on CPU is skipped
            print(f"note: {lib.name} failed on CPU, skipped ({type(exc).__name__}: {exc})")
    fill_ratios(rows)

    print_timing_table(rows)
    print()
    print_accuracy_table(stats)
    print()
    print_bofrs_summary(rows, copy_gbps)

    payload = {
        "shape": list(w.shape),
        "dtype": str(w.dtype),
        "block_size": BLOCK_SIZE,
        "seed": args.seed,
        "repeat": args.repeat,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "copy_bandwidth_gbps": copy_gbps,
        "libraries": stats,
        "results": [r.__dict__ for r in rows],
    }
    if args.json:
        write_json(args.json, payload)
    return payload


if __name__ == "__main__":
    main()
