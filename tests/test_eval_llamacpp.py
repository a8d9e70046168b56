"""llama.cpp peers: tensors read back from a GGUF file in the model's layout, with exact bits."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from bofrs.eval.linearity import linear_layers
from bofrs.eval import find_llama_quantize, gguf_linear_weights, llama_quantize, llamacpp_format
from tiny_models import tiny_llama

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")


def _permute(x: np.ndarray, heads: int, kv_heads: int) -> np.ndarray:
    """llama.cpp's converter's row order for llama's q/k (rotary pairs interleaved)."""
    n = kv_heads if kv_heads != heads else heads
    return x.reshape(n, 2, x.shape[0] // n // 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    """A 2-layer llama written as llama.cpp's converter would: q/k rows permuted, the MLP in
    Q4_0, v in Q8_0, the rest float32."""
    model = tiny_llama(vocab_size=64, intermediate_size=96, tie_word_embeddings=False).eval()
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny")
    writer.add_context_length(64)
    writer.add_embedding_length(64)
    writer.add_block_count(2)
    writer.add_feed_forward_length(96)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_freq_base(10000.0)
    writer.add_rope_dimension_count(16)
    writer.add_vocab_size(64)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([f"t{i}" for i in range(64)])
    writer.add_token_types([1] * 64)
    writer.add_token_merges([])
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
    q4, q8 = gguf.GGMLQuantizationType.Q4_0, gguf.GGMLQuantizationType.Q8_0
    for hf_name, tensor in model.state_dict().items():
        base, suffix = hf_name.rsplit(".", 1)
        x = tensor.detach().numpy().astype(np.float32)
        if "q_proj" in hf_name:
            x = _permute(x, 4, 4)
        if "k_proj" in hf_name:
            x = _permute(x, 4, 2)
        kind = q4 if ".mlp." in hf_name else q8 if "v_proj" in hf_name else None
        name = f"{names.get_name(base)}.{suffix}"
        if kind is not None:
            packed = gguf.quants.quantize(x, kind)
            writer.add_tensor(name, packed, raw_shape=packed.shape, raw_dtype=kind)
        else:
            writer.add_tensor(name, x)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path, model


def test_tensors_come_back_in_the_model_layout_with_exact_bits(tiny: tuple[Path, object]) -> None:
    path, model = tiny
    layers = list(linear_layers(model))  # type: ignore[arg-type]
    weights, bits, types = gguf_linear_weights(path, model, layers)  # type: ignore[arg-type]
    loaded = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)
    for name in layers:
        assert torch.equal(weights[name], loaded.get_submodule(name).weight.detach()), name
        original = model.get_submodule(name).weight.detach()  # type: ignore[attr-defined]
        if types[name] == "F32":  # q/k were permuted in the file: permuted back exactly
            assert torch.equal(weights[name], original), name
        else:
            assert 0 < float((weights[name] - original).abs().max()) < 0.05
    assert bits["model.layers.0.mlp.up_proj"] == 4.5 and types["model.layers.0.mlp.up_proj"] == "Q4_0"
    assert bits["model.layers.1.self_attn.v_proj"] == 8.5
    assert bits["model.layers.0.self_attn.q_proj"] == 32.0
    with pytest.raises(ValueError, match="no tensor"):
        gguf_linear_weights(path, model, ["model.layers.0.mlp.nothing"])  # type: ignore[arg-type]


def _binary() -> Path | None:
    try:
        return find_llama_quantize()
    except FileNotFoundError:
        return None


@pytest.mark.skipif(_binary() is None, reason="llama-quantize not available (set LLAMA_QUANTIZE)")
def test_requantized_with_llama_quantize(tiny: tuple[Path, object], tmp_path: Path) -> None:
    path, model = tiny
    layers = list(linear_layers(model))  # type: ignore[arg-type]
    peer = llamacpp_format(model, path, "Q4_0", layers, workdir=tmp_path, threads=1)  # type: ignore[arg-type]
    assert peer.name == "llama.cpp Q4_0" and peer.info["tensor_types"] == {"Q4_0": len(layers)}
    assert set(peer.bits.values()) == {4.5}
    target = Path(str(peer.info["gguf"]))
    stamp = target.stat().st_mtime_ns
    llamacpp_format(model, path, "Q4_0", layers, workdir=tmp_path)  # type: ignore[arg-type]
    assert target.stat().st_mtime_ns == stamp  # reused
    with pytest.raises(ChildProcessError, match="llama-quantize failed"):
        llama_quantize(_binary(), path, tmp_path / "bad.gguf", "NOT_A_TYPE")  # type: ignore[arg-type]


def test_finding_the_binary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LLAMA_QUANTIZE", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="llama-quantize"):
        find_llama_quantize()
    with pytest.raises(FileNotFoundError, match="not an executable"):
        find_llama_quantize(tmp_path / "missing")
    tool = tmp_path / "llama-quantize"
    tool.write_text("#!/bin/sh\nexit 0\n")
    tool.chmod(0o755)
    assert find_llama_quantize(tmp_path) == tool
    assert find_llama_quantize() == tool
    monkeypatch.setenv("LLAMA_QUANTIZE", str(tool))
    assert find_llama_quantize() == tool
    with pytest.raises(ValueError, match="type_name"):
        llama_quantize(tool, tmp_path / "a.gguf", tmp_path / "b.gguf", "Q4_0; rm")
    assert os.access(tool, os.X_OK)
