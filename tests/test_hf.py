"""The transformers plug-in, offline, on a tiny random Llama saved to a temporary directory."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

import bofrs
from bofrs.nn import QuantLinear
from tiny_models import logits, tiny_llama

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    model = tiny_llama().eval()
    path = tmp_path_factory.mktemp("llama")
    model.save_pretrained(path)
    return path, model


def test_quantize_on_load_save_and_reload(llama_dir: tuple[Path, torch.nn.Module], tmp_path: Path) -> None:
    path, original = llama_dir
    config = bofrs.BofrsConfig(block_size=32, overrides={"down_proj": {"codebook": "af4"}})
    model = transformers.AutoModelForCausalLM.from_pretrained(path, quantization_config=config)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert len(layers) == 2 * 7
    assert type(model.lm_head) is torch.nn.Linear
    assert model.model.layers[1].mlp.down_proj.codebook.name == "af4"
    assert not any(m._parameters.get("weight") is not None for m in layers.values())
    ids = torch.randint(0, 96, (1, 12))
    quantized = logits(model, ids)

    # Same packing as bofrs.quantize_model on the float model.
    expected = bofrs.quantize_model(copy.deepcopy(original), config.quant_config(), progress=False)
    assert torch.equal(quantized, logits(expected, ids))

    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert saved["quant_method"] == "bofrs" and saved["block_size"] == 32
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert isinstance(reloaded.model.layers[0].self_attn.q_proj, QuantLinear)
    for (name, a), (name_b, b) in zip(model.state_dict().items(), reloaded.state_dict().items()):
        assert name == name_b and a.dtype == b.dtype and torch.equal(a, b), name
    assert torch.equal(logits(reloaded, ids), quantized)


def test_bofrs_config_validates() -> None:
    with pytest.raises(ValueError, match="block_size"):
        bofrs.BofrsConfig(block_size=100)
    with pytest.raises(ValueError, match="codebook"):
        bofrs.BofrsConfig(codebook="nf5")
    config = bofrs.BofrsConfig(codebook=bofrs.codebook("int4"), skip=["lm_head", "q_proj"])
    from transformers.quantizers.auto import AutoQuantizationConfig

    restored = AutoQuantizationConfig.from_dict(config.to_dict())
    assert isinstance(restored, bofrs.BofrsConfig)
    assert restored.quant_config() == config.quant_config()


def test_bfloat16_load_with_float32_scales_round_trips(
    llama_dir: tuple[Path, torch.nn.Module], tmp_path: Path
) -> None:
    path, _ = llama_dir
    config = bofrs.BofrsConfig(block_size=64, scale_dtype="float32")
    model = transformers.AutoModelForCausalLM.from_pretrained(path, quantization_config=config, dtype=torch.bfloat16)
    layer = model.model.layers[0].mlp.up_proj
    assert isinstance(layer, QuantLinear) and layer.scales.dtype == torch.float32
    assert layer.weight_dtype == torch.bfloat16 and model.model.norm.weight.dtype == torch.bfloat16
    ids = torch.randint(0, 96, (2, 5))
    out = logits(model, ids)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    model.save_pretrained(tmp_path)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    again = reloaded.model.layers[0].mlp.up_proj
    assert again.scales.dtype == torch.float32 and torch.equal(again.scales, layer.scales)
    assert torch.equal(logits(reloaded, ids), out)


def test_load_quantized_rebuilds_a_transformers_model(
    llama_dir: tuple[Path, torch.nn.Module], tmp_path: Path
) -> None:
    _, original = llama_dir
    model = bofrs.quantize_model(copy.deepcopy(original), bofrs.QuantConfig(block_size=32), progress=False)
    bofrs.save_quantized(model, tmp_path, max_shard_bytes=50_000)
    loaded = bofrs.load_quantized(tmp_path)  # no skeleton: built from the recorded config
    assert type(loaded) is type(model)
    for (name, a), (name_b, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert name == name_b and a.dtype == b.dtype and torch.equal(a, b), name
    ids = torch.randint(0, 96, (1, 9))
    assert torch.equal(logits(loaded, ids), logits(model, ids))
    # The skeleton holds no dense weights (meta device): a model larger than RAM streams.
    skeleton = bofrs.io.checkpoint._skeleton(bofrs.io.checkpoint.read_index(tmp_path))
    assert all(p.is_meta for p in skeleton.parameters())
