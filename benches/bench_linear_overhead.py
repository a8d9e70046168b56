"""Per-call cost of a batch-1 QuantLinear on CPU: the prepared native entry point against the
numpy route it replaced, side by side in one process.

Run from the repository root:

    python benches/bench_linear_overhead.py                 # SmolLM2-size layers, bf16, batch 1
    python benches/bench_linear_overhead.py --rounds 15 --shape 576 1536 --shape 64 64

Contenders, on the same layer (``QuantLinear.from_linear``, NF4 block 64) and input row:

* ``prepared``  ``layer(x)``: the module as shipped. One native call per product on operands
                converted once per weight (``_native.PreparedMatvec``: codes by reference,
                float32 scales, codebook, kernel variant), activations passed by DLPack, the
                output made in the input dtype natively;
* ``numpy route``  the same module with the route it had before: ``fused_rows(..., isa=best)``
                (numpy views of the input, the 11-argument ``_native.matvec`` that parses its
                strings and rebuilds the codebook per call, ``torch.from_numpy`` and ``.to``
                back to bf16), plus the old reshape / view per call;
* ``native floor``  ``prepared.apply(to_dlpack(x))`` alone (no module, no torch output).

(No torch contender: a parallel torch kernel leaves its OpenMP workers spinning, which slows
whatever runs next on a 2-core machine; ``bench_matvec_vs_peers.py`` compares with torch.)

Each round runs every contender back to back, each timed as the mean over enough calls to last
>= 20 ms; the table shows medians over rounds, and the ratio numpy route / prepared. The 64x64
layer's kernel is well under a microsecond, so its times are the fixed per-call cost.
"""

from __future__ import annotations

import argparse
import os
import statistics
from collections.abc import Callable

import torch
from torch.utils.dlpack import to_dlpack

import bofrs
from bofrs.formats.blockwise.matmul import fused_rows
from bofrs.nn import QuantLinear
from timing import mean_seconds  # benches/timing.py

SHAPES = ((576, 1536), (1536, 576), (576, 576), (64, 64))


class NumpyRouteLinear(QuantLinear):
    """QuantLinear with the pre-``PreparedMatvec`` per-call route (for comparison only)."""

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        fused = self._operands()
        assert fused is not None
        y = fused_rows(rows, fused.ops, "bfloat16", bofrs.supported_isas()[-1], self.activations)
        return y.view(*x.shape[:-1], self.out_features)


def contenders(out_features: int, in_features: int) -> dict[str, Callable[[], object]]:
    """name -> call for one layer shape, batch 1, bf16."""
    gen = torch.Generator().manual_seed(0)
    linear = torch.nn.Linear(in_features, out_features, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(out_features, in_features, generator=gen))
    x = torch.randn(1, in_features, generator=gen).to(torch.bfloat16)
    layer = QuantLinear.from_linear(linear, "nf4", 64)
    old = NumpyRouteLinear(layer.packed)
    fused = layer._operands()
    assert fused is not None
    prepared = fused.ops.prepared
    got, want = layer(x), old(x)
    if not torch.equal(got, want):
        raise SystemExit(f"{out_features}x{in_features}: the two routes differ")
    return {
        "prepared": lambda: layer(x),
        "numpy route": lambda: old(x),
        "native floor": lambda: prepared.apply(to_dlpack(x)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--shape", type=int, nargs=2, action="append", metavar=("OUT", "IN"))
    args = parser.parse_args()
    shapes = [tuple(s) for s in args.shape] if args.shape else SHAPES
    print(f"bofrs {bofrs.__version__}, isa {bofrs.supported_isas()[-1]}, threads {bofrs.num_threads()}, "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"load {os.getloadavg()[0]:.2f}")  # fmt: skip
    print("| layer [out x in] | prepared (us) | numpy route (us) | native floor (us) | numpy route / prepared |")
    print("|---|---|---|---|---|")
    with torch.inference_mode():
        for out_features, in_features in shapes:
            calls = contenders(out_features, in_features)
            times: dict[str, list[float]] = {name: [] for name in calls}
            for _ in range(args.rounds):
                for name, fn in calls.items():
                    times[name].append(mean_seconds(fn, 0.02, min_calls=10, resolution=1e-7))
            med = {name: statistics.median(t) * 1e6 for name, t in times.items()}
            print(
                f"| {out_features} x {in_features} | {med['prepared']:.1f} | {med['numpy route']:.1f} "
                f"| {med['native floor']:.1f} "
                f"| {med['numpy route'] / med['prepared']:.2f}x |"
            )
    print(f"load after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
