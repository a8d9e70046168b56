"""HiggsLinear: HIGGS weights in a model, fused and decoded paths, checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import bofrs
from bofrs.nn import HiggsLinear


@pytest.mark.parametrize(("bits", "p"), [(4, 2), (4, 1), (3, 2), (2, 1), (5, 1), (6, 1)])
@pytest.mark.parametrize("in_features", [256, 200])
@pytest.mark.parametrize("tokens", [1, 7, 50])
def test_output_equals_decoded_weight_product(bits: int, p: int, in_features: int, tokens: int) -> None:
    torch.manual_seed(in_features + tokens)
    linear = nn.Linear(in_features, 40)
    layer = HiggsLinear.from_linear(linear, bits, p, 64)
    x = torch.randn(2, tokens, in_features)
    with torch.no_grad():
        y = layer(x)
    expected = x.double() @ layer.dequantize(torch.float64).T + linear.bias.double()
    torch.testing.assert_close(y.double(), expected, atol=2e-4, rtol=2e-4)
    assert y.shape == (2, tokens, 40)


def test_dtypes_gradients_and_repr() -> None:
    layer = HiggsLinear.from_linear(nn.Linear(128, 16), 4, 2, 128)
    x = torch.randn(3, 128, requires_grad=True)
    layer(x).sum().backward()
    assert x.grad is not None
    torch.testing.assert_close(x.grad, layer.dequantize(torch.float32).sum(0).expand(3, -1), atol=1e-4, rtol=1e-4)
    before = layer.dequantize(torch.float32)
    layer.to(torch.bfloat16)
    assert layer.scales.dtype == torch.float16 and layer.grid_points.dtype == torch.float32
    assert torch.equal(layer.dequantize(torch.float32), before)
    assert layer(torch.randn(2, 128, dtype=torch.bfloat16)).dtype == torch.bfloat16
    assert "p=2, n=256" in repr(layer)


def test_quantize_model_with_higgs_and_checkpoint_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 64), nn.ReLU(), nn.Linear(64, 32))
    config = bofrs.QuantConfig(codebook="higgs", bits=4, p=2, group_size=64,
                               overrides={"2": {"codebook": "bof4s", "block_size": 64}})
    bofrs.quantize_model(model, config, progress=False)
    assert isinstance(model[0], HiggsLinear) and isinstance(model[2], bofrs.nn.QuantLinear)
    x = torch.randn(5, 256)
    with torch.no_grad():
        expected = model(x)
    bofrs.save_quantized(model, tmp_path / "ckpt")
    loaded = bofrs.load_quantized(tmp_path / "ckpt", nn.Sequential(nn.Linear(256, 64), nn.ReLU(), nn.Linear(64, 32)))
    assert isinstance(loaded[0], HiggsLinear)
    with torch.no_grad():
        assert torch.equal(loaded(x), expected)
    assert bofrs.QuantConfig.from_dict(config.to_dict()).group_size == 64


def test_bad_arguments() -> None:
    with pytest.raises(TypeError, match="HiggsTensor"):
        HiggsLinear(bofrs.pack(torch.randn(4, 64), "nf4", 64))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="bits"):
        bofrs.QuantConfig(codebook="higgs", bits=5)  # 5 bits only with p=1
    with pytest.raises(ValueError, match="bits"):
        bofrs.QuantConfig(codebook="higgs", bits=7, p=1)
    with pytest.raises(ValueError, match="higgs"):
        bofrs.QuantConfig(codebook="higgs", opq=0.9)
    layer = HiggsLinear.from_linear(nn.Linear(64, 8), 4, 1, 64)
    with pytest.raises(ValueError, match="64"):
        layer(torch.randn(2, 63))
