"""The type stubs of the native module, and the command line demo."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest

import bofrs
from bofrs.__main__ import main

#: pyproject's mypy settings, without following imports into torch and safetensors: the stub
#: of the native module needs neither, and analysing torch takes stubtest ~40 s instead of ~10.
MYPY_CONFIG = """\
[mypy]
python_version = 3.10
strict = True
ignore_missing_imports = True
[mypy-torch.*]
follow_imports = skip
[mypy-safetensors.*]
follow_imports = skip
"""


def test_native_stubs_match_the_extension(tmp_path: Path) -> None:
    config = tmp_path / "mypy.ini"
    config.write_text(MYPY_CONFIG)
    result = subprocess.run(
        [sys.executable, "-m", "mypy.stubtest", "bofrs._native", "--mypy-config-file", str(config)],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


def test_demo_prints_a_table() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "bofrs", "demo"], capture_output=True, text=True, timeout=300, check=True
    )
    lines = result.stdout.strip().splitlines()
    assert lines[0].startswith("bofrs demo: (1024, 4096) torch.bfloat16 weight, block size 64")
    assert lines[1].split() == ["codebook", "bits/w", "rel.", "MSE", "SQNR", "dB", "pack", "ms", "unpack", "ms"]
    rows = {line.split()[0]: line.split()[1:] for line in lines[2:-1]}
    assert set(rows) == {*bofrs.available_codebooks(), "bof4s-fit"}
    # BOF4-S fitted to the weight itself beats its Gaussian-optimal version, which beats NF4.
    assert float(rows["bof4s-fit"][1]) < float(rows["bof4s"][1]) < float(rows["nf4"][1])
    for name, (bits, relative, sqnr, pack_ms, unpack_ms) in rows.items():
        assert float(bits) == 4.25, name  # 4 bits + a bfloat16 scale per 64 values
        assert 0 < float(relative) < 0.05, name
        assert float(sqnr) == pytest.approx(-10 * math.log10(float(relative)), abs=0.01), name
        assert float(pack_ms) >= 0 and float(unpack_ms) >= 0
    assert "round-tripped" in lines[-1]


def test_demo_rejects_a_bad_block_size(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--block-size", "48"]) == 2
    assert "block_size" in capsys.readouterr().err
