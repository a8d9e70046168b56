"""QuantConfig and quantize_model: replacing a model's Linear layers by QuantLinear, in place."""

from __future__ import annotations

import fnmatch
import numbers
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from bofrs.formats.blockwise.codebooks import Codebook, resolve
from bofrs.formats.hadamard import check_group_size
from bofrs.formats.higgs.tensor import higgs_grid
from bofrs.formats.blockwise.packed import SCALE_DTYPES, SCALE_FORMATS
from bofrs._validate import check_block_size, check_choice
from bofrs.nn.higgs_linear import HiggsLinear
from bofrs.nn.linear import FUSED_MAX_TOKENS, QuantLinear

#: Options a per-layer override may set.
OVERRIDE_KEYS = (
    "codebook", "block_size", "scale_dtype", "opq", "rotation", "bits", "p", "group_size", "skip",
)  # fmt: skip


@dataclass(frozen=True)
class LayerSpec:
    """How one layer is quantized (resolved from a :class:`QuantConfig` and the layer's name)."""

    codebook: str | Codebook
    block_size: int
    scale_dtype: str
    opq: float | None = None
    rotation: str | int | None = None
    bits: int = 4
    p: int = 2
    group_size: int = 1024


@dataclass
class QuantConfig:
    """What :func:`quantize_model` does.

    - ``codebook``, ``block_size``, ``scale_dtype``, ``opq``, ``rotation``: the defaults for
      every Linear layer (as in :func:`bofrs.pack`); ``codebook="higgs"`` makes
      :class:`bofrs.nn.HiggsLinear` layers with ``bits``, ``p`` and ``group_size`` (as in
      :func:`bofrs.pack_higgs`);
    - ``skip``: module-name patterns left in full precision (default ``("lm_head",)``);
    - ``overrides``: ``{pattern: {option: value}}`` per-layer options (``codebook``,
      ``block_size``, ``scale_dtype``, ``opq``, ``rotation``, or ``skip: True``); later patterns
      win over earlier ones (a per-layer allocation, e.g. from :func:`bofrs.allocate`, is a set
      of overrides);
    - ``fused_max_tokens``: passed to every :class:`bofrs.nn.QuantLinear`.

    A pattern matches a module name with :func:`fnmatch.fnmatchcase`, either the whole name
    (``"model.layers.0.mlp.*"``) or its trailing dotted part (``"lm_head"`` matches
    ``"model.lm_head"``, ``"mlp.down_proj"`` matches every layer's ``down_proj``).
    """

    codebook: str | Codebook = "nf4"
    block_size: int = 64
    scale_dtype: str = "bfloat16"
    opq: float | None = None
    rotation: str | int | None = None
    bits: int = 4
    p: int = 2
    group_size: int = 1024
    skip: tuple[str, ...] = ("lm_head",)
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    fused_max_tokens: int = FUSED_MAX_TOKENS

    def __post_init__(self) -> None:
        if isinstance(self.skip, str):
            raise TypeError("skip must be a sequence of module-name patterns, not a str")
        self.skip = tuple(self.skip)
        if not all(isinstance(p, str) for p in self.skip):
            raise TypeError("skip must hold str patterns")
        if not isinstance(self.overrides, Mapping):
            raise TypeError(f"overrides must be a dict, got {type(self.overrides).__name__}")
        self.overrides = {k: dict(v) for k, v in self.overrides.items()}
        _check_spec(self._default(), "")
        for pattern, options in self.overrides.items():
            if not isinstance(pattern, str) or not isinstance(options, dict):
                raise TypeError("overrides must map str patterns to dicts of options")
            unknown = set(options) - set(OVERRIDE_KEYS)
            if unknown:
                raise ValueError(
                    f"overrides[{pattern!r}] has unknown options {sorted(unknown)}; "
                    f"allowed: {', '.join(OVERRIDE_KEYS)}"
                )
            spec = self._merge(self._default(), options)
            _check_spec(spec, f"overrides[{pattern!r}].")
        if isinstance(self.fused_max_tokens, bool) or not isinstance(self.fused_max_tokens, int):
            raise TypeError("fused_max_tokens must be an int")

    def _default(self) -> LayerSpec:
        return LayerSpec(
            self.codebook, self.block_size, self.scale_dtype, self.opq, self.rotation,
            self.bits, self.p, self.group_size,
        )  # fmt: skip

    @staticmethod
    def _merge(spec: LayerSpec, options: Mapping[str, Any]) -> LayerSpec:
        return LayerSpec(
            options.get("codebook", spec.codebook),
            options.get("block_size", spec.block_size),
            options.get("scale_dtype", spec.scale_dtype),
            options.get("opq", spec.opq),
            options.get("rotation", spec.rotation),
            options.get("bits", spec.bits),
            options.get("p", spec.p),
            options.get("group_size", spec.group_size),
        )

    def spec_for(self, name: str) -> LayerSpec | None:
        """The options for module ``name``, or ``None`` if it stays in full precision."""
        skipped = any(matches(name, p) for p in self.skip)
        spec = self._default()
        for pattern, options in self.overrides.items():
            if matches(name, pattern):
                spec = self._merge(spec, options)
                if "skip" in options:
                    skipped = bool(options["skip"])
        return None if skipped else spec

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able description (custom codebooks as their dict)."""

        def book(value: str | Codebook) -> Any:
            return value.to_dict() if isinstance(value, Codebook) else value

        return {
            "codebook": book(self.codebook),
            "block_size": self.block_size,
            "scale_dtype": self.scale_dtype,
            "opq": self.opq,
            "rotation": self.rotation,
            "bits": self.bits,
            "p": self.p,
            "group_size": self.group_size,
            "skip": list(self.skip),
            "overrides": {
                p: {k: book(v) if k == "codebook" else v for k, v in o.items()}
                for p, o in self.overrides.items()
            },
            "fused_max_tokens": self.fused_max_tokens,
        }

    @classmethod
    def from_allocation(
        cls, choice: Mapping[str, str], in_features: Mapping[str, int], **defaults: Any
    ) -> QuantConfig:
        """A config giving each layer of ``choice`` (``{module name: format spec}``, as from
        :func:`bofrs.allocate_model`) its format, as exact-name overrides on top of the
        ``defaults`` (other :class:`QuantConfig` fields); ``in_features`` gives each layer's row
        length (HIGGS group size and rotation depend on it). ``"bf16"`` keeps a layer as is."""
        from bofrs._linearity import spec_options

        missing = [n for n in choice if n not in in_features]
        if missing:
            raise ValueError(f"in_features: no row length for layer {missing[0]!r}")
        overrides = dict(defaults.pop("overrides", {}))
        for name, spec in choice.items():
            overrides[name] = spec_options(spec, int(in_features[name]))
        return cls(overrides=overrides, **defaults)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> QuantConfig:
        """Inverse of :meth:`to_dict`."""

        def book(value: Any) -> str | Codebook:
            return Codebook.from_dict(value) if isinstance(value, dict) else value

        overrides = {
            p: {k: book(v) if k == "codebook" else v for k, v in o.items()}
            for p, o in dict(data.get("overrides", {})).items()
        }
        return cls(
            codebook=book(data.get("codebook", "nf4")),
            block_size=data.get("block_size", 64),
            scale_dtype=data.get("scale_dtype", "bfloat16"),
            opq=data.get("opq"),
            rotation=data.get("rotation"),
            bits=data.get("bits", 4),
            p=data.get("p", 2),
            group_size=data.get("group_size", 1024),
            skip=tuple(data.get("skip", ("lm_head",))),
            overrides=overrides,
            fused_max_tokens=data.get("fused_max_tokens", FUSED_MAX_TOKENS),
        )


def _check_spec(spec: LayerSpec, where: str) -> None:
    codebook, block_size, scale_dtype = spec.codebook, spec.block_size, spec.scale_dtype
    opq, rotation = spec.opq, spec.rotation
    if codebook == "higgs":
        check_choice(scale_dtype, tuple(SCALE_DTYPES), f"{where}scale_dtype")
        higgs_grid(spec.bits, spec.p)
        check_group_size(spec.group_size)
        if opq is not None or rotation is not None:
            raise ValueError(f"{where}opq and rotation do not apply to codebook='higgs'")
        return
    if not isinstance(block_size, numbers.Integral) or isinstance(block_size, bool):
        raise TypeError(f"{where}block_size must be an int, got {type(block_size).__name__}")
    check_block_size(block_size, f"{where}block_size")
    check_choice(scale_dtype, SCALE_FORMATS, f"{where}scale_dtype")
    if opq is not None:
        if isinstance(opq, bool) or not isinstance(opq, numbers.Real) or not 0 < float(opq) < 1:
            raise ValueError(f"{where}opq must be a quantile in (0, 1) or None, got {opq!r}")
    if rotation is not None and rotation != "hadamard":
        if isinstance(rotation, bool) or not isinstance(rotation, int):
            raise ValueError(f"{where}rotation must be 'hadamard', a group size or None, got {rotation!r}")
        check_group_size(rotation)
    if not isinstance(codebook, (str, Codebook)):
        raise TypeError(f"{where}codebook must be a name or a bofrs.Codebook")
    resolve(codebook, int(block_size))


def matches(name: str, pattern: str) -> bool:
    """Whether module ``name`` matches ``pattern`` (whole name or trailing dotted part)."""
    return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name, "*." + pattern)


def linear_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module, str, nn.Linear]]:
    """``(name, parent, attribute, layer)`` for every ``nn.Linear`` under ``model``."""
    for parent_name, parent in list(model.named_modules()):
        for attr, child in list(parent._modules.items()):  # shared children under every name
            if isinstance(child, nn.Linear):
                yield (f"{parent_name}.{attr}" if parent_name else attr), parent, attr, child


def _progress(items: list[Any], enabled: bool) -> Iterable[Any]:
    if not enabled:
        return items
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is optional
        return items
    return tqdm(items, desc="bofrs: quantizing", unit="layer")  # type: ignore[no-any-return]


def quantize_model(
    model: nn.Module, config: QuantConfig | None = None, *, progress: bool = True
) -> nn.Module:
    """Replaces every ``nn.Linear`` of ``model`` (except skipped ones) by a
    :class:`bofrs.nn.QuantLinear`, in place, and returns the model.

    Weights are packed on their device; a shared (tied) Linear is quantized once and shared.
    ``progress`` shows a tqdm bar when tqdm is installed.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    config = QuantConfig() if config is None else config
    if not isinstance(config, QuantConfig):
        raise TypeError(f"config must be a bofrs.QuantConfig, got {type(config).__name__}")
    todo = [item for item in linear_layers(model) if config.spec_for(item[0]) is not None]
    done: dict[int, QuantLinear | HiggsLinear] = {}
    for name, parent, attr, layer in _progress(todo, progress):
        if id(layer) not in done:
            if layer.weight.device.type == "meta":
                raise ValueError(f"layer {name!r} has no weights (meta device); load them first")
            spec = config.spec_for(name)
            assert spec is not None
            with torch.no_grad():
                done[id(layer)] = _quantized_layer(layer, spec, config.fused_max_tokens)
        setattr(parent, attr, done[id(layer)])
    return model


def _quantized_layer(
    layer: nn.Linear, spec: LayerSpec, fused_max_tokens: int
) -> QuantLinear | HiggsLinear:
    if spec.codebook == "higgs":
        return HiggsLinear.from_linear(
            layer, spec.bits, spec.p, spec.group_size, scale_dtype=spec.scale_dtype,
            fused_max_tokens=fused_max_tokens,
        )  # fmt: skip
    return QuantLinear.from_linear(
        layer,
        spec.codebook,
        spec.block_size,
        scale_dtype=spec.scale_dtype,
        opq=spec.opq,
        rotation=spec.rotation,
        fused_max_tokens=fused_max_tokens,
    )
