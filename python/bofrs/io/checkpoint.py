"""Quantized model checkpoints: a directory of bofrs safetensors shards plus a JSON index.

Layout of ``directory``:

- ``bofrs_model.json``: ``format`` = ``"bofrs.model"``, ``format_version`` = 1, the
  :class:`QuantConfig` used, every quantized layer (name, features, bias, dtypes), the shards
  and the entries each holds, aliases of shared tensors, and the model's transformers config
  when it has one;
- ``model-XXXXX-of-YYYYY.safetensors``: bofrs files (:func:`bofrs.save_file`): the weight of a
  QuantLinear ``name`` is the packed tensor ``name.weight``, everything else of the state dict
  is stored as is. Every shard is validated on read (checksums, manifest, version).

Loading goes shard by shard (each file is memory-mapped and its tensors copied into the model
before the next one is opened), so peak memory is the model plus one shard.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from bofrs._dtypes import dtype_from_name, dtype_name
from bofrs._errors import FormatError
from bofrs.formats.tensor import QuantizedTensor
from bofrs.io.files import load_file, save_file
from bofrs.nn.base import PackedLinear
from bofrs.nn.linear import FUSED_MAX_TOKENS
from bofrs.nn.quantize import LINEAR_MODULES, QuantConfig

#: Modules whose weight is stored packed.
QuantModule = PackedLinear

INDEX = "bofrs_model.json"
MODEL_FORMAT = "bofrs.model"
MODEL_FORMAT_VERSION = 1
PathLike = str | os.PathLike[str]


def _quant_layers(model: nn.Module) -> dict[str, QuantModule]:
    return {
        n: m
        for n, m in model.named_modules(remove_duplicate=False)
        if isinstance(m, PackedLinear)
    }


def _entries(
    model: nn.Module,
) -> tuple[dict[str, QuantizedTensor | torch.Tensor], dict[str, str]]:
    """What gets stored (name -> packed or plain tensor) and aliases (name -> stored name)."""
    layers = _quant_layers(model)
    entries: dict[str, QuantizedTensor | torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple[Any, ...], str] = {}
    quant_keys: set[str] = set()
    for name, layer in layers.items():
        prefix = f"{name}." if name else ""
        quant_keys.update(prefix + b for b in layer.packed_buffer_names())
        key = ("packed", id(layer))
        if key in seen:
            aliases[prefix + "weight"] = seen[key]
            continue
        seen[key] = prefix + "weight"
        entries[prefix + "weight"] = layer.packed
    for key_name, tensor in model.state_dict().items():
        if key_name in quant_keys:
            continue
        ident = (tensor.device, tensor.dtype, tensor.data_ptr(), tuple(tensor.shape), tensor.stride())
        if tensor.numel() and ident in seen:
            aliases[key_name] = seen[ident]
            continue
        seen[ident] = key_name
        entries[key_name] = tensor
    return entries, aliases


def _nbytes(value: QuantizedTensor | torch.Tensor) -> int:
    if isinstance(value, QuantizedTensor):
        return value.nbytes
    return value.numel() * value.element_size()


def save_quantized(
    model: nn.Module,
    directory: PathLike,
    *,
    config: QuantConfig | None = None,
    max_shard_bytes: int = 2 << 30,
) -> None:
    """Writes ``model`` (with its QuantLinear layers) to ``directory`` (see the module doc).

    ``config``: the :class:`QuantConfig` to record (informational); ``max_shard_bytes``: shard
    size limit (a single larger tensor gets a shard of its own).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(max_shard_bytes, bool) or not isinstance(max_shard_bytes, int) or max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be a positive int, got {max_shard_bytes!r}")
    entries, aliases = _entries(model)
    groups: list[list[str]] = [[]]
    size = 0
    for name, value in entries.items():
        n = _nbytes(value)
        if groups[-1] and size + n > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += n
    os.makedirs(directory, exist_ok=True)
    shards: dict[str, list[str]] = {}
    for i, names in enumerate(groups):
        file = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file({n: entries[n] for n in names}, os.path.join(directory, file))
        shards[file] = names
    layers = {
        name: {
            "in_features": m.in_features,
            "out_features": m.out_features,
            "bias": None if m.bias is None else dtype_name(m.bias.dtype),
            "fused_max_tokens": m.fused_max_tokens,
        }
        for name, m in _quant_layers(model).items()
    }
    hf_config = getattr(model, "config", None)
    index = {
        "format": MODEL_FORMAT,
        "format_version": MODEL_FORMAT_VERSION,
        "quant_config": None if config is None else config.to_dict(),
        "layers": layers,
        "shards": shards,
        "aliases": aliases,
        "hf_config": hf_config.to_dict() if hf_config is not None and hasattr(hf_config, "to_dict") else None,
    }
    with open(os.path.join(directory, INDEX), "w", encoding="utf-8") as handle:
        json.dump(index, handle, indent=1, default=str)


def read_index(directory: PathLike) -> dict[str, Any]:
    """The validated JSON index of a checkpoint directory."""
    path = os.path.join(os.fspath(directory), INDEX)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} (not a bofrs checkpoint directory)")
    try:
        with open(path, encoding="utf-8") as handle:
            index = json.load(handle)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise FormatError(f"{path}: unreadable checkpoint index: {err}") from err
    if not isinstance(index, dict) or index.get("format") != MODEL_FORMAT:
        raise FormatError(f"{path}: not a bofrs model checkpoint")
    version = index.get("format_version")
    if version != MODEL_FORMAT_VERSION:
        raise FormatError(
            f"{path}: checkpoint format version {version!r} is not supported by this bofrs "
            f"(reads version {MODEL_FORMAT_VERSION}); re-save it with a matching bofrs"
        )
    for key, kind in (("layers", dict), ("shards", dict), ("aliases", dict)):
        if not isinstance(index.get(key), kind):
            raise FormatError(f"{path}: invalid {key!r}")
    for name, spec in index["layers"].items():
        if not isinstance(spec, dict) or not all(
            isinstance(spec.get(k), int) and spec[k] >= 0 for k in ("in_features", "out_features")
        ):
            raise FormatError(f"{path}: invalid layer {name!r}")
    for file, names in index["shards"].items():
        if not isinstance(file, str) or os.path.basename(file) != file or not isinstance(names, list):
            raise FormatError(f"{path}: invalid shard entry {file!r}")
    return index


def _skeleton(index: Mapping[str, Any]) -> nn.Module:
    hf_config = index.get("hf_config")
    if not isinstance(hf_config, dict):
        raise ValueError(
            "model: this checkpoint records no transformers config; pass a skeleton model "
            "(the architecture, any weights) as model="
        )
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(**hf_config)
    dtype = getattr(config, "dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        dtype = None
    try:  # parameters on the meta device: no dense copy of the model is ever allocated
        from accelerate import init_empty_weights
    except ImportError:  # pragma: no cover - accelerate comes with the hf extra
        init_empty_weights = None
    if init_empty_weights is None:
        built: nn.Module = AutoModelForCausalLM.from_config(config, dtype=dtype)  # type: ignore[no-untyped-call]
        return built
    with init_empty_weights(include_buffers=False):
        model: nn.Module = AutoModelForCausalLM.from_config(config, dtype=dtype)  # type: ignore[no-untyped-call]
    return model


def _placeholder(
    name: str, spec: Mapping[str, Any], packed: QuantizedTensor
) -> QuantModule:
    """A QuantLinear around the loaded packed weight (bias filled later from the state dict)."""
    bias = None
    if spec.get("bias") is not None:
        bias = torch.zeros(spec["out_features"], dtype=dtype_from_name(spec["bias"]))
    if tuple(packed.shape) != (spec["out_features"], spec["in_features"]):
        raise FormatError(f"{name}: packed shape {tuple(packed.shape)} does not match the index")
    fused = int(spec.get("fused_max_tokens", FUSED_MAX_TOKENS))
    return LINEAR_MODULES[packed.kind](packed, bias, fused_max_tokens=fused)


def load_quantized(
    directory: PathLike, model: nn.Module | None = None, *, strict: bool = True
) -> nn.Module:
    """Loads a checkpoint written by :func:`save_quantized` into ``model`` (a skeleton with the
    same architecture; its Linear layers named in the checkpoint become QuantLinear) and
    returns it. Without ``model``, the skeleton is built from the recorded transformers config
    (needs ``transformers``). Corrupt, truncated or other-version files raise
    :class:`bofrs.FormatError`; ``strict`` also requires every state-dict entry of the model to
    be in the checkpoint.
    """
    index = read_index(directory)
    if model is None:
        model = _skeleton(index)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    layers: Mapping[str, Mapping[str, Any]] = index["layers"]
    aliases: Mapping[str, str] = index["aliases"]
    by_source: dict[str, list[str]] = {}
    for alias, source in aliases.items():
        by_source.setdefault(source, []).append(alias)
    placed: dict[str, QuantModule] = {}
    loaded: set[str] = set()
    for file, names in index["shards"].items():
        tensors = load_file(os.path.join(os.fspath(directory), file))
        if set(tensors) != set(names):
            raise FormatError(f"{file}: holds {sorted(tensors)}, the index says {sorted(names)}")
        plain: dict[str, torch.Tensor] = {}
        for key, value in tensors.items():
            targets = [key, *by_source.get(key, [])]
            if not isinstance(value, QuantizedTensor):
                plain.update({target: value for target in targets})
                continue
            quant: QuantModule | None = None
            for target in targets:
                layer_name = target.removesuffix("weight").removesuffix(".")
                if layer_name not in layers:
                    raise FormatError(f"{file}: packed entry {target!r} is not a listed layer")
                if quant is None:  # one module for the entry, shared by its aliases
                    quant = _placeholder(target, layers[layer_name], value)
                _set_module(model, layer_name, quant)
                placed[layer_name] = quant
                loaded.update(_keys(layer_name, quant))
        _load_plain(model, plain, placed, loaded)
        del tensors, plain
    missing = sorted(set(layers) - set(placed))
    if missing:
        raise FormatError(f"checkpoint lists layers without stored weights: {missing[:5]}")
    if strict:
        absent = sorted(set(model.state_dict()) - loaded)
        if absent:
            raise ValueError(f"model has entries the checkpoint lacks: {absent[:5]}")
    empty = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if empty:
        raise FormatError(f"checkpoint leaves model entries without values: {empty[:5]}")
    return model


def _keys(layer_name: str, layer: QuantModule) -> set[str]:
    prefix = f"{layer_name}." if layer_name else ""
    return {prefix + b for b in layer.packed_buffer_names()}


def _load_plain(
    model: nn.Module,
    plain: Mapping[str, torch.Tensor],
    placed: Mapping[str, QuantModule],
    loaded: set[str],
) -> None:
    """Copies plain tensors into the model's parameters and buffers (bias of new layers too)."""
    targets: dict[str, torch.Tensor] = dict(model.named_parameters(remove_duplicate=False))
    targets.update(dict(model.named_buffers(remove_duplicate=False)))
    made: dict[int, torch.Tensor] = {}
    for key, value in plain.items():
        target = targets.get(key)
        if target is None:
            # The bias of a layer placed by an earlier shard: look it up again.
            targets.update(dict(model.named_parameters(remove_duplicate=False)))
            target = targets.get(key)
        if target is None:
            raise FormatError(f"checkpoint entry {key!r} has no counterpart in the model")
        if target.shape != value.shape:
            raise FormatError(f"{key}: stored shape {tuple(value.shape)}, model has {tuple(target.shape)}")
        if target.device.type == "meta":
            # A skeleton without storage: the loaded tensor becomes the parameter or buffer
            # (one object per stored tensor, so tied weights stay tied).
            materialized = _materialize(model, key, target, value, made)
            targets[key] = materialized
        else:
            with torch.no_grad():
                target.copy_(value)
        loaded.add(key)


def _materialize(
    model: nn.Module, key: str, target: torch.Tensor, value: torch.Tensor,
    made: dict[int, torch.Tensor],
) -> torch.Tensor:
    """Puts ``value`` (converted to ``target``'s dtype) in place of the meta tensor at ``key``."""
    owner_name, _, attr = key.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    if id(value) in made:
        tensor = made[id(value)]
    else:
        data = value.to(target.dtype).contiguous()
        if isinstance(target, nn.Parameter):
            tensor = nn.Parameter(data, requires_grad=target.requires_grad)
        else:
            tensor = data
        made[id(value)] = tensor
    if isinstance(tensor, nn.Parameter):
        owner.register_parameter(attr, tensor)
    else:
        owner.register_buffer(attr, tensor)
    return tensor


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if not hasattr(parent, attr):
        raise FormatError(f"layer {name!r} does not exist in the model")
    setattr(parent, attr, module)


__all__ = ["load_quantized", "read_index", "save_quantized"]
