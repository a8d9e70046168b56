"""HIGGS pieces against plain references, in one run.

    python benches/bench_higgs.py

1. Hadamard transform of 4096 rows x g (g = 64 .. 4096): bofrs vs numpy/scipy (x @ H, the
   dense matrix) and vs torch (x @ H), with the ratio.
2. pack_higgs of a 4096x4096 weight for each grid, weights/s, with the relative error next to
   the grid's MSE.
3. The knapsack allocation: 300 layers x 20 formats at 1/1000-bit resolution.
4. Rotation: relative MSE of BOF4-S (block 64) with and without the Hadamard rotation, and of
   HIGGS p=2, on Gaussian and Student-t(4) 1024x1024 weights.
"""

from __future__ import annotations

import math

import numpy as np
import scipy.linalg
import torch

import bofrs
from timing import median_seconds  # benches/timing.py


def hadamard() -> None:
    print("1. Hadamard, 4096 rows (ms, median of 5)")
    print(f"{'g':>6}{'bofrs':>10}{'numpy x@H':>12}{'torch x@H':>12}{'vs numpy':>10}{'vs torch':>10}")
    for g in (64, 256, 1024, 4096):
        x = torch.randn(4096, g)
        h = torch.from_numpy(scipy.linalg.hadamard(g).astype(np.float32) / math.sqrt(g))
        xn, hn = x.numpy(), h.numpy()
        ours = median_seconds(lambda: bofrs.hadamard(x), 5)
        dense_np = median_seconds(lambda: xn @ hn, 3)
        dense_t = median_seconds(lambda: x @ h, 3)
        err = float((bofrs.hadamard(x) - x @ h).abs().max())
        print(f"{g:>6}{ours * 1e3:>10.2f}{dense_np * 1e3:>12.2f}{dense_t * 1e3:>12.2f}"
              f"{dense_np / ours:>9.1f}x{dense_t / ours:>9.1f}x   max diff {err:.1e}")


def pack() -> None:
    print("\n2. pack_higgs, 4096x4096 float32, group 1024")
    w = torch.randn(4096, 4096)
    for bits, p in ((4, 1), (4, 2), (3, 2), (2, 2), (8, 1)):
        seconds = median_seconds(lambda: bofrs.pack_higgs(w, bits, p, 1024), 3)
        packed = bofrs.pack_higgs(w, bits, p, 1024)
        unpack = median_seconds(lambda: packed.dequantize(), 3)
        rel = float(((packed.dequantize() - w) ** 2).sum() / (w**2).sum())
        print(f"bits={bits} p={p}: pack {seconds * 1e3:.0f} ms ({w.numel() / seconds / 1e6:.0f} M/s), "
              f"unpack {unpack * 1e3:.0f} ms, rel. error {rel:.5f} (grid MSE {packed.grid.mse:.5f}), "
              f"{packed.bits_per_weight:.4f} bits/w")


def allocation() -> None:
    rng = np.random.default_rng(0)
    layers, formats = 300, 20
    alphas = rng.uniform(0, 5, layers).tolist()
    sizes = rng.integers(10**5, 10**7, layers).tolist()
    menu = {
        f"f{k}": (float(2 + 14 * k / formats), (rng.uniform(0.5, 1.5, layers) * 4.0 ** -(2 + 14 * k / formats)).tolist())
        for k in range(formats)
    }
    seconds = median_seconds(lambda: bofrs.allocate(alphas, sizes, menu, 4.25), 3)
    plan = bofrs.allocate(alphas, sizes, menu, 4.25)
    print(f"\n3. allocate: {layers} layers x {formats} formats, budget 4.25 at 1/1000 bit: "
          f"{seconds * 1e3:.0f} ms (average {plan.average_bits:.4f} bits)")


def rotation() -> None:
    print("\n4. relative MSE, 1024x1024 weights")
    torch.manual_seed(0)
    weights = {
        "N(0,1)": torch.randn(1024, 1024),
        "Student-t(4)": torch.distributions.StudentT(4.0).sample((1024, 1024)),
    }
    for name, w in weights.items():
        rows = {
            "bof4s (4.25 b)": bofrs.pack(w, "bof4s", 64),
            "bof4s + rotation (4.25 b)": bofrs.pack(w, "bof4s", 64, rotation="hadamard"),
            "higgs p=2 (4.02 b)": bofrs.pack_higgs(w, 4, 2, 1024),
        }
        cells = ", ".join(f"{k}: {bofrs.quantization_error(w, p)['relative_mse']:.5f}" for k, p in rows.items())
        print(f"{name}: {cells}")


if __name__ == "__main__":
    print(f"bofrs {bofrs.__version__}, {bofrs.num_threads()} threads")
    hadamard()
    pack()
    allocation()
    rotation()
