"""Plots of codebooks and of their error (needs matplotlib: ``pip install bofrs[plot]``).

>>> import bofrs.plot
>>> ax = bofrs.plot.plot_codebooks(64)                      # doctest: +SKIP
>>> ax = bofrs.plot.plot_error_vs_block_size(metric="mse")  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from bofrs._validate import check_block_size, check_choice
from bofrs.formats.blockwise.codebooks import Codebook, resolve
from bofrs.formats.blockwise.optimize import METRICS, expected_error

if TYPE_CHECKING:
    from matplotlib.axes import Axes

DEFAULT_NAMES = ("nf4", "af4", "bof4", "bof4s")
DEFAULT_BLOCK_SIZES = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


def _axes(ax: Axes | None) -> Axes:
    try:
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover - depends on the environment
        raise ImportError(
            "bofrs.plot needs matplotlib: pip install 'bofrs[plot]'"
        ) from None
    if ax is not None:
        return ax
    _, new = plt.subplots(figsize=(7, 4))
    axes: Axes = new
    return axes


def plot_codebooks(
    block_size: int = 64, names: Sequence[str | Codebook] = DEFAULT_NAMES, ax: Axes | None = None
) -> Axes:
    """The levels of each codebook (a name or a :class:`bofrs.Codebook`) at a block size, one
    row of markers per codebook."""
    block_size = check_block_size(block_size)
    books = [resolve(name, block_size) for name in names]
    ax = _axes(ax)
    for row, book in enumerate(books):
        ax.scatter(book.levels, [row] * len(book.levels), marker="|", s=300, label=book.name)
    ax.set_yticks(range(len(books)), [book.name for book in books])
    ax.set_xlabel("normalized level")
    ax.set_xlim(-1.05, 1.05)
    ax.set_title(f"4-bit codebooks, block size {block_size}")
    ax.grid(axis="x", alpha=0.3)
    return ax


def plot_error_vs_block_size(
    names: Sequence[str] = DEFAULT_NAMES,
    block_sizes: Sequence[int] = DEFAULT_BLOCK_SIZES,
    metric: str = "mse",
    ax: Axes | None = None,
) -> Axes:
    """Expected error per weight on N(0, 1) weights (exact integration) versus block size."""
    check_choice(metric, METRICS, "metric")
    sizes = [check_block_size(b) for b in block_sizes]
    ax = _axes(ax)
    for name in names:
        errors = [expected_error(name, b, metric=metric) for b in sizes]
        ax.plot(sizes, errors, marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("block size")
    ax.set_ylabel(f"{metric.upper()} per weight, N(0, 1) weights")
    ax.legend()
    ax.grid(alpha=0.3)
    return ax

