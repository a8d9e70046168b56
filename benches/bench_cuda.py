"""4-bit linear products on one CUDA GPU: bofrs' kernels against bitsandbytes and dense torch.

Run from the repository root on a machine with a CUDA GPU, CuPy and (optionally) bitsandbytes:

    python benches/bench_cuda.py                       # every shape and batch of the issue
    python benches/bench_cuda.py --shapes 4096x4096 --batches 1 16 --iters 50

One process, every contender on the same weight (``torch.randn * 0.02``, bfloat16, shape
``out x in`` as written) and the same bfloat16 activations ``[batch, in]``:

* ``bofrs``       ``QuantLinear(bofrs.pack(w, "nf4", 64)).cuda()(x)`` under ``torch.no_grad``:
                  the fused CUDA matvec for batch <= 16, else the weight decoded into a reused
                  buffer by the CUDA kernel, then ``F.linear`` (cuBLAS); bf16 scales, 4.25 bits;
* ``bnb``         ``bnb.matmul_4bit(x, q.t(), quant_state=s)`` with
                  ``quantize_4bit(w, blocksize=64, quant_type="nf4")`` (fp32 absmax, 4.5 bits;
                  batch 1 runs bitsandbytes' ``gemv_4bit``); skipped with a note if missing;
* ``torch``       ``F.linear(x, w)`` in bfloat16 (cuBLAS, 16 bits per weight).

Timing: CUDA events around each call, the L2 cache flushed (a 256 MiB write) before every call,
outside the timed interval; rounds interleave the contenders; the table shows the median ("us").
"b2b us": the same call back to back, 20 in a row between two events, without the flush (the
weight may partly sit in L2; launch gaps count). After the table: the host time per call
(Python + launch, what a decode loop pays when the GPU is not the bottleneck) of QuantLinear
against ``F.linear``, and one decode step of a Llama-3-8B block (q, k, v, o, gate, up, down at
batch 1) eager and replayed from a CUDA graph.
"rel err": max |y - x W_own^T| / max |x W_own^T| against the contender's own decoded
weight in float32 (bf16 output rounding: ~4e-3 expected). GB/s counts the bytes a contender must move: its stored weight plus activations in and out.
"% bw": that rate over the device copy bandwidth measured in the same run (``dst.copy_(src)``
on 1 GiB, bytes read + written). "x bofrs": contender time / bofrs time (> 1: bofrs faster).
CPU launch overhead is hidden (the flush keeps the GPU busy while the call is queued). Results go to
``benches/results/cuda_<gpu>.txt`` (and ``.json``).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import bofrs
import torch
import torch.nn.functional as F
from bofrs.nn import QuantLinear

SHAPES = ("4096x4096", "4096x14336", "14336x4096", "8192x28672")
BATCHES = (1, 4, 16, 128, 2048)
RESULTS = Path(__file__).resolve().parent / "results"


def copy_bandwidth(nbytes: int = 1 << 30, iters: int = 10) -> float:
    """Device copy bandwidth in bytes/s (read + write counted), median of ``iters``."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    times = []
    for _ in range(iters + 2):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * nbytes / statistics.median(times[2:])


class Timer:
    """Times calls with CUDA events, the L2 flushed before each."""

    def __init__(self) -> None:
        self.flush = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")

    def once(self, fn: Callable[[], object]) -> float:
        self.flush.fill_(1)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3


def back_to_back(fn: Callable[[], object], calls: int = 20) -> float:
    """Seconds per call of ``calls`` calls in a row (no flush between them)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / calls


def host_time(fn: Callable[[], object], calls: int = 300) -> float:
    """Seconds of host time per call while queuing ``calls`` calls (GPU time hidden unless the
    queue fills), median of 5 runs."""
    runs = []
    for _ in range(5):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        runs.append((time.perf_counter() - t0) / calls)
        torch.cuda.synchronize()
    return statistics.median(runs)


#: One decoder block of Llama-3-8B at batch 1: (out, in) of q, k, v, o, gate, up, down.
LLAMA3_8B_BLOCK = ((4096, 4096), (1024, 4096), (1024, 4096), (4096, 4096), (14336, 4096), (14336, 4096), (4096, 14336))


def decode_step(timer: Timer, notes: list[str], iters: int) -> list[str]:
    """Eager vs CUDA-graph replay of the seven products of one Llama-3-8B block at batch 1,
    bofrs NF4 against bf16 ``F.linear``; lines for the report."""
    weights = [(torch.randn(o, i, device="cuda") * 0.02).to(torch.bfloat16) for o, i in LLAMA3_8B_BLOCK]
    layers = [QuantLinear(bofrs.pack(w.cpu(), "nf4", 64)).cuda() for w in weights]
    xs = [torch.randn(1, i, device="cuda", dtype=torch.bfloat16) for _, i in LLAMA3_8B_BLOCK]
    steps: dict[str, Callable[[], object]] = {
        "bofrs": lambda: [q(x) for q, x in zip(layers, xs)],
        "torch": lambda: [F.linear(x, w) for w, x in zip(weights, xs)],
    }
    out = ["", "# one Llama-3-8B block decode step (7 products, batch 1), us: eager / CUDA graph (L2 flushed)"]
    with torch.no_grad():
        for name, step in steps.items():
            for _ in range(3):
                step()  # warm-up: compiles, validates and caches the operands before capture
            eager = statistics.median(timer.once(step) for _ in range(iters))
            try:
                graph = torch.cuda.CUDAGraph()
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    step()
                torch.cuda.current_stream().wait_stream(side)
                with torch.cuda.graph(graph):
                    step()
                replay = statistics.median(timer.once(graph.replay) for _ in range(iters))
                out.append(f"{name:>9} {eager * 1e6:>9.1f} {replay * 1e6:>9.1f}")
            except Exception as e:  # noqa: BLE001  (capture failing is a finding, not a crash)
                notes.append(f"CUDA graph capture of the {name} decode step failed: {type(e).__name__}: {e}")
                out.append(f"{name:>9} {eager * 1e6:>9.1f} {'failed':>9}")
    return out


Contender = tuple[Callable[[torch.Tensor], torch.Tensor], int, Callable[[], torch.Tensor]]


def contenders(w: torch.Tensor, notes: list[str]) -> dict[str, Contender]:
    """name -> (function of x, stored weight bytes, its own decoded weight in float32 on the GPU:
    the reference its error is measured against; bofrs' comes from the CPU decoder)."""
    out: dict[str, Contender] = {}
    packed = bofrs.pack(w.cpu(), "nf4", 64)
    q = QuantLinear(packed).cuda()
    out["bofrs"] = (q, packed.nbytes, lambda: packed.dequantize(torch.float32).cuda())
    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional as bnbf

        qw, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4")
        nbytes = qw.numel() * qw.element_size() + state.absmax.numel() * state.absmax.element_size()
        out["bnb"] = (
            lambda x: bnb.matmul_4bit(x, qw.t(), quant_state=state), nbytes,
            lambda: bnbf.dequantize_4bit(qw, state).float(),
        )  # fmt: skip
    except Exception as e:  # noqa: BLE001  (a missing or broken peer is a note, not a failure)
        notes.append(f"bitsandbytes skipped: {type(e).__name__}: {e}")
    out["torch"] = (lambda x: F.linear(x, w), w.numel() * w.element_size(), lambda: w.float())
    return out


def overheads() -> list[str]:
    """Host time per call (us) at 4096x4096, batch 1: QuantLinear's Python and launches against a
    bare ``F.linear`` and a bare fused-kernel launch."""
    from bofrs._cuda import _blockwise

    w = (torch.randn(4096, 4096, device="cuda") * 0.02).to(torch.bfloat16)
    q = QuantLinear(bofrs.pack(w.cpu(), "nf4", 64)).cuda()
    x = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        ops = q._cuda_cached().ops
        calls = {
            "QuantLinear(x)": lambda: q(x),
            "_blockwise.matvec": lambda: _blockwise.matvec(ops, x, 4096, 4096),
            "F.linear bf16": lambda: F.linear(x, w),
        }
        for fn in calls.values():
            fn()
        host = {name: host_time(fn) for name, fn in calls.items()}
    out = ["", "# host time per call, 4096x4096, batch 1 (us; Python + launch, queued without syncs)"]
    out += [f"{name:>20} {t * 1e6:>8.1f}" for name, t in host.items()]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), help="weights as OUTxIN")
    parser.add_argument("--batches", nargs="+", type=int, default=list(BATCHES))
    parser.add_argument("--iters", type=int, default=30, help="timed calls per contender")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="results file (.txt; .json beside)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 2
    from bofrs import _cuda

    _cuda.require(torch.device("cuda"))
    name = torch.cuda.get_device_name()
    torch.manual_seed(args.seed)
    bandwidth = copy_bandwidth()
    notes: list[str] = []
    lines = [
        (
            f"# bench_cuda: {name}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
            f"bofrs {getattr(bofrs, '__version__', '?')}"
        ),
        f"# device copy bandwidth: {bandwidth / 1e9:.0f} GB/s (dst.copy_(src), 1 GiB, read + write)",
        f"# command: python benches/bench_cuda.py {' '.join(argv if argv is not None else sys.argv[1:])}",
        "",
        (
            f"{'shape':>12} {'batch':>5} {'contender':>9} {'us':>9} {'GB/s':>8} {'% bw':>6} "
            f"{'x bofrs':>8} {'b2b us':>9} {'rel err':>9}"
        ),
    ]
    print("\n".join(lines), flush=True)
    rows: list[dict[str, Any]] = []
    timer = Timer()
    for shape in args.shapes:
        out_f, in_f = (int(v) for v in re.split("[xX]", shape))
        w = (torch.randn(out_f, in_f, device="cuda") * 0.02).to(torch.bfloat16)
        funcs = contenders(w, notes)
        own = {c: weight() for c, (_, _, weight) in funcs.items()}  # decoded once per shape
        for batch in args.batches:
            x = torch.randn(batch, in_f, device="cuda", dtype=torch.bfloat16)
            errors = {}
            with torch.no_grad():
                for cname, (fn, _, _) in list(funcs.items()):
                    want = F.linear(x.float(), own[cname])
                    try:
                        got = fn(x).float()
                    except Exception as e:  # a peer that fails on this GPU is dropped with a note
                        if cname == "bofrs":
                            raise
                        notes.append(f"{cname} dropped at {shape} batch {batch}: {type(e).__name__}: {e}")
                        del funcs[cname]
                        continue
                    errors[cname] = float(((got - want).abs().max() / want.abs().max()).item())
                    del want
                    for _ in range(3):
                        fn(x)
                times: dict[str, list[float]] = {c: [] for c in funcs}
                b2b: dict[str, list[float]] = {c: [] for c in funcs}
                for r in range(args.iters):
                    for cname, (fn, _, _) in funcs.items():
                        times[cname].append(timer.once(lambda fn=fn, x=x: fn(x)))
                        if r % 10 == 0:
                            b2b[cname].append(back_to_back(lambda fn=fn, x=x: fn(x)))
            median = {c: statistics.median(t) for c, t in times.items()}
            act = (batch * in_f + batch * out_f) * 2
            for cname, (_, wbytes, _) in funcs.items():
                t = median[cname]
                rate = (wbytes + act) / t
                row = {
                    "shape": shape, "batch": batch, "contender": cname, "us": t * 1e6,
                    "gb_s": rate / 1e9, "pct_bw": 100 * rate / bandwidth,
                    "ratio_to_bofrs": t / median["bofrs"], "max_rel_err": errors[cname],
                    "weight_bytes": wbytes, "back_to_back_us": statistics.median(b2b[cname]) * 1e6,
                }  # fmt: skip
                rows.append(row)
                line = (
                    f"{shape:>12} {batch:>5} {cname:>9} {t * 1e6:>9.1f} {rate / 1e9:>8.0f} "
                    f"{100 * rate / bandwidth:>5.0f}% {t / median['bofrs']:>8.2f} "
                    f"{row['back_to_back_us']:>9.1f} {errors[cname]:>9.1e}"
                )
                lines.append(line)
                print(line, flush=True)
        del funcs, w, own
        torch.cuda.empty_cache()
    extra = overheads() + decode_step(timer, notes, max(args.iters // 2, 5))
    print("\n".join(extra), flush=True)
    lines += extra
    lines += ["", *(f"# note: {n}" for n in notes)]
    for n in notes:
        print(f"# note: {n}")
    slug = re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")
    out = args.out or RESULTS / f"cuda_{slug}.txt"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    meta = {"device": name, "copy_bandwidth_gb_s": bandwidth / 1e9, "torch": torch.__version__, "notes": notes}
    out.with_suffix(".json").write_text(json.dumps({**meta, "rows": rows}, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
