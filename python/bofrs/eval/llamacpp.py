"""llama.cpp's 4-bit types as peers on the same harness: the model's GGUF requantized with
``llama-quantize --allow-requantize`` (no importance matrix: data-free, like bofrs's formats),
read back and dequantized with the ``gguf`` package, and only the tensors of the layers bofrs
quantizes taken from it (embeddings, norms and the output head stay the reference's).

:func:`llama_quantize` is a small local runner of the ``llama-quantize`` binary; the shared
llama.cpp helper of the benches (``benches/llamacpp.py``: ``find_or_build``, ``requantize``)
can replace it where it is available.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
import torch
from torch import nn

from bofrs.eval.fake import DecodedFormat

#: llama.cpp's data-free 4-bit types compared by default.
LLAMACPP_TYPES = ("Q4_0", "IQ4_NL", "IQ4_XS", "Q4_K")


def find_llama_quantize(explicit: str | os.PathLike[str] | None = None) -> Path:
    """The ``llama-quantize`` binary: ``explicit`` (the file or its folder), else
    ``$LLAMA_QUANTIZE``, else the one on ``PATH``. FileNotFoundError if none."""
    for candidate in (explicit, os.environ.get("LLAMA_QUANTIZE")):
        if candidate:
            path = Path(candidate)
            path = path / "llama-quantize" if path.is_dir() else path
            if path.is_file() and os.access(path, os.X_OK):
                return path
            raise FileNotFoundError(f"llama-quantize: {path} is not an executable file")
    found = shutil.which("llama-quantize")
    if found is None:
        raise FileNotFoundError("llama-quantize: not on PATH; pass its path (or set LLAMA_QUANTIZE)")
    return Path(found)


def llama_quantize(
    binary: str | os.PathLike[str],
    source: str | os.PathLike[str],
    target: str | os.PathLike[str],
    type_name: str,
    *,
    pure: bool = True,
    threads: int | None = None,
) -> Path:
    """Runs ``llama-quantize --allow-requantize [--pure] source target type_name threads``
    (``pure``: every tensor in ``type_name``, no k-quant mixture; llama.cpp still falls back to
    another type where a row length is not a multiple of the type's block, e.g. Q4_K ->
    Q5_0 on 640-value rows). Reuses ``target`` when it exists. ChildProcessError (an OSError) with the tail of
    the tool's output when it fails."""
    out = Path(target)
    if out.is_file():
        return out
    if not type_name.replace("_", "").isalnum():
        raise ValueError(f"type_name must be a llama-quantize type such as 'Q4_0', got {type_name!r}")
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + f".{os.getpid()}.partial")
    command = [str(binary), "--allow-requantize", *(["--pure"] if pure else []), str(source),
               str(partial), type_name, str(threads or os.cpu_count() or 1)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        partial.unlink(missing_ok=True)
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
        raise ChildProcessError(f"llama-quantize failed (rc {done.returncode}): {' '.join(command)}\n{tail}")
    os.replace(partial, out)
    return out


def gguf_linear_weights(
    path: str | os.PathLike[str], model: nn.Module, layers: Sequence[str]
) -> tuple[dict[str, torch.Tensor], dict[str, float], dict[str, str]]:
    """The weights of the Linear ``layers`` (module names of ``model``) stored in the GGUF file
    ``path``, dequantized to float32 by transformers' GGUF reader (the ``gguf`` package's
    dequantizers, and the same name map and layout fixes as ``from_pretrained(gguf_file=)``,
    e.g. llama's permuted q/k rows permuted back), with each one's stored bits per weight
    (exact: the ggml type's block bytes over its values) and ggml type name. ValueError when a
    layer is missing or its shape differs from the model's."""
    from gguf import GGML_QUANT_SIZES, GGUFReader
    from transformers.modeling_gguf_pytorch_utils import (
        TensorProcessor, get_gguf_hf_weights_map, load_gguf_checkpoint,
    )  # fmt: skip

    file = Path(path)
    tensors = load_gguf_checkpoint(str(file), return_tensors=True, model_to_load=model)["tensors"]  # type: ignore[no-untyped-call]
    names = get_gguf_hf_weights_map(model, TensorProcessor())  # type: ignore[no-untyped-call]
    stored = {names.get(t.name): t.tensor_type for t in GGUFReader(str(file)).tensors}
    modules = dict(model.named_modules())
    weights: dict[str, torch.Tensor] = {}
    bits: dict[str, float] = {}
    types: dict[str, str] = {}
    for layer in layers:
        key = f"{layer}.weight"
        if key not in tensors or key not in stored:
            raise ValueError(f"{file.name}: no tensor for layer {layer!r}")
        value = tensors[key].float()
        expected = tuple(modules[layer].weight.shape)
        if tuple(value.shape) != expected:
            raise ValueError(f"{file.name}: {layer} has shape {tuple(value.shape)}, the model {expected}")
        block, size = GGML_QUANT_SIZES[stored[key]]
        weights[layer], bits[layer] = value, 8.0 * size / block
        types[layer] = stored[key].name
    return weights, bits, types


def llamacpp_format(
    model: nn.Module,
    source: str | os.PathLike[str],
    type_name: str,
    layers: Sequence[str],
    *,
    binary: str | os.PathLike[str] | None = None,
    workdir: str | os.PathLike[str],
    pure: bool = True,
    threads: int | None = None,
) -> DecodedFormat:
    """llama.cpp's ``type_name`` as a :class:`DecodedFormat` for :func:`bofrs.evaluate_formats`:
    ``source`` (the model's GGUF file) requantized into ``workdir`` (kept: later runs reuse it)
    and the ``layers``' tensors read back. ``info`` records the requantized file and the
    number of layers stored in each ggml type (fallbacks included)."""
    target = Path(workdir) / f"{Path(source).stem}.{type_name}{'.pure' if pure else ''}.gguf"
    llama_quantize(find_llama_quantize(binary), source, target, type_name, pure=pure, threads=threads)
    weights, bits, types = gguf_linear_weights(target, model, layers)
    counts: dict[str, int] = {}
    for t in types.values():
        counts[t] = counts.get(t, 0) + 1
    name = f"llama.cpp {type_name}"
    info: Mapping[str, object] = {"source": "llama.cpp", "gguf": str(target), "pure": pure,
                                  "tensor_types": counts, "per_layer_type": types}  # fmt: skip
    return DecodedFormat(name, weights, bits, info)
