"""Block-wise formats on Hadamard-rotated weights: pack(..., rotation=...)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import bofrs


def heavy(rows: int = 256, cols: int = 512, seed: int = 0) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.distributions.StudentT(4.0).sample((rows, cols)) * 0.02


@pytest.mark.parametrize("codebook", ["nf4", "bof4", "bof4s"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotation_is_packing_the_rotated_weight(codebook: str, dtype: torch.dtype) -> None:
    w = heavy().to(dtype)
    packed = bofrs.pack(w, codebook, 64, rotation="hadamard")
    assert packed.rotation == 512 and packed.dtype == dtype and packed.shape == w.shape
    direct = bofrs.pack(bofrs.hadamard(w.float(), 512), codebook, 64)
    assert torch.equal(packed.codes, direct.codes) and torch.equal(packed.scales, direct.scales)
    rotated = packed.dequantize_rotated(torch.float32)
    assert torch.equal(rotated, direct.dequantize(torch.float32))
    expected = bofrs.hadamard(rotated, 512).to(dtype)
    assert torch.equal(packed.dequantize(), expected)


def test_explicit_group_and_activation_identity() -> None:
    w = heavy(64, 384)
    packed = bofrs.pack(w, "bof4s", 64, rotation=128)
    assert packed.rotation == 128
    x = torch.randn(3, 384)
    torch.testing.assert_close(
        bofrs.hadamard(x, 128) @ packed.dequantize_rotated(torch.float32).T,
        x @ packed.dequantize(torch.float32).T,
        atol=1e-4,
        rtol=1e-4,
    )


def test_rotation_helps_heavy_tails_and_is_neutral_on_gaussian() -> None:
    w = heavy(512, 1024)
    plain = bofrs.quantization_error(w, bofrs.pack(w, "bof4s", 64))["relative_mse"]
    rotated = bofrs.quantization_error(w, bofrs.pack(w, "bof4s", 64, rotation="hadamard"))["relative_mse"]
    assert rotated < 0.8 * plain
    g = torch.randn(512, 1024)
    a = bofrs.quantization_error(g, bofrs.pack(g, "bof4s", 64))["relative_mse"]
    b = bofrs.quantization_error(g, bofrs.pack(g, "bof4s", 64, rotation="hadamard"))["relative_mse"]
    assert abs(a - b) < 0.03 * a


def test_rotation_with_opq_and_dq8_round_trips_through_a_file(tmp_path: Path) -> None:
    w = heavy(64, 256)
    packed = bofrs.pack(w, "bof4s", 64, rotation="hadamard", opq=0.95, scale_dtype="dq8")
    path = tmp_path / "r.safetensors"
    bofrs.save_file({"w": packed}, path)
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        assert f.metadata()["bofrs.format_version"] == "2"
    loaded = bofrs.load_file(path)["w"]
    assert isinstance(loaded, bofrs.PackedTensor) and loaded.rotation == 256
    assert torch.equal(loaded.dequantize(), packed.dequantize())


def test_tampered_rotation_is_refused(tmp_path: Path) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file as raw_save

    path = tmp_path / "r.safetensors"
    bofrs.save_file({"w": bofrs.pack(heavy(8, 64), "nf4", 64, rotation="hadamard")}, path)
    with safe_open(str(path), "pt") as f:
        header = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    manifest = json.loads(header["bofrs.manifest"])
    manifest["w"]["rotation"] = 48
    header["bofrs.manifest"] = json.dumps(manifest, separators=(",", ":"))
    import zlib

    header["bofrs.manifest_crc32"] = str(zlib.crc32(header["bofrs.manifest"].encode()))
    raw_save(tensors, str(path), metadata=header)
    with pytest.raises(bofrs.FormatError, match="rotation"):
        bofrs.load_file(path)


def test_bad_rotation_arguments() -> None:
    w = torch.randn(4, 96)
    with pytest.raises(ValueError, match="rotation"):
        bofrs.pack(w, "nf4", 32, rotation="givens")
    with pytest.raises(ValueError, match="divide"):
        bofrs.pack(w, "nf4", 32, rotation=64)
    with pytest.raises(ValueError, match="group_size"):
        bofrs.pack(w, "nf4", 32, rotation=48)
    with pytest.raises(ValueError, match="16"):
        bofrs.pack(torch.randn(4, 100), "nf4", 32, rotation="hadamard")
    with pytest.raises(TypeError, match="group_size"):
        bofrs.pack(w, "nf4", 32, rotation=32.0)  # type: ignore[arg-type]
