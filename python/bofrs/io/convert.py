"""Quantizing a whole safetensors checkpoint, tensor by tensor, into a bofrs checkpoint.

The input is a transformers-style directory (``config.json`` and ``model.safetensors`` or
``model.safetensors.index.json`` with its shards), a single ``.safetensors`` file, or a GGUF
file (loaded whole through transformers, which dequantizes it, then quantized layer by layer). Each input
shard is memory-mapped and read one tensor at a time; the output gets one bofrs shard per input
shard, so memory holds at most one shard's output. Linear weights (2-D ``*.weight`` tensors that
are not embeddings, norms or skipped by the :class:`QuantConfig`) are packed; everything else is
copied. The result is what :func:`bofrs.save_quantized` writes: :func:`bofrs.load_quantized`
and the transformers plug-in read it.

The output is written to a temporary directory beside the target and renamed at the very end:
an interrupted run leaves no partial output under the target name.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from bofrs.eval.knapsack import Allocation, allocate
from bofrs._dtypes import dtype_name
from bofrs.eval.linearity import _format_error, build_menu
from bofrs.formats.tensor import QuantizedTensor
from bofrs.io.checkpoint import INDEX, MODEL_FORMAT, MODEL_FORMAT_VERSION
from bofrs.io.files import save_file
from bofrs.nn.quantize import QuantConfig

#: Name fragments of 2-D weights that are not Linear layers.
NOT_LINEAR = ("embed", "wte", "wpe", "norm", "ln_")


def _input_shards(src: Path) -> tuple[list[Path], dict[str, Any] | None]:
    """The safetensors files of a checkpoint and its transformers config (if any)."""
    if src.is_file():
        if src.suffix != ".safetensors":
            raise ValueError(f"src: expected a .safetensors file or a checkpoint directory, got {src}")
        return [src], None
    if not src.is_dir():
        raise FileNotFoundError(f"src: {src} does not exist")
    config = None
    if (src / "config.json").is_file():
        config = json.loads((src / "config.json").read_text())
    index = src / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        files = sorted({src / f for f in weight_map.values()})
    else:
        files = sorted(src.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"src: no .safetensors file in {src}")
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"src: shard {missing[0].name} is missing")
    return files, config


def is_linear_weight(name: str, tensor_shape: torch.Size) -> bool:
    """Whether a checkpoint entry looks like the weight of a Linear layer."""
    lowered = name.lower()
    return (
        name.endswith(".weight")
        and len(tensor_shape) == 2
        and not any(fragment in lowered for fragment in NOT_LINEAR)
    )


def _bar(total: int, enabled: bool) -> Any:
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is optional
        return None
    return tqdm(total=total, unit="B", unit_scale=True, desc="bofrs: quantizing")


def _tensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    with safe_open(str(path), framework="pt") as handle:
        for key in handle.keys():
            yield key, handle.get_tensor(key)


def quantize_checkpoint(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    config: QuantConfig | None = None,
    *,
    progress: bool = True,
) -> dict[str, float]:
    """Quantizes the checkpoint at ``src`` into a bofrs checkpoint directory ``dst``.

    ``dst`` must not exist (an existing one is refused: delete it or pick another name).
    Returns figures of the run: tensors, quantized layers, input and output bytes, seconds.
    """
    config = QuantConfig() if config is None else config
    if not isinstance(config, QuantConfig):
        raise TypeError(f"config must be a bofrs.QuantConfig, got {type(config).__name__}")
    source, target = Path(src), Path(dst)
    if target.exists():
        raise FileExistsError(f"dst: {target} already exists; remove it or choose another path")
    if source.suffix == ".gguf":
        return _quantize_gguf(source, target, config, progress)
    files, hf_config = _input_shards(source)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    start = time.perf_counter()
    stats = {"tensors": 0.0, "quantized": 0.0, "bytes_in": 0.0, "bytes_out": 0.0}
    bar = _bar(sum(f.stat().st_size for f in files), progress)
    try:
        layers: dict[str, dict[str, Any]] = {}
        shards: dict[str, list[str]] = {}
        all_keys: dict[str, torch.dtype] = {}
        for number, path in enumerate(files, start=1):
            entries: dict[str, QuantizedTensor | torch.Tensor] = {}
            for key, tensor in _tensors(path):
                size = tensor.numel() * tensor.element_size()
                all_keys[key] = tensor.dtype
                module = key.removesuffix(".weight")
                spec = config.spec_for(module) if is_linear_weight(key, tensor.shape) else None
                if spec is not None and tensor.dtype.is_floating_point:
                    packed = spec.pack(tensor)
                    entries[key] = packed
                    layers[module] = {
                        "in_features": int(tensor.shape[1]),
                        "out_features": int(tensor.shape[0]),
                        "bias": None,
                        "fused_max_tokens": config.fused_max_tokens,
                    }
                    stats["quantized"] += 1
                    stats["bytes_out"] += packed.nbytes
                else:
                    entries[key] = tensor
                    stats["bytes_out"] += size
                stats["tensors"] += 1
                stats["bytes_in"] += size
                if bar is not None:
                    bar.update(size)
                    elapsed = time.perf_counter() - start
                    bar.set_postfix(tensors_per_s=f"{stats['tensors'] / max(elapsed, 1e-9):.1f}")
            name = f"model-{number:05d}-of-{len(files):05d}.safetensors"
            save_file(entries, staging / name)
            shards[name] = list(entries)
            del entries
        for module, entry in layers.items():
            bias = all_keys.get(module + ".bias")
            entry["bias"] = None if bias is None else dtype_name(bias)
        aliases = {}
        if hf_config and hf_config.get("tie_word_embeddings") and "lm_head.weight" not in all_keys:
            embed = next((k for k in all_keys if k.endswith("embed_tokens.weight")), None)
            if embed is not None:
                aliases["lm_head.weight"] = embed
        index = {
            "format": MODEL_FORMAT,
            "format_version": MODEL_FORMAT_VERSION,
            "quant_config": config.to_dict(),
            "layers": layers,
            "shards": shards,
            "aliases": aliases,
            "hf_config": hf_config,
        }
        (staging / INDEX).write_text(json.dumps(index, indent=1, default=str))
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        if bar is not None:
            bar.close()
    stats["seconds"] = time.perf_counter() - start
    return stats



#: Formats ``bofrs quantize --budget`` chooses from unless told otherwise.
DEFAULT_MENU = ("higgs2p2", "higgs3p2", "higgs4p2", "af4", "bof4s", "bof4s@32", "higgs8p1", "bf16")


def allocation_config(
    src: str | os.PathLike[str],
    alphas: Mapping[str, float],
    budget_bits: float,
    menu: Sequence[str] = DEFAULT_MENU,
    config: QuantConfig | None = None,
    *,
    progress: bool = True,
) -> tuple[QuantConfig, Allocation]:
    """A :class:`QuantConfig` for the checkpoint at ``src`` giving each Linear weight the
    ``menu`` format the linearity theorem picks within ``budget_bits`` average bits: every
    weight is read once (one tensor at a time) and its relative error measured in each format,
    then :func:`bofrs.allocate` solves the knapsack with the layers' ``alphas`` (from
    :func:`bofrs.estimate_sensitivity`, keyed by module name). ``"bf16"`` / ``"fp16"`` in the
    menu mean "keep the layer as stored" and cost its stored bits. ``config`` gives the
    defaults and the skip list (skipped layers stay out of the allocation and the budget)."""
    base = QuantConfig() if config is None else config
    source = Path(src)
    if source.suffix == ".gguf":
        from bofrs.eval.data import load_gguf

        model, _ = load_gguf(source)
        assert isinstance(model, torch.nn.Module)
        weights: Iterator[tuple[str, torch.Tensor]] = (
            (n + ".weight", m.weight.detach()) for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear)
        )  # fmt: skip
    else:
        files, _ = _input_shards(source)
        weights = (item for path in files for item in _tensors(path))
    errors: dict[str, dict[str, tuple[float, float]]] = {}
    sizes: dict[str, int] = {}
    in_features: dict[str, int] = {}
    bar = _bar(0, progress)
    for key, tensor in weights:
        module = key.removesuffix(".weight")
        if not (is_linear_weight(key, tensor.shape) and tensor.dtype.is_floating_point):
            continue
        if base.spec_for(module) is None:
            continue
        if module not in alphas:
            raise ValueError(f"alphas: no value for layer {module!r}")
        kept = (8.0 * tensor.element_size(), 0.0)  # "bf16" / "fp16": the layer stays as stored
        errors[module] = {
            spec: kept if spec in ("bf16", "fp16") else _format_error(tensor, spec) for spec in menu
        }
        sizes[module], in_features[module] = tensor.numel(), int(tensor.shape[1])
        if bar is not None:
            bar.update(tensor.numel() * tensor.element_size())
    if bar is not None:
        bar.close()
    if not errors:
        raise ValueError(f"src: no Linear weight to allocate in {source}")
    names, table = build_menu(errors)
    plan = allocate([max(0.0, float(alphas[n])) for n in names], [sizes[n] for n in names],
                    table, budget_bits, resolution=1e-4)  # fmt: skip
    defaults = {k: v for k, v in base.to_dict().items() if k not in ("overrides", "codebook")}
    defaults["skip"] = tuple(defaults["skip"])
    chosen = QuantConfig.from_allocation(
        dict(zip(names, plan.choices)), in_features, codebook=base.codebook,
        overrides=base.overrides, **defaults,
    )  # fmt: skip
    return chosen, plan


def _quantize_gguf(source: Path, target: Path, config: QuantConfig, progress: bool) -> dict[str, float]:
    """GGUF input: transformers loads and dequantizes the whole model; then quantize_model and
    save_quantized, staged like the safetensors path."""
    from bofrs.eval.data import load_gguf
    from bofrs.io.checkpoint import save_quantized
    from bofrs.nn.quantize import quantize_model

    if not source.is_file():
        raise FileNotFoundError(f"src: {source} does not exist")
    start = time.perf_counter()
    model, _ = load_gguf(source)
    assert isinstance(model, torch.nn.Module)
    bytes_in = float(source.stat().st_size)
    tensors = float(len(model.state_dict()))
    quantize_model(model, config, progress=progress)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        save_quantized(model, staging, config=config)
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    bytes_out = float(sum(f.stat().st_size for f in target.iterdir()))
    quantized = float(sum(1 for m in model.modules() if hasattr(m, "packed_buffer_names")))
    return {
        "tensors": tensors, "quantized": quantized, "bytes_in": bytes_in,
        "bytes_out": bytes_out, "seconds": time.perf_counter() - start,
    }  # fmt: skip
