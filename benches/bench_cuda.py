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
outside the timed interval; rounds interleave the contenders; the table shows the median.
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
            f"{'x bofrs':>8} {'rel err':>9}"
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
                for _ in range(args.iters):
                    for cname, (fn, _, _) in funcs.items():
                        times[cname].append(timer.once(lambda fn=fn, x=x: fn(x)))
            median = {c: statistics.median(t) for c, t in times.items()}
            act = (batch * in_f + batch * out_f) * 2
            for cname, (_, wbytes, _) in funcs.items():
                t = median[cname]
                rate = (wbytes + act) / t
                row = {
                    "shape": shape, "batch": batch, "contender": cname, "us": t * 1e6,
                    "gb_s": rate / 1e9, "pct_bw": 100 * rate / bandwidth,
                    "ratio_to_bofrs": t / median["bofrs"], "max_rel_err": errors[cname],
                    "weight_bytes": wbytes,
                }  # fmt: skip
                rows.append(row)
                line = (
                    f"{shape:>12} {batch:>5} {cname:>9} {t * 1e6:>9.1f} {rate / 1e9:>8.0f} "
                    f"{100 * rate / bandwidth:>5.0f}% {t / median['bofrs']:>8.2f} {errors[cname]:>9.1e}"
                )
                lines.append(line)
                print(line, flush=True)
        del funcs, w, own
        torch.cuda.empty_cache()
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
