"""``bofrs codebook`` prints the optimizer's codebook, as a table or JSON, and plots it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import bofrs
from bofrs.__main__ import main


def test_table_and_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["codebook", "--block-size", "128", "--signed"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("bof4s (block size 128, signed_absmax")
    levels = [float(line.split()[1]) for line in out[1:17]]
    np.testing.assert_allclose(levels, bofrs.codebook("bof4s", 128).levels, atol=1e-9)
    assert "x NF4" in out[-1]
    assert main(["codebook", "--metric", "mae", "--bits", "3", "--no-pins", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert len(data["levels"]) == 8 and data["metric"] == "mae" and data["expected_error"] > 0


def test_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    target = tmp_path / "levels.png"
    assert main(["codebook", "--plot", str(target)]) == 0
    assert target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_options_exit_nonzero(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["codebook", "--block-size", "48"]) == 2
    assert "block_size" in capsys.readouterr().err
    assert main(["codebook", "--bits", "9"]) == 2
    with pytest.raises(SystemExit):
        main(["codebook", "--metric", "l1"])
