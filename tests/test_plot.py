"""The plot helpers draw what they say (matplotlib, non-interactive backend)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import bofrs

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")

import bofrs.plot  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402


def test_plot_codebooks(tmp_path: Path) -> None:
    ax = bofrs.plot.plot_codebooks(128, names=("nf4", "bof4s"))
    offsets = [c.get_offsets() for c in ax.collections]
    assert len(offsets) == 2
    np.testing.assert_array_equal(offsets[1][:, 0], bofrs.codebook("bof4s", 128).levels)
    ax.figure.savefig(tmp_path / "levels.png")
    assert (tmp_path / "levels.png").stat().st_size > 1000
    plt.close("all")


def test_plot_error_vs_block_size() -> None:
    ax = bofrs.plot.plot_error_vs_block_size(("nf4", "bof4"), block_sizes=(32, 64), metric="mae")
    lines = ax.get_lines()
    assert [line.get_label() for line in lines] == ["nf4", "bof4"]
    np.testing.assert_allclose(
        lines[1].get_ydata(), [bofrs.expected_error("bof4", b, metric="mae") for b in (32, 64)]
    )
    plt.close("all")


def test_plot_bad_input() -> None:
    with pytest.raises(ValueError, match="block_size"):
        bofrs.plot.plot_codebooks(100)
    with pytest.raises(ValueError, match="metric"):
        bofrs.plot.plot_error_vs_block_size(metric="l2")
