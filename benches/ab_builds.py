"""Two builds of bofrs side by side: the same workloads timed in alternating processes, one per
build, so a refactor can show it costs nothing (or what it costs) on a shared, noisy machine.

    python benches/ab_builds.py --a /work/venv-base/bin/python --b /work/venvmain/bin/python

Each round runs the A process then the B process (the order flips every round); each process
times every workload ``--repeats`` times after a warm-up and reports its medians. The table
shows, per workload, the median over rounds of B/A (each round's ratio pairs two neighbouring
processes, so a slow drift of the machine cancels) with the range over rounds. Workloads: the
public API only (``bofrs.pack``, ``PackedTensor.dequantize``, ``bofrs.nn.quant_matmul``), on
the 4096x11008 bfloat16 weight of ``bench_pack_vs_peers.py`` and the 4096x4096 Student-t(4)
weight of ``bench_opq.py``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

WORKLOADS = (
    "pack nf4 fp32-scales", "pack bof4s", "unpack bf16", "unpack dq8", "pack nf4+opq t4",
    "pack bof4s+opq t4", "matvec float", "matvec int8",
)  # fmt: skip


def child(repeats: int) -> dict[str, float]:
    """Median seconds of each workload in this process's bofrs."""
    import bofrs
    import torch
    from bofrs.nn import quant_matmul

    g = torch.Generator().manual_seed(0)
    w = torch.randn(4096, 11008, generator=g).to(torch.bfloat16)
    t4 = (torch.distributions.StudentT(4.0).sample((4096, 4096)) * 0.02).to(torch.bfloat16)
    packed = bofrs.pack(w, "nf4", 64)
    dq8 = bofrs.pack(w, "nf4", 64, scale_dtype="dq8")
    weight = bofrs.pack(w.T.contiguous(), "nf4", 64)  # 11008 x 4096 rows of whole blocks
    x = torch.randn(1, 4096, generator=g).to(torch.bfloat16)
    jobs = {
        "pack nf4 fp32-scales": lambda: bofrs.pack(w, "nf4", 64, scale_dtype="float32"),
        "pack bof4s": lambda: bofrs.pack(w, "bof4s", 64),
        "unpack bf16": lambda: packed.dequantize(torch.bfloat16),
        "unpack dq8": lambda: dq8.dequantize(torch.bfloat16),
        "pack nf4+opq t4": lambda: bofrs.pack(t4, "nf4", 64, opq=0.95),
        "pack bof4s+opq t4": lambda: bofrs.pack(t4, "bof4s", 64, opq=0.95),
        "matvec float": lambda: quant_matmul(x, weight),
        "matvec int8": lambda: quant_matmul(x, weight, activations="int8"),
    }
    out = {}
    for name in WORKLOADS:
        fn = jobs[name]
        fn()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        out[name] = statistics.median(times)
    return out


def run(python: str, repeats: int) -> dict[str, float]:
    result = subprocess.run(
        [python, __file__, "--child", "--repeats", str(repeats)], capture_output=True, text=True, check=True
    )
    return json.loads(result.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--a", help="python of build A (the baseline)")
    parser.add_argument("--b", help="python of build B (the candidate)")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.repeats)))
        return 0
    if not args.a or not args.b:
        parser.error("--a and --b name the two builds' python executables")
    ratios: dict[str, list[float]] = {w: [] for w in WORKLOADS}
    medians: dict[str, dict[str, list[float]]] = {"a": {w: [] for w in WORKLOADS}, "b": {w: [] for w in WORKLOADS}}
    for r in range(args.rounds):
        order = ("a", "b") if r % 2 == 0 else ("b", "a")
        got = {side: run(getattr(args, side), args.repeats) for side in order}
        for w in WORKLOADS:
            ratios[w].append(got["b"][w] / got["a"][w])
            for side in "ab":
                medians[side][w].append(got[side][w])
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    print(f"# A: {args.a}\n# B: {args.b}\n# {args.rounds} rounds x {args.repeats} repeats; B/A per round")
    print(f"{'workload':<22} {'A ms':>8} {'B ms':>8} {'B/A median':>11} {'range':>13}")
    for w in WORKLOADS:
        a_ms, b_ms = (statistics.median(medians[s][w]) * 1e3 for s in "ab")
        rs = ratios[w]
        print(f"{w:<22} {a_ms:>8.2f} {b_ms:>8.2f} {statistics.median(rs):>11.3f} {min(rs):>6.3f}-{max(rs):.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
