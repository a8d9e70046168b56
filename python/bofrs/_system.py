"""What this machine runs: the native pool's thread count and the CPU kernel variants."""

from __future__ import annotations

from bofrs import _native


def num_threads() -> int:
    """Threads the heavy calls use (``BOFRS_NUM_THREADS`` before the first call; default: all cores)."""
    return int(_native.num_threads())


def supported_isas() -> tuple[str, ...]:
    """Kernel variants this CPU runs ("portable" first, the default last); all give identical results."""
    return tuple(_native.supported_isas())
