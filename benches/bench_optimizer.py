"""BOF4 optimizer speed and the error of every 4-bit codebook on Gaussian weights, in one run.

    python benches/bench_optimizer.py                 # theory table + 1e9-weight data-driven run
    python benches/bench_optimizer.py --weights 2e8   # a shorter data-driven run

Prints:
1. the time of the theoretical optimization per variant and block size;
2. expected MSE / MAE per weight on N(0, 1) weights (exact integration) of NF4, AF4 and the
   four BOF4 variants, relative to NF4;
3. the data-driven mode on ``--weights`` bf16 weights (one 2^26-value random chunk streamed
   repeatedly, as the tensors of a loaded model would be), and the same Lloyd iteration
   written plainly in numpy (weighted bincount over exact samples, the paper's approach) on a
   2^22-value sample, with the ratio of the per-weight cost.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

import bofrs
from timing import median_seconds  # benches/timing.py

VARIANTS = ("bof4", "bof4-mae", "bof4s", "bof4s-mae")
SETTINGS = {
    "bof4": ("mse", "absmax"),
    "bof4-mae": ("mae", "absmax"),
    "bof4s": ("mse", "signed_absmax"),
    "bof4s-mae": ("mae", "signed_absmax"),
}
BLOCK_SIZES = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


def theory_speed() -> None:
    print("1. theoretical optimization time (ms, median of 3)")
    print(f"{'block':>6} " + " ".join(f"{v:>10}" for v in VARIANTS))
    for bs in BLOCK_SIZES:
        row = []
        for name in VARIANTS:
            metric, norm = SETTINGS[name]
            row.append(1e3 * median_seconds(lambda: bofrs.optimize_codebook(bs, metric=metric, normalization=norm), 3))
        print(f"{bs:>6} " + " ".join(f"{t:>10.2f}" for t in row))


def error_table() -> None:
    names = ("nf4", "af4", *VARIANTS)
    for metric in ("mse", "mae"):
        print(f"\n2. expected {metric.upper()} per weight on N(0,1) weights (ratio to nf4)")
        print(f"{'block':>6} " + " ".join(f"{n:>18}" for n in names))
        for bs in BLOCK_SIZES:
            errors = [bofrs.expected_error(n, bs, metric=metric) for n in names]
            cells = [f"{e:.4e} ({e / errors[0]:.3f})" for e in errors]
            print(f"{bs:>6} " + " ".join(f"{c:>18}" for c in cells))


def numpy_lloyd(x: np.ndarray, block_size: int, iterations: int) -> np.ndarray:
    """Plain weighted Lloyd on exact samples (BOF4 MSE, absmax, pins -1/0/1)."""
    blocks = x.reshape(-1, block_size).astype(np.float64)
    scale = np.abs(blocks).max(axis=1, keepdims=True)
    norm = (blocks / scale).ravel()
    weight = np.broadcast_to(scale**2, blocks.shape).ravel()
    levels = np.linspace(-1, 1, 16)
    levels[[0, 7, 15]] = (-1.0, 0.0, 1.0)
    levels.sort()
    pinned = np.isin(levels, (-1.0, 0.0, 1.0))
    for _ in range(iterations):
        cuts = (levels[1:] + levels[:-1]) / 2
        region = np.searchsorted(cuts, norm, side="left")
        w = np.bincount(region, weight, 16)
        wx = np.bincount(region, weight * norm, 16)
        new = np.where(w > 0, wx / np.maximum(w, 1e-300), levels)
        levels = np.where(pinned, levels, new)
    return levels


def data_driven(total: float) -> None:
    chunk = torch.randn(1 << 26, generator=torch.Generator().manual_seed(0)).bfloat16()
    repeats = max(1, round(total / chunk.numel()))
    n = repeats * chunk.numel()
    start = time.perf_counter()
    book = bofrs.optimize_codebook(64, data=(chunk for _ in range(repeats)))
    elapsed = time.perf_counter() - start
    print(f"\n3. data-driven, {n:.3e} bf16 weights, block 64, MSE: {elapsed:.2f} s "
          f"({n / elapsed / 1e6:.0f} M weights/s, {bofrs.num_threads()} threads)")
    theory = bofrs.codebook("bof4", 64)
    print(f"   max |data - theory| level difference: {np.abs(book.levels - theory.levels).max():.2e}")

    sample = chunk[: 1 << 22].float()
    bofrs_time = median_seconds(lambda: bofrs.optimize_codebook(64, data=sample), 3)
    iterations = 150  # about what the histogram iteration needs from an even start
    numpy_time = median_seconds(lambda: numpy_lloyd(sample.numpy(), 64, iterations), 1)
    print(f"   2^22 samples: bofrs {bofrs_time * 1e3:.0f} ms, numpy Lloyd ({iterations} iterations) "
          f"{numpy_time * 1e3:.0f} ms -> {numpy_time / bofrs_time:.0f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", type=float, default=1e9, help="data-driven run size")
    args = parser.parse_args()
    print(f"bofrs {bofrs.__version__}, {bofrs.num_threads()} threads, torch {torch.__version__}")
    theory_speed()
    error_table()
    data_driven(args.weights)


if __name__ == "__main__":
    main()
