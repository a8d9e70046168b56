"""bofrs.engine.LlamaEngine (the native decoder) against transformers running the same model with
the same QuantLinear layers: logits, greedy generation, the KV cache, and refused inputs. Tiny
random models with odd sizes; a few seconds in all."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

import bofrs  # noqa: E402
from bofrs import _native  # noqa: E402
from bofrs.engine import LlamaEngine  # noqa: E402

#: Float activations: the engine computes every step in float32 as transformers does, in other
#: summation orders; logits agree to this much of the largest |logit| (measured: about 5e-7).
FLOAT_BOUND = 2e-5
#: int8 activations: per product the engine's kernel is bit-identical to QuantLinear's, but a
#: float-rounding difference upstream can move a value across an int8 rounding boundary (one
#: step of 1/127 of its group's max). Measured: 2.4e-7; int8 against the float path differs by
#: about 4e-2 on the same model, so the bound tells the two apart.
INT8_BOUND = 1e-3


def _llama(seed: int, **overrides: Any) -> Any:
    options: dict[str, Any] = dict(
        vocab_size=101, hidden_size=128, intermediate_size=192, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=False, rms_norm_eps=1e-5,
    )  # fmt: skip
    options.update(overrides)
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(**options)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # larger norms than the init's ones, so that every layer matters
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0, 0.1)
    return model


def _mistral(seed: int, window: int) -> Any:
    torch.manual_seed(seed)
    config = transformers.MistralConfig(
        vocab_size=89, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=64,
        sliding_window=window, tie_word_embeddings=True,
    )  # fmt: skip
    model = transformers.MistralForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.1)
    return model


def _quantized(model: Any, **options: Any) -> Any:
    return bofrs.quantize_model(model, bofrs.QuantConfig(**options), progress=False)


def _ids(vocab: int, n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(seed))


def _hf_logits(model: Any, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits.float()


def _relative(got: torch.Tensor, ref: torch.Tensor) -> float:
    assert got.shape == ref.shape
    assert torch.isfinite(got).all()
    return float((got - ref).abs().max() / ref.abs().max())


# ---------------------------------------------------------------------------------------------
# Logits against transformers


CASES = {
    # untied head (quantized too), biases in attention and MLP, NF4 block 64
    "untied-bias-nf4": (lambda: _llama(1, attention_bias=True, mlp_bias=True), dict(codebook="nf4", skip=())),
    # tied head (left dense and shared with the embedding), odd head_dim product widths, block 32
    "tied-headdim-bof4s": (
        lambda: _llama(2, tie_word_embeddings=True, head_dim=24, intermediate_size=160),
        dict(codebook="bof4s", block_size=32),
    ),
    # Hadamard rotation, OPQ outliers and double-quantized scales, some layers left dense
    "rotation-opq-dq8-mixed": (
        lambda: _llama(3),
        dict(codebook="nf4", rotation="hadamard", opq=0.9, scale_dtype="dq8",
             overrides={"layers.1.mlp.*": {"skip": True}}, skip=()),
    ),  # fmt: skip
    # grouped-query attention with a single KV head and a sliding window shorter than the input
    "mistral-window": (lambda: _mistral(4, window=5), dict(codebook="nf4", block_size=32)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_float_logits_match_transformers(case: str) -> None:
    build, options = CASES[case]
    model = _quantized(build(), **options)
    engine = LlamaEngine(model)
    ids = _ids(model.config.vocab_size, 13, seed=len(case))
    ref = _hf_logits(model, ids)
    assert _relative(engine.forward(ids), ref) < FLOAT_BOUND
    # the engine ran the 4-bit weights: the unquantized model (same seed) is far off
    assert _relative(engine.forward(ids), _hf_logits(build(), ids)) > 100 * FLOAT_BOUND


def test_the_rotation_opq_case_uses_every_feature() -> None:
    build, options = CASES["rotation-opq-dq8-mixed"]
    model = _quantized(build(), **options)
    q = model.model.layers[0].self_attn.q_proj
    assert isinstance(q, bofrs.nn.QuantLinear)
    assert q.rotation is not None and q.packed.outlier_count > 0 and "scale_scales" in q.packed_buffer_names()
    assert type(model.model.layers[1].mlp.up_proj) is torch.nn.Linear
    assert isinstance(model.lm_head, bofrs.nn.QuantLinear)


def test_dense_model_matches_transformers() -> None:
    model = _llama(5, tie_word_embeddings=True)
    ids = _ids(101, 9)
    assert _relative(LlamaEngine(model).forward(ids), _hf_logits(model, ids)) < FLOAT_BOUND


def test_int8_logits_match_transformers_int8() -> None:
    model = _quantized(_llama(6), codebook="nf4", skip=())
    ids = _ids(101, 11, seed=3)
    exact = LlamaEngine(model).forward(ids)
    bofrs.nn.set_activations(model, "int8")
    ref = _hf_logits(model, ids)
    # the layers' own mode is taken by default, and the argument overrides it
    for engine in (LlamaEngine(model), LlamaEngine(_quantized(_llama(6), codebook="nf4", skip=()), activations="int8")):
        got = engine.forward(ids)
        assert _relative(got, ref) < INT8_BOUND
        assert not torch.equal(got, exact)  # the integer path really ran


def test_sliding_window_matters() -> None:
    """The window changes the logits past it (so the Mistral case tests it)."""
    ids = _ids(89, 12)
    narrow = LlamaEngine(_mistral(4, window=3)).forward(ids)
    wide = LlamaEngine(_mistral(4, window=64)).forward(ids)
    assert torch.allclose(narrow[:, :3], wide[:, :3], atol=1e-5)
    assert not torch.allclose(narrow[:, 5:], wide[:, 5:], atol=1e-3)


# ---------------------------------------------------------------------------------------------
# Generation and the KV cache


@pytest.mark.parametrize("tied", [False, True])
def test_greedy_generation_matches_transformers(tied: bool) -> None:
    model = _quantized(_llama(7, tie_word_embeddings=tied), codebook="nf4", skip=())
    prompt = _ids(101, 6, seed=1)
    with torch.no_grad():
        ref = model.generate(prompt, max_new_tokens=12, do_sample=False, min_new_tokens=12, pad_token_id=0)
    got = LlamaEngine(model).generate(prompt, 12)
    assert got.dtype == torch.int64 and got.shape == (1, 18)
    assert got.tolist() == ref.tolist()


def test_generation_longer_than_a_native_batch() -> None:
    """Prompts over 32 tokens run in chunks; the logits of each position still match."""
    model = _quantized(_llama(8, max_position_embeddings=128), codebook="nf4")
    ids = _ids(101, 70, seed=2)
    engine = LlamaEngine(model)
    assert _relative(engine.forward(ids), _hf_logits(model, ids)) < FLOAT_BOUND


def test_start_and_advance_continue_the_cache() -> None:
    model = _quantized(_llama(9), codebook="nf4")
    engine = LlamaEngine(model)
    ids = _ids(101, 10, seed=4)[0]
    full = engine.forward(ids)[0]
    first = engine.start(ids[:6])
    assert torch.allclose(first, full[5], atol=1e-5, rtol=1e-5)
    for k in range(6, 10):
        step = engine.advance(int(ids[k]))
        assert torch.allclose(step, full[k], atol=1e-5, rtol=1e-5)
    assert engine.cached_positions == 10
    # a new start drops the old sequence
    again = engine.start(ids[:6])
    assert torch.equal(again, first) and engine.cached_positions == 6


def test_generation_stops_at_eos() -> None:
    model = _quantized(_llama(10), codebook="nf4")
    engine = LlamaEngine(model)
    prompt = [3, 1, 4, 1, 5]
    free = engine.generate(prompt, 6)[0].tolist()
    eos = free[len(prompt) + 2]
    stopped = engine.generate(prompt, 6, eos_token_id=eos)[0].tolist()
    assert stopped == free[: free.index(eos, len(prompt)) + 1]
    assert engine.generate(prompt, 0).tolist() == [prompt]


def test_engine_keeps_its_own_weights() -> None:
    model = _quantized(_llama(11), codebook="nf4")
    engine = LlamaEngine(model)
    ids = _ids(101, 5)
    before = engine.forward(ids)
    with torch.no_grad():
        model.model.norm.weight.mul_(2)
    assert torch.equal(engine.forward(ids), before)


# ---------------------------------------------------------------------------------------------
# Refused inputs


@pytest.fixture(scope="module")
def small() -> tuple[Any, LlamaEngine]:
    model = _quantized(_llama(12), codebook="nf4")
    return model, LlamaEngine(model, max_length=16)


def test_bad_token_inputs(small: tuple[Any, LlamaEngine]) -> None:
    _, engine = small
    with pytest.raises(ValueError, match="token_ids.*vocabulary"):
        engine.forward([1, 101])
    with pytest.raises(ValueError, match="vocab_size"):
        engine.forward([1, -1])
    with pytest.raises(ValueError, match="one sequence"):
        engine.forward(torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(TypeError, match="integers"):
        engine.forward(torch.zeros(1, 3))
    with pytest.raises(TypeError, match="input_ids"):
        engine.forward("hello")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at least one token"):
        engine.forward([])
    with pytest.raises(ValueError, match="max_length"):
        engine.forward(list(range(17)))
    with pytest.raises(ValueError, match="max_length"):
        engine.generate([1, 2, 3], 14)
    with pytest.raises(ValueError, match="max_new_tokens"):
        engine.generate([1, 2, 3], -1)
    with pytest.raises(TypeError, match="eos_token_id"):
        engine.generate([1, 2, 3], 2, eos_token_id=1.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="token"):
        engine.advance(1.0)  # type: ignore[arg-type]
    # after all of these the engine still works
    assert engine.forward([1, 2]).shape == (1, 2, 101)


def test_advance_needs_a_start() -> None:
    engine = LlamaEngine(_quantized(_llama(13), codebook="nf4"))
    with pytest.raises(ValueError, match="start"):
        engine.advance(1)


def test_bad_model_inputs() -> None:
    with pytest.raises(TypeError, match="model"):
        LlamaEngine("llama")  # type: ignore[arg-type]
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(ValueError, match="model_type='gpt2'"):
        LlamaEngine(gpt2)
    with pytest.raises(ValueError, match="lm_head"):
        LlamaEngine(_llama(14).model)
    with pytest.raises(ValueError, match="hidden_act"):
        LlamaEngine(_llama(14, hidden_act="gelu"))
    with pytest.raises(ValueError, match="rope_type='dynamic'"):
        LlamaEngine(_llama(14, rope_scaling={"rope_type": "dynamic", "factor": 2.0}))
    with pytest.raises(ValueError, match="activations"):
        LlamaEngine(_llama(14), activations="int4")
    with pytest.raises(ValueError, match="max_length"):
        LlamaEngine(_llama(14), max_length=0)
    higgs = _quantized(_llama(14), codebook="higgs", group_size=64)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.q_proj is a HiggsLinear"):
        LlamaEngine(higgs)


def test_partial_blocks_are_refused() -> None:
    model = _quantized(_llama(15, intermediate_size=200), codebook="nf4")  # 200 % 64 != 0
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.down_proj.*whole blocks"):
        LlamaEngine(model)


def _builder(**overrides: Any) -> _native.LlamaBuilder:
    options: dict[str, Any] = dict(
        hidden_size=8, intermediate_size=16, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=4,
        vocab_size=5, rms_norm_eps=1e-6, inv_freq=np.ones(2, np.float32), attention_scaling=1.0,
        sliding_window=None, max_positions=8,
    )  # fmt: skip
    options.update(overrides)
    return _native.LlamaBuilder(**options)


def test_native_builder_refuses_bad_arguments() -> None:
    with pytest.raises(ValueError, match="num_kv_heads"):
        _builder(num_kv_heads=3)
    with pytest.raises(ValueError, match="inv_freq"):
        _builder(inv_freq=np.ones(3, np.float32))
    with pytest.raises(ValueError, match="sliding_window"):
        _builder(sliding_window=0)
    builder = _builder()
    with pytest.raises(ValueError, match="name must be one of"):
        builder.norm(0, "final_norm", np.ones(8, np.float32))
    with pytest.raises(ValueError, match="layer 3 is out of range"):
        builder.dense_linear(3, "q_proj", 8, 8, np.zeros(64, np.float32))
    with pytest.raises(ValueError, match="weight"):
        builder.dense_linear(0, "q_proj", 8, 8, np.zeros(63, np.float32))
    with pytest.raises(ValueError, match="not finite"):
        builder.dense_linear(0, "q_proj", 8, 8, np.full(64, np.nan, np.float32))
    with pytest.raises(ValueError, match="go together"):
        builder.packed_linear(
            0, "q_proj", 8, 16, np.zeros(64, np.uint8), np.ones(8, np.float32),
            np.linspace(-1, 1, 16, dtype=np.float32), 16, "float", outlier_indices=np.zeros(1, np.uint64),
        )  # fmt: skip
    with pytest.raises(ValueError, match="embedding was not given"):
        builder.build()
    builder = _builder()
    builder.embedding(np.zeros(40, np.float32))
    builder.norm(None, "norm", np.ones(8, np.float32))
    with pytest.raises(ValueError, match="layers.0.q_proj was not given"):
        builder.build()
    builder = _builder()
    builder.embedding(np.zeros(40, np.float32))
    builder.norm(None, "norm", np.ones(8, np.float32))
    builder.norm(0, "input_layernorm", np.ones(8, np.float32))
    builder.norm(0, "post_attention_layernorm", np.ones(8, np.float32))
    for name, out, inp in [("q_proj", 8, 8), ("k_proj", 4, 8), ("v_proj", 4, 8), ("o_proj", 8, 8),
                           ("gate_proj", 16, 8), ("up_proj", 16, 8), ("down_proj", 8, 8)]:  # fmt: skip
        builder.dense_linear(0, name, out, inp, np.zeros(out * inp, np.float32))
    with pytest.raises(ValueError, match=r"down_proj is \[8, 8\], expected \[8, 16\]"):
        builder.build()
