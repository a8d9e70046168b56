"""QuantConfig and quantize_model: replacing a model's Linear layers by QuantLinear, in place."""

from __future__ import annotations

import fnmatch
import numbers
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from bofrs.formats.blockwise.codebooks import Codebook
from bofrs.formats.format import Format, HiggsFormat, KeepFormat
from bofrs.formats.tensor import QuantizedTensor
from bofrs.nn.base import PackedLinear
from bofrs.nn.higgs_linear import HiggsLinear
from bofrs.nn.linear import FUSED_MAX_TOKENS, QuantLinear

#: Options a per-layer override may set (as a dict; an override may also be a whole format:
#: a :class:`bofrs.Format` or its spec string).
OVERRIDE_KEYS = (
    "codebook", "block_size", "scale_dtype", "opq", "outlier_dtype", "rotation", "bits", "p",
    "group_size", "skip",
)  # fmt: skip
#: The module that holds each kind of packed weight.
LINEAR_MODULES: dict[str, type[PackedLinear]] = {"packed": QuantLinear, "higgs": HiggsLinear}


@dataclass
class QuantConfig:
    """What :func:`quantize_model` does.

    - ``codebook``, ``block_size``, ``scale_dtype``, ``opq``, ``rotation``: the defaults for
      every Linear layer (as in :func:`bofrs.pack`); ``codebook="higgs"`` makes
      :class:`bofrs.nn.HiggsLinear` layers with ``bits``, ``p`` and ``group_size`` (as in
      :func:`bofrs.pack_higgs`);
    - ``skip``: module-name patterns left in full precision (default ``("lm_head",)``);
    - ``overrides``: ``{pattern: {option: value}}`` per-layer options (``codebook``,
      ``block_size``, ``scale_dtype``, ``opq``, ``rotation``, ..., or ``skip: True``), or
      ``{pattern: format}`` with a :class:`bofrs.Format` or spec string (``"higgs4p2"``,
      ``"bf16"`` = skip); later patterns win over earlier ones (a per-layer allocation, e.g.
      from :func:`bofrs.allocate`, is a set of overrides);
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
    outlier_dtype: str = "bfloat16"

    def __post_init__(self) -> None:
        if isinstance(self.skip, str):
            raise TypeError("skip must be a sequence of module-name patterns, not a str")
        self.skip = tuple(self.skip)
        if not all(isinstance(p, str) for p in self.skip):
            raise TypeError("skip must hold str patterns")
        if not isinstance(self.overrides, Mapping):
            raise TypeError(f"overrides must be a dict, got {type(self.overrides).__name__}")
        overrides: dict[str, dict[str, Any]] = {}
        for pattern, options in self.overrides.items():
            if not isinstance(pattern, str):
                raise TypeError("overrides must map str patterns to dicts of options or formats")
            overrides[pattern] = _override_options(pattern, options)
        self.overrides = overrides
        _checked_format(self._default_options(), "")
        for pattern, options in self.overrides.items():
            unknown = set(options) - set(OVERRIDE_KEYS)
            if unknown:
                raise ValueError(
                    f"overrides[{pattern!r}] has unknown options {sorted(unknown)}; "
                    f"allowed: {', '.join(OVERRIDE_KEYS)}"
                )
            _checked_format({**self._default_options(), **options}, f"overrides[{pattern!r}].")
        if isinstance(self.fused_max_tokens, bool) or not isinstance(self.fused_max_tokens, int):
            raise TypeError("fused_max_tokens must be an int")

    @classmethod
    def from_format(cls, fmt: str | Format, **fields: Any) -> QuantConfig:
        """A config quantizing every Linear layer in ``fmt`` (a :class:`bofrs.Format` or spec
        string, e.g. ``"bof4s+opq"``); ``fields``: the other fields (``skip``, ``overrides``, ...)."""
        options = Format.parse(fmt).options()
        if options.get("skip"):
            raise ValueError(f"fmt: {fmt} keeps layers in 16 bits; QuantConfig needs a quantized format")
        return cls(**{**options, **fields})

    def _default_options(self) -> dict[str, Any]:
        return {
            "codebook": self.codebook, "block_size": self.block_size, "scale_dtype": self.scale_dtype,
            "opq": self.opq, "outlier_dtype": self.outlier_dtype, "rotation": self.rotation,
            "bits": self.bits, "p": self.p, "group_size": self.group_size,
        }  # fmt: skip

    def spec_for(self, name: str) -> Format | None:
        """The format for module ``name``, or ``None`` if it stays in full precision."""
        skipped = any(matches(name, p) for p in self.skip)
        options = self._default_options()
        for pattern, override in self.overrides.items():
            if matches(name, pattern):
                options.update({k: v for k, v in override.items() if k != "skip"})
                if "skip" in override:
                    skipped = bool(override["skip"])
        return None if skipped else _format_of(options)

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
            "outlier_dtype": self.outlier_dtype,
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
        missing = [n for n in choice if n not in in_features]
        if missing:
            raise ValueError(f"in_features: no row length for layer {missing[0]!r}")
        overrides = dict(defaults.pop("overrides", {}))
        for name, spec in choice.items():
            overrides[name] = Format.parse(spec).resolved(int(in_features[name]))
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
            outlier_dtype=data.get("outlier_dtype", "bfloat16"),
        )


def _override_options(pattern: str, override: object) -> dict[str, Any]:
    """An override as a dict of options (a format or spec string becomes its options)."""
    if isinstance(override, (str, Format)):
        fmt = Format.parse(override)
        if isinstance(fmt, KeepFormat):
            return {"skip": True}
        options = fmt.options()
        if isinstance(fmt, HiggsFormat):
            options.update(opq=None, rotation=None)  # a whole format: nothing of the defaults'
        return options
    if not isinstance(override, Mapping):
        raise TypeError(
            f"overrides[{pattern!r}] must be a dict of options, a bofrs.Format or a spec string, "
            f"got {type(override).__name__}"
        )
    return dict(override)


def _format_of(options: Mapping[str, Any]) -> Format:
    """The format of a full set of options (see :meth:`QuantConfig._default_options`)."""
    return Format.from_options(
        options["codebook"], options["block_size"], scale_dtype=options["scale_dtype"],
        opq=options["opq"], outlier_dtype=options["outlier_dtype"], rotation=options["rotation"],
        bits=options["bits"], p=options["p"], group_size=options["group_size"],
    )  # fmt: skip


def _checked_format(options: Mapping[str, Any], where: str) -> Format:
    """:func:`_format_of`, with errors naming the option's place (``overrides[...]``)."""
    block_size = options["block_size"]
    if options["codebook"] != "higgs" and (
        isinstance(block_size, bool) or not isinstance(block_size, numbers.Integral)
    ):
        raise TypeError(f"{where}block_size must be an int, got {type(block_size).__name__}")
    opq = options["opq"]
    if opq is not None and options["codebook"] != "higgs":
        if isinstance(opq, bool) or not isinstance(opq, numbers.Real) or not 0 < float(opq) < 1:
            raise ValueError(f"{where}opq must be a quantile in (0, 1) or None, got {opq!r}")
    rotation = options["rotation"]
    if rotation is not None and rotation != "hadamard" and options["codebook"] != "higgs":
        if isinstance(rotation, bool) or not isinstance(rotation, int):
            raise ValueError(f"{where}rotation must be 'hadamard', a group size or None, got {rotation!r}")
    if not isinstance(options["codebook"], (str, Codebook)):
        raise TypeError(f"{where}codebook must be a name or a bofrs.Codebook")
    try:
        return _format_of(options)
    except (TypeError, ValueError) as err:
        message = str(err)
        if options["codebook"] == "higgs" and "do not apply" in message:
            message = "opq and rotation do not apply to codebook='higgs'"
        raise type(err)(f"{where}{message}") from err


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
    done: dict[int, PackedLinear] = {}
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


def _quantized_layer(layer: nn.Linear, fmt: Format, fused_max_tokens: int) -> PackedLinear:
    """``layer`` as the module that holds its weight packed in ``fmt``."""
    packed: QuantizedTensor = fmt.pack(layer.weight.detach())
    bias = None if layer.bias is None else layer.bias.detach()
    return LINEAR_MODULES[packed.kind](packed, bias, fused_max_tokens=fused_max_tokens)
