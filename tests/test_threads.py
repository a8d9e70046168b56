"""The heavy calls release the interpreter and are safe to run from several threads."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator

import numpy as np
import pytest
import torch

import bofrs
from checks import weights

BIG = 16 << 20  # values per heavy call


@pytest.fixture
def no_forced_switches() -> Iterator[None]:
    """With a very long switch interval the interpreter never takes the GIL away from a thread:
    another thread runs only when the GIL is released (a blocking call, a sleep, or native code
    that detaches)."""
    previous = sys.getswitchinterval()
    sys.setswitchinterval(30.0)
    try:
        yield
    finally:
        sys.setswitchinterval(previous)


def iterations_while_inside(call: Callable[[], object], target: int = 1000, max_calls: int = 500) -> int:
    """Runs ``call`` repeatedly in a background thread (until the count reaches ``target``) and
    counts the iterations of a pure-Python loop the main thread completes while the background
    thread is inside it."""
    inside = threading.Event()
    done = threading.Event()
    errors: list[BaseException] = []
    count = 0

    def background() -> None:
        try:
            for _ in range(max_calls):
                inside.set()
                call()
                inside.clear()
                if count >= target:
                    break
        except BaseException as err:  # re-raised by the main thread
            errors.append(err)
        finally:
            inside.clear()
            done.set()

    worker = threading.Thread(target=background)
    worker.start()
    while not done.is_set():
        if inside.is_set():
            count += 1
        total = 0
        for i in range(100):  # some pure-Python work
            total += i
        time.sleep(1e-4)  # lets the worker take the interpreter back when it needs it
    worker.join()
    if errors:
        raise errors[0]
    return count


@pytest.mark.usefixtures("no_forced_switches")
def test_pack_releases_the_interpreter() -> None:
    x = torch.randn(BIG)
    count = iterations_while_inside(lambda: bofrs.pack(x, "nf4", 64))
    assert count >= 1000, f"main thread ran only {count} iterations during bofrs.pack"


@pytest.mark.usefixtures("no_forced_switches")
def test_dequantize_releases_the_interpreter() -> None:
    packed = bofrs.pack(torch.randn(BIG), "nf4", 64)
    count = iterations_while_inside(lambda: packed.dequantize(torch.bfloat16))
    assert count >= 1000, f"main thread ran only {count} iterations during dequantize"


def run_concurrently(calls: list[Callable[[], object]], rounds: int = 3) -> list[list[object]]:
    """Runs each call in its own thread, all starting together, ``rounds`` times."""
    results: list[list[object]] = [[] for _ in calls]
    barrier = threading.Barrier(len(calls))
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            for _ in range(rounds):
                barrier.wait()
                results[i].append(calls[i]())
        except BaseException as err:  # reported by the main thread
            errors.append(err)
            barrier.abort()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    return results


def test_concurrent_packs_equal_sequential_packs() -> None:
    tensors = [weights(3_000_001, torch.float32, seed=1), weights((1500, 999), torch.bfloat16, seed=2)]
    specs = [("nf4", 64, "bfloat16"), ("af4", 256, "float32")]
    isas = bofrs.supported_isas()

    def job(i: int) -> Callable[[], tuple[torch.Tensor, torch.Tensor]]:
        name, bs, scale_dtype = specs[i]
        isa = isas[i % len(isas)]
        return lambda: _parts(bofrs.pack(tensors[i], name, bs, scale_dtype=scale_dtype, isa=isa))

    sequential = [job(i)() for i in range(2)]
    for i, outputs in enumerate(run_concurrently([job(0), job(1)])):
        for codes, scales in outputs:  # type: ignore[misc]
            assert torch.equal(codes, sequential[i][0]) and torch.equal(scales, sequential[i][1])


def test_concurrent_dequantize_equals_sequential() -> None:
    a = bofrs.pack(weights(2_000_003, seed=3), "fp4", 32)
    b = bofrs.pack(weights((999, 1001), torch.float16, seed=4), "int4", 128, scale_dtype="float16")
    sequential = [a.dequantize(torch.bfloat16), b.dequantize()]
    outputs = run_concurrently([lambda: a.dequantize(torch.bfloat16), lambda: b.dequantize()])
    for i, results in enumerate(outputs):
        for decoded in results:
            assert isinstance(decoded, torch.Tensor)
            assert torch.equal(decoded.view(torch.int16), sequential[i].view(torch.int16))


def test_same_tensor_from_many_threads() -> None:
    x = weights(1_000_000, seed=5)
    expected = _parts(bofrs.pack(x, "nf4", 64))
    outputs = run_concurrently([lambda: _parts(bofrs.pack(x, "nf4", 64))] * 4, rounds=2)
    for results in outputs:
        for codes, scales in results:  # type: ignore[misc]
            assert torch.equal(codes, expected[0]) and torch.equal(scales, expected[1])


def _parts(packed: bofrs.PackedTensor) -> tuple[torch.Tensor, torch.Tensor]:
    return packed.codes, packed.scales


# --- pool size ------------------------------------------------------------------------------------

_DIGEST = """
import hashlib, sys, numpy as np, torch, bofrs
rng = np.random.default_rng(0)
x = torch.from_numpy(rng.standard_normal(1_000_003).astype(np.float32))
p = bofrs.pack(x, "af4", 64)
d = p.dequantize(torch.float16).view(torch.int16).numpy()
h = hashlib.sha256(p.codes.numpy().tobytes() + p.scales.float().numpy().tobytes() + d.tobytes())
print(bofrs.num_threads(), h.hexdigest())
"""


def _digest_with_threads(threads: str) -> tuple[int, str]:
    env = {**os.environ, "BOFRS_NUM_THREADS": threads}
    out = subprocess.run([sys.executable, "-c", _DIGEST], env=env, capture_output=True, text=True, check=True)
    n, digest = out.stdout.split()
    return int(n), digest


def test_pool_size_follows_environment_and_does_not_change_results() -> None:
    one, digest_one = _digest_with_threads("1")
    three, digest_three = _digest_with_threads("3")
    assert (one, three) == (1, 3)
    assert digest_one == digest_three
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.standard_normal(1_000_003).astype(np.float32))
    p = bofrs.pack(x, "af4", 64)
    d = p.dequantize(torch.float16).view(torch.int16).numpy()
    here = hashlib.sha256(p.codes.numpy().tobytes() + p.scales.float().numpy().tobytes() + d.tobytes())
    assert here.hexdigest() == digest_one
    assert bofrs.num_threads() >= 1


@pytest.mark.parametrize("scale_dtype", ["bfloat16", "float16", "float32", "dq8"])
@pytest.mark.parametrize("opq", [None, 0.95])
def test_pack_runs_no_torch_kernel(scale_dtype: str, opq: float | None) -> None:
    """``bofrs.pack`` of a CPU tensor runs no torch compute kernel: one would start torch's
    OpenMP workers, which keep spinning into the next native call and take cores from bofrs's
    pool (that made every pack after a bfloat16-scale pack up to 1.5x slower)."""
    from torch.profiler import ProfilerActivity, profile

    w = torch.from_numpy(np.random.default_rng(3).standard_t(4, (256, 512)).astype(np.float32))
    w = w.to(torch.bfloat16)
    bofrs.pack(w, "nf4", scale_dtype=scale_dtype, opq=opq)  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        packed = bofrs.pack(w, "nf4", scale_dtype=scale_dtype, opq=opq)
    copies = {"aten::_to_copy", "aten::copy_", "aten::empty_strided"}
    kernels = {e.name for e in prof.events()} & copies
    assert not kernels, kernels
    assert packed.dequantize().shape == w.shape
