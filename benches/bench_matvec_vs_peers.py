"""Batch-1 (and few-token) 4-bit matvec on CPU: bofrs' fused kernel against dense torch and bitsandbytes.

Run from the repository root:

    python benches/bench_matvec_vs_peers.py                      # the two acceptance shapes
    python benches/bench_matvec_vs_peers.py --crossover          # also: fused vs decode+F.linear per token count
    python benches/bench_matvec_vs_peers.py --rounds 15 --json out.json

One process, one machine, every contender on the same weight (``torch.randn`` with a fixed seed,
bfloat16) and the same activation row:

* ``bofrs fused``      ``QuantLinear(bofrs.pack(w, "nf4", 64))(x)``: the fused Rust kernel
                       (bf16 scales, 4.25 bits per weight), input bf16, then float32;
* ``bofrs int16``      the same layer with ``activations="int16"`` (opt-in: activations
                       quantized to int16 per 64, integer dot products; approximate), bf16 input;
* ``bofrs int8``       ``activations="int8"`` (opt-in: int8 per 32 and int8 levels, as llama.cpp's
                       4-bit dot products; approximate), bf16 input;
* ``torch bf16``       ``F.linear(x_bf16, w_bf16)`` (dense, 16 bits per weight);
* ``torch fp32``       ``F.linear(x_fp32, w_fp32)`` (dense, 32 bits per weight);
* ``bitsandbytes``     ``bnb.matmul_4bit(x_bf16, q.t(), quant_state=s)`` with
                       ``quantize_4bit(w, blocksize=64, quant_type="nf4")`` (skipped with a note if it
                       does not import or run on CPU).

Timing: ``--rounds`` rounds; in each round every contender runs back to back, each timed as the
mean of enough calls to last >= 20 ms; the table shows the median over rounds (and the fastest
round). Ratios are contender time / bofrs time, from the medians. "Fraction of bandwidth": the
contender's weight bytes divided by its time, over the copy bandwidth measured in the same run
(``dst.copy_(src)`` on 512 MB, bytes read + written).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

import bofrs
from bofrs.nn import QuantLinear
from timing import copy_bandwidth, mean_seconds  # benches/timing.py

SHAPES = ((4096, 4096), (4096, 11008), (11008, 4096))


def contenders(out_features: int, in_features: int, tokens: int) -> tuple[dict[str, tuple[Callable[[], object], int]], list[str]]:
    """name -> (call, weight bytes) for one shape and token count; notes for skipped peers."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(out_features, in_features, generator=gen).to(torch.bfloat16)
    x = torch.randn(tokens, in_features, generator=gen).to(torch.bfloat16)
    layer = QuantLinear(bofrs.pack(w, "nf4", 64))
    layer.fused_max_tokens = max(layer.fused_max_tokens, tokens)
    fast = QuantLinear(layer.packed, activations="int16")
    fast.fused_max_tokens = layer.fused_max_tokens
    fastest = QuantLinear(layer.packed, activations="int8")
    fastest.fused_max_tokens = layer.fused_max_tokens
    x32, w32 = x.float(), w.float()
    calls: dict[str, tuple[Callable[[], object], int]] = {
        "bofrs fused (bf16 in)": (lambda: layer(x), layer.packed.nbytes),
        "bofrs fused (fp32 in)": (lambda: layer(x32), layer.packed.nbytes),
        "bofrs int16 opt-in (bf16 in)": (lambda: fast(x), layer.packed.nbytes),
        "bofrs int8 opt-in (bf16 in)": (lambda: fastest(x), layer.packed.nbytes),
        "torch bf16 F.linear": (lambda: F.linear(x, w), w.numel() * 2),
        "torch fp32 F.linear": (lambda: F.linear(x32, w32), w.numel() * 4),
    }
    notes: list[str] = []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import bitsandbytes as bnb
            from bitsandbytes.functional import quantize_4bit

            q, state = quantize_4bit(w, blocksize=64, quant_type="nf4")
            bnb.matmul_4bit(x, q.t(), quant_state=state)
        nbytes = q.numel() * q.element_size() + state.absmax.numel() * state.absmax.element_size()
        calls[f"bitsandbytes {bnb.__version__} matmul_4bit"] = (
            lambda: bnb.matmul_4bit(x, q.t(), quant_state=state),
            nbytes,
        )
    except Exception as err:  # a missing or CPU-less peer is reported, not fatal
        notes.append(f"bitsandbytes skipped: {type(err).__name__}: {err}")
    # Accuracy with float32 input and output (a bf16 output would round away the int16 error).
    exact = x.double() @ layer.dequantize(torch.float32).double().T
    for name, module in (("float", layer), ("int16", fast), ("int8", fastest)):
        error = (module(x32).double() - exact).norm() / exact.norm()
        notes.append(f"bofrs {name}: relative L2 error {error:.1e} against x @ dequantize().T in float64")
    return calls, notes


def run_shape(out_features: int, in_features: int, rounds: int, bandwidth: float) -> dict[str, Any]:
    calls, notes = contenders(out_features, in_features, 1)
    samples: dict[str, list[float]] = {name: [] for name in calls}
    with torch.inference_mode():
        for _ in range(rounds):
            for name, (fn, _) in calls.items():
                samples[name].append(mean_seconds(fn, 0.02))
    base = statistics.median(samples["bofrs fused (bf16 in)"])
    rows = []
    for name, times in samples.items():
        median = statistics.median(times)
        nbytes = calls[name][1]
        rows.append({
            "contender": name,
            "median_ms": median * 1e3,
            "best_ms": min(times) * 1e3,
            "weight_bytes": nbytes,
            "ratio_vs_bofrs": median / base,
            "fraction_of_bandwidth": nbytes / median / bandwidth,
        })  # fmt: skip
    return {"shape": [out_features, in_features], "rows": rows, "notes": notes}


def crossover(rounds: int, token_counts: tuple[int, ...] = (1, 2, 4, 8, 12, 16, 24, 32, 64)) -> list[dict[str, Any]]:
    """Fused kernel against decode + F.linear per token count, 4096x4096 (picks FUSED_MAX_TOKENS)."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(4096, 4096, generator=gen).to(torch.bfloat16)
    layer = QuantLinear(bofrs.pack(w, "nf4", 64))
    out = []
    with torch.inference_mode():
        for tokens in token_counts:
            x = torch.randn(tokens, 4096, generator=gen).to(torch.bfloat16)
            fused, decoded = [], []
            for _ in range(rounds):
                layer.fused_max_tokens = tokens
                fused.append(mean_seconds(lambda: layer(x), 0.02))
                layer.fused_max_tokens = 0
                decoded.append(mean_seconds(lambda: layer(x), 0.02))
            out.append({
                "tokens": tokens,
                "fused_ms": statistics.median(fused) * 1e3,
                "decode_then_linear_ms": statistics.median(decoded) * 1e3,
            })  # fmt: skip
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--crossover", action="store_true")
    parser.add_argument("--json", default="benches/results/matvec_vs_peers.json")
    args = parser.parse_args()
    bandwidth = copy_bandwidth()
    header = {
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "bofrs_threads": bofrs.num_threads(),
        "bofrs_isa": bofrs.supported_isas()[-1],
        "torch": torch.__version__,
        "copy_bandwidth_gbps": bandwidth / 1e9,
    }
    print(f"copy bandwidth {bandwidth / 1e9:.1f} GB/s at start (read + write; the best seen is used), torch threads "
          f"{header['torch_threads']}, bofrs threads {header['bofrs_threads']}, isa {header['bofrs_isa']}")  # fmt: skip
    results = []
    for out_features, in_features in SHAPES:
        # The copy bandwidth is the physical limit: keep the best seen (a busy machine lowers it).
        bandwidth = max(bandwidth, copy_bandwidth())
        results.append(run_shape(out_features, in_features, args.rounds, bandwidth))
    header["copy_bandwidth_gbps"] = bandwidth / 1e9
    for result in results:
        out_features, in_features = result["shape"]
        print(f"\nbatch-1 matvec, weight [{out_features} x {in_features}], NF4 block 64")
        print(f"{'contender':40s} {'median ms':>10s} {'best ms':>9s} {'x bofrs':>8s} {'bw frac':>8s}")
        for row in result["rows"]:
            row["fraction_of_bandwidth"] = row["weight_bytes"] / (row["median_ms"] / 1e3) / bandwidth
            print(f"{row['contender']:40s} {row['median_ms']:10.3f} {row['best_ms']:9.3f} "
                  f"{row['ratio_vs_bofrs']:8.2f} {row['fraction_of_bandwidth']:8.1%}")  # fmt: skip
        for note in result["notes"]:
            print("  note:", note)
    print(f"\nbw frac: weight bytes / median time, over the best copy bandwidth seen, {bandwidth / 1e9:.1f} GB/s")
    report: dict[str, Any] = {"header": header, "results": results}
    if args.crossover:
        report["crossover"] = crossover(max(3, args.rounds // 3))
        print("\nfused vs decode + F.linear, [4096 x 4096], bf16 activations")
        print(f"{'tokens':>6s} {'fused ms':>9s} {'decode ms':>10s}")
        for row in report["crossover"]:
            print(f"{row['tokens']:6d} {row['fused_ms']:9.2f} {row['decode_then_linear_ms']:10.2f}")
    if args.json:
        os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=1)


if __name__ == "__main__":
    main()
