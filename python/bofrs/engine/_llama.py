"""LlamaEngine: a transformers Llama-architecture model copied into the native decoder, with
``forward`` (logits) and greedy ``generate``."""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from bofrs import _native
from bofrs.engine._layers import add_linear, floats
from bofrs.formats.blockwise.matmul import check_activations

#: ``config.model_type`` values the engine runs (Llama and Mistral share the layout; Mistral
#: adds the sliding window).
SUPPORTED_MODEL_TYPES = ("llama", "mistral")
#: Rotary embeddings whose frequency table is fixed (the engine uses it as transformers built it).
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")
#: KV cache length when ``max_length`` is not given (capped by the model's own limit).
DEFAULT_MAX_LENGTH = 2048
_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")


def _config_value(config: Any, name: str, default: Any = None) -> Any:
    return getattr(config, name, default)


def _check_config(model: Any) -> Any:
    """The model's transformers config, after refusing what the engine does not run."""
    config = getattr(model, "config", None)
    model_type = _config_value(config, "model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"model must be a transformers causal LM of type {SUPPORTED_MODEL_TYPES}, got "
            f"{type(model).__name__} with model_type={model_type!r}"
        )
    if not isinstance(getattr(model, "lm_head", None), nn.Module):
        raise ValueError(
            f"model must be a causal LM with an lm_head (LlamaForCausalLM, MistralForCausalLM), "
            f"got {type(model).__name__}"
        )
    act = _config_value(config, "hidden_act")
    if act != "silu":
        raise ValueError(f"model.config.hidden_act must be 'silu', got {act!r}")
    rope = getattr(getattr(getattr(model, "model", None), "rotary_emb", None), "rope_type", None)
    if rope not in STATIC_ROPE_TYPES:
        raise ValueError(
            f"the rotary embedding must have a fixed table {STATIC_ROPE_TYPES}, got rope_type={rope!r}"
        )
    return config


def _token_ids(input_ids: object) -> npt.NDArray[np.int64]:
    """``input_ids`` (a tensor ``[tokens]`` / ``[1, tokens]`` of integers, a 1-D integer array,
    or a sequence of ints)
    as an int64 array of at least one token."""
    if isinstance(input_ids, torch.Tensor):
        if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
            raise TypeError(f"input_ids must hold integers, got {input_ids.dtype}")
        if input_ids.dim() == 2 and input_ids.shape[0] == 1:
            input_ids = input_ids[0]
        if input_ids.dim() != 1:
            raise ValueError(
                f"input_ids must have shape [tokens] or [1, tokens] (one sequence), got "
                f"{tuple(input_ids.shape)}"
            )
        ids = input_ids.detach().cpu().to(torch.int64).numpy()
    elif isinstance(input_ids, np.ndarray):
        if input_ids.dtype.kind not in "iu" or input_ids.ndim != 1:
            raise TypeError(f"input_ids as an array must be 1-D integers, got {input_ids.dtype} {input_ids.shape}")
        ids = input_ids.astype(np.int64, copy=False)
    elif isinstance(input_ids, Sequence) and not isinstance(input_ids, (str, bytes)):
        if not all(isinstance(t, numbers.Integral) and not isinstance(t, bool) for t in input_ids):
            raise TypeError("input_ids must be a tensor or a sequence of ints")
        ids = np.asarray(list(input_ids), dtype=np.int64)
    else:
        raise TypeError(f"input_ids must be a tensor or a sequence of ints, got {type(input_ids).__name__}")
    if ids.size == 0:
        raise ValueError("input_ids must hold at least one token")
    return np.ascontiguousarray(ids)


class LlamaEngine:
    """A transformers ``LlamaForCausalLM`` / ``MistralForCausalLM`` on the native CPU decoder.

    ``model``'s projections may be :class:`bofrs.nn.QuantLinear` (their packed codes and scales
    are copied as they are; rotation, OPQ outliers, double-quantized scales and biases included)
    or ``nn.Linear`` (dense float32); the embeddings and norms are copied as float32, and a
    head tied to the embeddings stays tied. Everything computes in float32, as transformers does
    a float32 model: with ``activations="float"`` the logits agree with the same model in
    transformers to float rounding. ``activations`` (``"float"``, ``"int16"``, ``"int8"``, see
    :data:`bofrs.nn.ACTIVATION_MODES`) sets every packed layer's mode; ``None`` (default) keeps
    each QuantLinear's own. ``max_length`` is the KV cache length (default the model's limit,
    at most 2048); ``isa`` picks the kernel variant (default: the best of this CPU).

    The engine holds its own copy of the weights: later changes to ``model`` do not reach it.
    Unsupported models (other architectures, activations or rope types, HIGGS layers, weights off
    the CPU) raise ``ValueError`` naming what is unsupported.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        activations: str | None = None,
        max_length: int | None = None,
        isa: str | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        config = _check_config(model)
        if activations is not None:
            check_activations(activations)
        limit = int(_config_value(config, "max_position_embeddings", DEFAULT_MAX_LENGTH))
        if max_length is None:
            max_length = min(limit, DEFAULT_MAX_LENGTH)
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
            raise ValueError(f"max_length must be a positive int, got {max_length!r}")
        decoder: Any = model.model
        layers = decoder.layers
        heads = int(config.num_attention_heads)
        hidden = int(config.hidden_size)
        head_dim = _config_value(config, "head_dim") or hidden // heads
        window = _config_value(config, "sliding_window") if config.model_type == "mistral" else None
        rotary = decoder.rotary_emb
        eps = float(decoder.norm.variance_epsilon)
        builder = _native.LlamaBuilder(
            hidden_size=hidden,
            intermediate_size=int(config.intermediate_size),
            num_layers=len(layers),
            num_heads=heads,
            num_kv_heads=int(_config_value(config, "num_key_value_heads") or heads),
            head_dim=int(head_dim),
            vocab_size=int(decoder.embed_tokens.num_embeddings),
            rms_norm_eps=eps,
            inv_freq=floats(rotary.inv_freq),
            attention_scaling=float(rotary.attention_scaling),
            sliding_window=None if window is None else int(window),
            max_positions=max_length,
        )
        builder.embedding(floats(decoder.embed_tokens.weight))
        builder.norm(None, "norm", floats(decoder.norm.weight))
        for i, layer in enumerate(layers):
            for norm in ("input_layernorm", "post_attention_layernorm"):
                module = getattr(layer, norm)
                if float(module.variance_epsilon) != eps:
                    raise ValueError(f"model.layers.{i}.{norm} has another epsilon than model.norm")
                builder.norm(i, norm, floats(module.weight))
            for part, names in (("self_attn", _ATTENTION), ("mlp", _MLP)):
                for name in names:
                    module = getattr(getattr(layer, part), name)
                    add_linear(builder, i, name, f"model.layers.{i}.{part}.{name}", module, activations)
        head: Any = model.lm_head
        tied = isinstance(head, nn.Linear) and head.weight is decoder.embed_tokens.weight and head.bias is None
        if not tied:
            add_linear(builder, None, "lm_head", "lm_head", head, activations)
        self._native = builder.build(isa)
        self.vocab_size = self._native.vocab_size
        self.max_length = self._native.max_positions
        self._step = np.zeros(1, dtype=np.int64)

    def forward(self, input_ids: torch.Tensor | npt.NDArray[np.integer[Any]] | Sequence[int]) -> torch.Tensor:
        """Logits (float32 ``[1, tokens, vocab_size]``) of one sequence, from position 0 (as
        transformers' ``model(input_ids).logits`` without a cache)."""
        ids = _token_ids(input_ids)
        logits = self._native.forward(ids, 0, True)
        return torch.from_numpy(logits).unsqueeze(0)

    __call__ = forward

    def generate(
        self,
        input_ids: torch.Tensor | npt.NDArray[np.integer[Any]] | Sequence[int],
        max_new_tokens: int,
        *,
        eos_token_id: int | None = None,
    ) -> torch.Tensor:
        """Greedy decoding: ``input_ids`` followed by up to ``max_new_tokens`` tokens (int64
        ``[1, tokens]``), stopping after ``eos_token_id`` when given. The prompt runs as one
        pass; each new token is one native call continuing the KV cache."""
        ids = _token_ids(input_ids)
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
        if eos_token_id is not None and (isinstance(eos_token_id, bool) or not isinstance(eos_token_id, int)):
            raise TypeError(f"eos_token_id must be an int or None, got {type(eos_token_id).__name__}")
        if ids.size + max_new_tokens > self.max_length:
            raise ValueError(
                f"{ids.size} prompt tokens + max_new_tokens={max_new_tokens} exceed max_length="
                f"{self.max_length} (build the engine with a larger max_length)"
            )
        out = list(ids.tolist())
        if max_new_tokens == 0:
            return torch.tensor([out], dtype=torch.int64)
        logits = self.start(ids)
        for k in range(max_new_tokens):
            token = int(torch.argmax(logits))
            out.append(token)
            if token == eos_token_id or k + 1 == max_new_tokens:
                break
            logits = self.advance(token)
        return torch.tensor([out], dtype=torch.int64)

    def start(self, input_ids: torch.Tensor | npt.NDArray[np.integer[Any]] | Sequence[int]) -> torch.Tensor:
        """Starts a sequence over: runs ``input_ids`` from position 0 into the KV cache and
        returns the last token's logits (float32 ``[vocab_size]``)."""
        return torch.from_numpy(self._native.forward(_token_ids(input_ids), 0, False)[0])

    def advance(self, token: int) -> torch.Tensor:
        """Runs one more token after those in the KV cache and returns its logits (float32
        ``[vocab_size]``): one native call."""
        if isinstance(token, bool) or not isinstance(token, numbers.Integral):
            raise TypeError(f"token must be an int, got {type(token).__name__}")
        if self._native.cached_positions == 0:
            raise ValueError("advance continues a sequence: call start(input_ids) first")
        self._step[0] = token
        return torch.from_numpy(self._native.forward(self._step)[0])

    @property
    def cached_positions(self) -> int:
        """Positions the KV cache holds (the prompt and the tokens advanced since)."""
        return self._native.cached_positions

    def __repr__(self) -> str:
        return f"LlamaEngine(vocab_size={self.vocab_size}, max_length={self.max_length})"
