"""Timing loops and the copy bandwidth shared by the benches (imported as ``timing`` by the
scripts in this folder, which Python puts first on ``sys.path`` when it runs one of them)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

#: The buffer :func:`copy_bandwidth` copies: 512 MiB, far beyond any cache.
COPY_BYTES = 512 << 20


def mean_seconds(fn: Callable[[], object], min_seconds: float, *, min_calls: int = 1, resolution: float = 1e-6) -> float:
    """Mean seconds per call of ``fn`` over enough calls to last ``min_seconds`` (at least
    ``min_calls``), after two warm-up calls, the second of which (at least ``resolution``
    seconds) sizes the loop."""
    fn()
    start = time.perf_counter()
    fn()
    once = max(time.perf_counter() - start, resolution)
    calls = max(min_calls, int(min_seconds / once))
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls


def median_seconds(fn: Callable[[], object], repeat: int) -> float:
    """Median wall time in seconds of ``repeat`` single calls of ``fn`` (no warm-up)."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def copy_bandwidth(nbytes: int = COPY_BYTES) -> float:
    """Bytes read + written per second by ``torch`` ``dst.copy_(src)`` on ``nbytes`` of float32
    (best of 5)."""
    import torch

    src = torch.ones(nbytes // 4)
    dst = torch.empty_like(src)
    best = min(mean_seconds(lambda: dst.copy_(src), 0.0) for _ in range(5))
    return 2 * nbytes / best
