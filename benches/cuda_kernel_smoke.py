"""One call of every CUDA kernel variant, each checked against the CPU path: small enough to run
under ``compute-sanitizer --tool memcheck`` in about a minute (benches/gpu_check.sh does).

    compute-sanitizer --tool memcheck --error-exitcode 9 python benches/cuda_kernel_smoke.py

Exits 1 on a wrong result, 2 without a CUDA device; memcheck's own exit code flags bad accesses.
Sizes are odd on purpose (partial blocks, rows that are not a multiple of the warps per block).
"""

from __future__ import annotations

import sys

import bofrs
import torch
from bofrs._cuda import _blockwise, _hadamard, _higgs, _sources

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check(ok: bool, what: str, failures: list[str]) -> None:
    print(f"{'ok  ' if ok else 'FAIL'} {what}", flush=True)
    if not ok:
        failures.append(what)


def close(y: torch.Tensor, want: torch.Tensor, tol: float) -> bool:
    y, want = y.detach().cpu().float(), want.detach().cpu().float()
    return bool(torch.isfinite(y).all()) and float((y - want).abs().max()) <= tol * float(want.abs().max()) + 1e-6


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 2
    dev = torch.device("cuda")
    bofrs._cuda.require(dev)
    g = torch.Generator().manual_seed(0)
    failures: list[str] = []
    w = torch.randn(37, 640, generator=g) * 0.02
    for scale, book in (("bfloat16", "nf4"), ("dq8", "bof4s"), ("float16", "af4"), ("float32", "int4")):
        cpu = bofrs.pack(w, book, 64, scale_dtype=scale, opq=0.99)
        gpu = cpu.to(dev)
        for dtype in DTYPES:  # bofrs_dequant (every output kind) + bofrs_scatter_outliers
            check(torch.equal(gpu.dequantize(dtype).cpu(), cpu.dequantize(dtype)), f"dequant {book}/{scale} {dtype}", failures)
    ops = bofrs.pack(w, "nf4", 64).to(dev).cuda_operands()
    w32 = bofrs.pack(w, "nf4", 64).dequantize(torch.float32)
    for dtype in DTYPES:  # bofrs_matvec_t{tile}_v16 for every activation kind
        for tile in _sources.TOKEN_TILES:
            x = torch.randn(tile, 640, generator=g).to(dtype)
            y = _blockwise.matvec(ops, x.to(dev), 37, 640)
            check(close(y, x.float() @ w32.T, 2e-2), f"matvec {dtype} {tile} tokens", failures)
        x = torch.randn(3, 1024, generator=g).to(dtype)  # bofrs_hadamard
        check(torch.equal(_hadamard.hadamard_groups(x.to(dev), 256).cpu(), bofrs.hadamard(x, 256)), f"hadamard {dtype}", failures)
    for bits, p in ((4, 1), (4, 2), (2, 1), (2, 2), (8, 1), (3, 1)):
        cpu_h = bofrs.pack_higgs(w, bits, p, 256)
        gpu_h = cpu_h.to(dev)
        check(torch.equal(gpu_h.rotated(torch.float32).cpu(), cpu_h.rotated(torch.float32)), f"higgs dequant {bits}b p{p}", failures)
        hops = gpu_h.cuda_operands()
        if _higgs.fusable(hops):  # bofrs_higgs_matvec for every (p, code bits) variant
            x_rot = torch.randn(2, hops.width, generator=g)
            y = _higgs.matvec(hops, x_rot.to(dev))
            check(close(y, x_rot @ cpu_h.rotated(torch.float32).T, 1e-4), f"higgs matvec {bits}b p{p}", failures)
    torch.cuda.synchronize()
    print(f"{len(failures)} failures" if failures else "all kernels ran and matched")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
