"""Argument checks shared by the public functions."""

from __future__ import annotations

import numbers

MIN_BLOCK_SIZE = 16
MAX_BLOCK_SIZE = 4096


def check_block_size(block_size: object, name: str = "block_size") -> int:
    """Returns ``block_size`` as an int if it is a power of two in 16..4096 (numpy ints accepted)."""
    if isinstance(block_size, bool) or not isinstance(block_size, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(block_size).__name__}")
    block_size = int(block_size)
    if not (MIN_BLOCK_SIZE <= block_size <= MAX_BLOCK_SIZE) or block_size & (block_size - 1):
        raise ValueError(
            f"{name} must be a power of two in {MIN_BLOCK_SIZE}..{MAX_BLOCK_SIZE}, got {block_size}"
        )
    return block_size


def check_choice(value: object, choices: tuple[str, ...], name: str) -> str:
    """Returns ``value`` if it is one of ``choices``."""
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, got {type(value).__name__}")
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")
    return value
