"""Fake quantization: a model's Linear weights replaced by their decoded quantized values."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from bofrs.eval.linearity import linear_layers
from bofrs.eval.quantized import parse_formats
from bofrs.formats.format import Format


@dataclass(frozen=True)
class DecodedFormat:
    """A format given by decoded weights instead of a spec string, e.g. a peer's (llama.cpp's
    types read back from a GGUF file, :func:`bofrs.eval.llamacpp_format`): ``weights`` and
    ``bits`` (stored bits per weight) for each Linear layer by name; ``info`` is copied into
    the evaluation record."""

    name: str
    weights: Mapping[str, torch.Tensor]
    bits: Mapping[str, float]
    info: Mapping[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if set(self.weights) != set(self.bits):
            raise ValueError(f"{self.name}: weights and bits must name the same layers")


@contextmanager
def fake_quantized(model: nn.Module, choice: str | Format | Mapping[str, str | Format]) -> Iterator[nn.Module]:
    """Within the block, ``model``'s Linear layers hold their weights quantized and decoded
    again (fake quantization): every layer but ``lm_head`` in one format spec (as
    :class:`bofrs.Format` or its spec string), or each named layer of a ``{layer: spec}`` mapping (an
    allocation). The original weights come back exactly on exit, also on error."""
    if isinstance(choice, (str, Format)):
        layers = linear_layers(model)
        plan = dict.fromkeys(layers, Format.parse(choice))
    else:
        layers = linear_layers(model, ())
        unknown = [n for n in choice if n not in layers]
        if unknown:
            raise ValueError(f"choice: no Linear layer named {unknown[0]!r}")
        plan = dict(zip(choice, parse_formats(list(choice.values()), "choice")))
    with torch.no_grad():
        decoded = {name: fmt.fake_quantize(layers[name].weight) for name, fmt in plan.items()}
    with swapped(layers, decoded):
        yield model


@contextmanager
def swapped(layers: Mapping[str, nn.Linear], weights: Mapping[str, torch.Tensor]) -> Iterator[None]:
    """The named layers hold ``weights`` within the block, their own weights again after.
    A weight of another shape raises ValueError (never a silent broadcast)."""
    saved: dict[str, torch.Tensor] = {}
    try:
        with torch.no_grad():
            for name, weight in weights.items():
                target = layers[name].weight
                if tuple(weight.shape) != tuple(target.shape):
                    raise ValueError(
                        f"weights: {name} has shape {tuple(weight.shape)}, the layer {tuple(target.shape)}"
                    )
                saved[name] = target.detach().clone()
                target.copy_(weight)
        yield
    finally:
        with torch.no_grad():
            for name, weight in saved.items():
                layers[name].weight.copy_(weight)
