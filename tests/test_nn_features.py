"""QuantLinear with every packed-tensor feature: dq8 scales, OPQ outliers, Hadamard rotation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import bofrs
from bofrs.nn import QuantLinear

FEATURES = [
    {"scale_dtype": "dq8"},
    {"opq": 0.95},
    {"rotation": "hadamard"},
    {"opq": 0.9, "rotation": 64, "scale_dtype": "dq8"},
]


def heavy_linear(out_features: int = 48, in_features: int = 256, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    layer = nn.Linear(in_features, out_features)
    with torch.no_grad():
        layer.weight.copy_(torch.distributions.StudentT(3.0).sample(layer.weight.shape) * 0.02)
    return layer


@pytest.mark.parametrize("options", FEATURES)
@pytest.mark.parametrize("codebook", ["nf4", "int4", "bof4s"])
@pytest.mark.parametrize("tokens", [1, 5, 40])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_output_equals_decoded_weight_product(
    options: dict[str, object], codebook: str, tokens: int, dtype: torch.dtype
) -> None:
    layer = heavy_linear()
    q = QuantLinear.from_linear(layer, codebook, 64, **options)  # type: ignore[arg-type]
    packed = q.packed
    if "opq" in options:
        assert packed.outliers is not None and packed.outliers.count > 0
    x = torch.randn(tokens, 256).to(dtype)
    with torch.no_grad():
        y = q(x)
    expected = x.double() @ packed.dequantize(torch.float64).T + layer.bias.double()
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(y.double(), expected, atol=tol, rtol=tol)
    assert y.dtype == dtype


def test_features_lower_the_error_and_survive_dtype_moves() -> None:
    layer = heavy_linear(64, 512)
    plain = QuantLinear.from_linear(layer, "bof4s", 64)
    better = QuantLinear.from_linear(layer, "bof4s", 64, opq=0.95, rotation="hadamard")
    w = layer.weight.detach()
    err = lambda q: float(((q.dequantize(torch.float32) - w) ** 2).sum())  # noqa: E731
    assert err(better) < 0.8 * err(plain)
    before = better.dequantize(torch.float32)
    better.to(torch.bfloat16)
    assert better.outlier_values.dtype == torch.bfloat16 and better.scales.dtype == torch.bfloat16
    better.to(torch.float16)
    assert torch.equal(better.dequantize(torch.float32), before)
    assert "opq=0.95" in repr(better) and "rotation=512" in repr(better)


def test_gradients_reach_the_input_with_rotation_and_outliers() -> None:
    q = QuantLinear.from_linear(heavy_linear(), "nf4", 64, opq=0.95, rotation="hadamard")
    x = torch.randn(3, 256, requires_grad=True)
    q(x).sum().backward()
    assert x.grad is not None
    torch.testing.assert_close(x.grad, q.dequantize(torch.float32).sum(0).expand(3, -1), atol=1e-4, rtol=1e-4)


def test_quantize_model_with_features_round_trips_through_a_checkpoint(tmp_path: Path) -> None:
    model = nn.Sequential(heavy_linear(64, 256, 1), nn.ReLU(), heavy_linear(32, 64, 2))
    config = bofrs.QuantConfig(
        codebook="bof4s", opq=0.95, rotation="hadamard", scale_dtype="dq8",
        overrides={"2": {"opq": None, "rotation": None, "scale_dtype": "bfloat16"}},
    )  # fmt: skip
    bofrs.quantize_model(model, config, progress=False)
    first, last = model[0], model[2]
    assert isinstance(first, QuantLinear) and first.rotation == 256 and first.outlier_q == 0.95
    assert isinstance(last, QuantLinear) and last.rotation is None and last.outlier_q is None
    x = torch.randn(4, 256)
    with torch.no_grad():
        expected = model(x)
    bofrs.save_quantized(model, tmp_path / "ckpt")
    skeleton = nn.Sequential(nn.Linear(256, 64), nn.ReLU(), nn.Linear(64, 32))
    loaded = bofrs.load_quantized(tmp_path / "ckpt", skeleton)
    with torch.no_grad():
        assert torch.equal(loaded(x), expected)
    again = bofrs.QuantConfig.from_dict(config.to_dict())
    assert again.opq == 0.95 and again.rotation == "hadamard"


def test_bad_feature_options() -> None:
    with pytest.raises(ValueError, match="opq"):
        bofrs.QuantConfig(opq=1.5)
    with pytest.raises(ValueError, match="rotation"):
        bofrs.QuantConfig(rotation="givens")
    with pytest.raises(ValueError, match="group_size"):
        bofrs.QuantConfig(overrides={"x": {"rotation": 48}})
    with pytest.raises(ValueError, match="QuantLinear"):
        bofrs.nn.quant_matmul(torch.randn(1, 256), bofrs.pack(torch.randn(8, 256), "nf4", 64, opq=0.9))
