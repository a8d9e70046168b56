"""``Format``: one value naming how a weight is quantized, used by :func:`bofrs.pack`,
:class:`bofrs.QuantConfig`, files, checkpoints and the evaluation.

A format is built from a spec string (:meth:`Format.parse`), from the keyword arguments of
:func:`bofrs.pack` (:meth:`Format.from_options`), from a file's manifest entry
(:meth:`Format.from_manifest`) or from a packed tensor (its ``format`` property), and turns back
into each of them (``str(fmt)``, :meth:`Format.options`, :meth:`Format.manifest`). Spec strings:

- block-wise: ``CODEBOOK[@BLOCK][+opq[=Q]][+rot[=GROUP]][+dq8][+scales=DTYPE][+outliers=DTYPE]``,
  e.g. ``"nf4"`` (block 64, bfloat16 scales), ``"bof4s@128+opq"`` (OPQ at q = 0.95),
  ``"bof4s+rot"`` (Hadamard rotation per the row's natural group), ``"nf4+dq8"`` (double-quantized
  scales), ``"af4@32+scales=float32"``;
- HIGGS: ``higgs{BITS}p{P}[@GROUP][+scales=DTYPE]``, e.g. ``"higgs4p2"`` (group: the largest
  power of two dividing the row, 16..1024) or ``"higgs3p2@1024"``;
- kept in 16 bits: ``"bf16"`` or ``"fp16"``.
"""

from __future__ import annotations

import dataclasses
import numbers
import re
from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from bofrs._validate import check_block_size, check_choice
from bofrs.formats.blockwise.codebooks import Codebook, available_codebooks, resolve
from bofrs.formats.blockwise.outliers import OUTLIER_DTYPES, check_quantile
from bofrs.formats.hadamard import MIN_GROUP, check_group_size

if TYPE_CHECKING:
    from bofrs.formats.tensor import QuantizedTensor

#: Scale storage of block-wise formats (``"dq8"``: double-quantized, 8 bits per scale).
BLOCKWISE_SCALES = ("bfloat16", "float16", "float32", "dq8")
#: Scale storage of HIGGS formats.
HIGGS_SCALES = ("bfloat16", "float16", "float32")
#: The OPQ quantile a bare ``+opq`` means (the paper's).
DEFAULT_OPQ = 0.95
#: Largest natural group of a rotation or HIGGS (larger rows are cut into groups of this).
MAX_NATURAL_GROUP = 1024
#: Spec names of the 16-bit formats and their dtypes.
KEPT = {"bf16": "bfloat16", "fp16": "float16"}


class Format(ABC):
    """How a weight is quantized (see the module doc for the spec strings). Immutable, hashable,
    comparable; ``str(fmt)`` is its canonical spec string."""

    #: The entry ``kind`` of tensors of this format in files (``None``: not stored packed).
    kind: ClassVar[str | None] = None

    @staticmethod
    def parse(spec: str | Format) -> Format:
        """The format a spec string names (a :class:`Format` is returned as is)."""
        if isinstance(spec, Format):
            return spec
        if not isinstance(spec, str):
            raise TypeError(f"format spec must be a str or a bofrs.Format, got {type(spec).__name__}")
        text = spec.strip()
        if text in KEPT:
            return KeepFormat(KEPT[text])
        head, *extras = text.split("+")
        higgs = re.fullmatch(r"higgs(\d)p(\d)(?:@(\d+))?", head)
        if higgs:
            options = _extras(spec, extras, ("scales",))
            group = int(higgs.group(3)) if higgs.group(3) else None
            return HiggsFormat(int(higgs.group(1)), int(higgs.group(2)), group,
                               options.get("scales", "float16"))  # fmt: skip
        blockwise = re.fullmatch(r"([a-z0-9][a-z0-9_-]*?)(?:@(\d+))?", head)
        if not blockwise:
            raise ValueError(f"unknown format spec {spec!r} (see bofrs.Format for the syntax)")
        name = blockwise.group(1)
        if name not in available_codebooks():
            raise ValueError(
                f"format spec {spec!r}: unknown codebook {name!r}; "
                f"known: {', '.join(available_codebooks())}, higgs{{bits}}p{{p}}, bf16, fp16"
            )
        options = _extras(spec, extras, ("opq", "rot", "dq8", "scales", "outliers"))
        if "dq8" in options and "scales" in options:
            raise ValueError(f"format spec {spec!r}: +dq8 and +scales= both set the scale storage")
        scale = "dq8" if "dq8" in options else options.get("scales", "bfloat16")
        opq = options.get("opq")
        rot = options.get("rot")
        return BlockwiseFormat(
            name,
            int(blockwise.group(2) or 64),
            scale,
            None if opq is None else (DEFAULT_OPQ if opq == "" else _number(spec, "opq", opq, float)),
            options.get("outliers", "bfloat16"),
            None if rot is None else ("hadamard" if rot == "" else _number(spec, "rot", rot, int)),
        )

    @staticmethod
    def from_options(
        codebook: str | Codebook = "nf4",
        block_size: int = 64,
        *,
        scale_dtype: str | None = None,
        opq: float | None = None,
        outlier_dtype: str = "bfloat16",
        rotation: str | int | None = None,
        bits: int = 4,
        p: int = 2,
        group_size: int | None = 1024,
    ) -> Format:
        """The format of :func:`bofrs.pack`'s keyword arguments (``codebook="higgs"``: HIGGS with
        ``bits``, ``p``, ``group_size``; ``scale_dtype`` defaults to bfloat16, float16 for HIGGS)."""
        if isinstance(codebook, str) and codebook == "higgs":
            if opq is not None or rotation is not None:
                raise ValueError("opq and rotation do not apply to codebook='higgs' (it rotates itself)")
            return HiggsFormat(bits, p, group_size, "float16" if scale_dtype is None else scale_dtype)
        return BlockwiseFormat(
            codebook, block_size, "bfloat16" if scale_dtype is None else scale_dtype, opq,
            outlier_dtype, rotation,
        )  # fmt: skip

    @staticmethod
    def from_manifest(entry: Mapping[str, Any]) -> Format:
        """The format of a file's manifest entry (``kind`` ``"packed"`` or ``"higgs"``)."""
        kind = entry.get("kind")
        if kind == BlockwiseFormat.kind:
            return BlockwiseFormat.from_manifest(entry)
        if kind == HiggsFormat.kind:
            return HiggsFormat.from_manifest(entry)
        raise ValueError(f"manifest entry of kind {kind!r} has no quantization format")

    @abstractmethod
    def spec(self) -> str:
        """The canonical spec string."""

    @abstractmethod
    def options(self) -> dict[str, Any]:
        """The keyword arguments of :func:`bofrs.pack` (and the fields of :class:`bofrs.QuantConfig`)
        that make this format; ``{"skip": True}`` for a 16-bit format."""

    @abstractmethod
    def resolved(self, in_features: int) -> Format:
        """This format made concrete for rows of ``in_features`` values (a natural rotation or
        HIGGS group picked; a rotation the row length cannot take is dropped)."""

    @abstractmethod
    def manifest(self) -> dict[str, Any]:
        """The format's part of a file's manifest entry (see :mod:`bofrs.io.files`)."""

    @abstractmethod
    def pack(self, tensor: object, *, isa: str | None = None) -> QuantizedTensor:
        """``tensor`` quantized in this format."""

    def fake_quantize(self, weight: torch.Tensor) -> torch.Tensor:
        """``weight`` quantized and decoded again, in its dtype and on its device (for
        evaluations); the last dimension is the row."""
        w = weight.detach().float().cpu()
        back = self.resolved(int(w.shape[-1])).pack(w).dequantize(torch.float32)
        return back.to(dtype=weight.dtype, device=weight.device)

    def __str__(self) -> str:
        return self.spec()


@dataclasses.dataclass(frozen=True)
class BlockwiseFormat(Format):
    """A 4-bit block-wise format: a 16-level codebook, blocks of ``block_size`` consecutive values
    with one scale each (``scale_dtype``), optional OPQ outliers kept in ``outlier_dtype`` and an
    optional Hadamard rotation (``"hadamard"``: the row's natural group, or a group size)."""

    codebook: str | Codebook = "nf4"
    block_size: int = 64
    scale_dtype: str = "bfloat16"
    opq: float | None = None
    outlier_dtype: str = "bfloat16"
    rotation: str | int | None = None
    kind: ClassVar[str | None] = "packed"

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "block_size", check_block_size(self.block_size))
        check_choice(self.scale_dtype, BLOCKWISE_SCALES, "scale_dtype")
        set_(self, "opq", check_quantile(self.opq))
        check_choice(self.outlier_dtype, tuple(OUTLIER_DTYPES), "outlier_dtype")
        rotation = self.rotation
        if rotation is not None and rotation != "hadamard":
            if isinstance(rotation, str):
                raise ValueError(f"rotation must be 'hadamard', a group size or None; got {rotation!r}")
            set_(self, "rotation", check_group_size(rotation))
        if not isinstance(self.codebook, (str, Codebook)):
            raise TypeError(f"codebook must be a name or a bofrs.Codebook, got {type(self.codebook).__name__}")
        book = resolve(self.codebook, self.block_size)
        if isinstance(self.codebook, Codebook) and book.name in available_codebooks():
            if resolve(book.name, self.block_size) == book:
                set_(self, "codebook", book.name)  # a built-in table is named: equal formats compare equal
        if book.bits != 4:
            raise ValueError(f"codebook: block-wise formats store 4-bit codes, {book.name!r} has {book.bits}-bit levels")

    @property
    def codebook_name(self) -> str:
        """The codebook's name."""
        return self.codebook if isinstance(self.codebook, str) else self.codebook.name

    def resolved_codebook(self) -> Codebook:
        """The codebook object for this block size."""
        return resolve(self.codebook, self.block_size)

    def spec(self) -> str:
        out = self.codebook_name + ("" if self.block_size == 64 else f"@{self.block_size}")
        if self.opq is not None:
            out += "+opq" if self.opq == DEFAULT_OPQ else f"+opq={self.opq:g}"
        if self.rotation is not None:
            out += "+rot" if self.rotation == "hadamard" else f"+rot={self.rotation}"
        if self.scale_dtype == "dq8":
            out += "+dq8"
        elif self.scale_dtype != "bfloat16":
            out += f"+scales={self.scale_dtype}"
        if self.opq is not None and self.outlier_dtype != "bfloat16":
            out += f"+outliers={self.outlier_dtype}"
        return out

    def options(self) -> dict[str, Any]:
        return {
            "codebook": self.codebook, "block_size": self.block_size,
            "scale_dtype": self.scale_dtype, "opq": self.opq, "outlier_dtype": self.outlier_dtype,
            "rotation": self.rotation,
        }  # fmt: skip

    def resolved(self, in_features: int) -> BlockwiseFormat:
        if self.rotation == "hadamard" and int(in_features) & -int(in_features) < MIN_GROUP:
            return dataclasses.replace(self, rotation=None)
        return self

    def manifest(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "block_size": self.block_size,
            "scale_dtype": self.scale_dtype,
            "codebook": self.resolved_codebook().to_dict(),
        }
        if self.rotation is not None:
            out["rotation"] = self.rotation
        if self.opq is not None:
            out["outliers"] = {"q": self.opq, "dtype": self.outlier_dtype}
        return out

    @classmethod
    def from_manifest(cls, entry: Mapping[str, Any]) -> BlockwiseFormat:
        """The format of a ``"packed"`` manifest entry (codebook levels as stored)."""
        book = entry.get("codebook")
        if not isinstance(book, dict):
            raise ValueError(f"invalid codebook {book!r}")
        outliers = entry.get("outliers")
        if outliers is not None and not isinstance(outliers, dict):
            raise ValueError(f"invalid outliers entry {outliers!r}")
        return cls(
            Codebook.from_dict(book), entry.get("block_size"),  # type: ignore[arg-type]
            entry.get("scale_dtype"),  # type: ignore[arg-type]
            None if outliers is None else outliers.get("q"),
            "bfloat16" if outliers is None else outliers.get("dtype"),  # type: ignore[arg-type]
            entry.get("rotation"),
        )  # fmt: skip

    def pack(self, tensor: object, *, isa: str | None = None) -> QuantizedTensor:
        from bofrs.formats.blockwise.encode import pack_blockwise

        return pack_blockwise(tensor, self, isa=isa)


@dataclasses.dataclass(frozen=True)
class HiggsFormat(Format):
    """HIGGS: rows rotated per group of ``group_size`` (``None``: the row's natural group, the
    largest power of two dividing it within 16..1024), scaled by their RMS and matched to the
    ``p``-dimensional Gaussian MSE-optimal grid of ``2**(bits * p)`` points."""

    bits: int = 4
    p: int = 2
    group_size: int | None = None
    scale_dtype: str = "float16"
    kind: ClassVar[str | None] = "higgs"

    def __post_init__(self) -> None:
        from bofrs.formats.higgs.tensor import higgs_grid

        for name in ("bits", "p"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        higgs_grid(int(self.bits), int(self.p))
        if self.group_size is not None:
            object.__setattr__(self, "group_size", check_group_size(self.group_size))
        check_choice(self.scale_dtype, HIGGS_SCALES, "scale_dtype")

    def spec(self) -> str:
        out = f"higgs{self.bits}p{self.p}" + ("" if self.group_size is None else f"@{self.group_size}")
        return out + ("" if self.scale_dtype == "float16" else f"+scales={self.scale_dtype}")

    def options(self) -> dict[str, Any]:
        return {
            "codebook": "higgs", "bits": self.bits, "p": self.p,
            "group_size": 1024 if self.group_size is None else self.group_size,
            "scale_dtype": self.scale_dtype,
        }  # fmt: skip

    def resolved(self, in_features: int) -> HiggsFormat:
        if self.group_size is not None:
            return self
        lowest = int(in_features) & -int(in_features)
        return dataclasses.replace(self, group_size=min(MAX_NATURAL_GROUP, max(MIN_GROUP, lowest)))

    def manifest(self) -> dict[str, Any]:
        from bofrs.formats.higgs.tensor import higgs_grid

        grid = higgs_grid(self.bits, self.p)
        return {
            "group_size": 1024 if self.group_size is None else self.group_size,
            "scale_dtype": self.scale_dtype,
            "grid": {"p": grid.p, "n": grid.n, "mse": grid.mse, "points": [float(v) for v in grid.points.ravel()]},
        }

    @classmethod
    def from_manifest(cls, entry: Mapping[str, Any]) -> HiggsFormat:
        """The format of a ``"higgs"`` manifest entry."""
        grid = entry.get("grid")
        if not isinstance(grid, dict) or grid.get("p") not in (1, 2) or not isinstance(grid.get("n"), int):
            raise ValueError(f"invalid grid {grid!r}")
        p, n = int(grid["p"]), int(grid["n"])
        code_bits = n.bit_length() - 1
        if n != 1 << code_bits or code_bits % p:
            raise ValueError(f"invalid grid size n={n} for p={p}")
        return cls(code_bits // p, p, entry.get("group_size"), entry.get("scale_dtype"))  # type: ignore[arg-type]

    def pack(self, tensor: object, *, isa: str | None = None) -> QuantizedTensor:
        from bofrs.formats.higgs.tensor import pack_higgs

        group = self.group_size
        if group is None:
            shape = getattr(tensor, "shape", None)
            group = self.resolved(int(shape[-1]) if shape else 1).group_size
        assert group is not None
        return pack_higgs(tensor, self.bits, self.p, group, scale_dtype=self.scale_dtype)


@dataclasses.dataclass(frozen=True)
class KeepFormat(Format):
    """The weight kept in 16 bits (``"bf16"`` / ``"fp16"``): a layer left as it is."""

    dtype: str = "bfloat16"

    def __post_init__(self) -> None:
        check_choice(self.dtype, tuple(KEPT.values()), "dtype")

    def spec(self) -> str:
        return next(k for k, v in KEPT.items() if v == self.dtype)

    def options(self) -> dict[str, Any]:
        return {"skip": True}

    def resolved(self, in_features: int) -> KeepFormat:
        return self

    def manifest(self) -> dict[str, Any]:
        raise ValueError(f"format {self.spec()!r} keeps plain tensors: it has no packed manifest")

    def pack(self, tensor: object, *, isa: str | None = None) -> QuantizedTensor:
        raise ValueError(f"format {self.spec()!r} keeps the weight in 16 bits: there is nothing to pack")

    def fake_quantize(self, weight: torch.Tensor) -> torch.Tensor:
        kept = getattr(torch, self.dtype)
        return weight.detach().to(kept).to(weight.dtype)


def _extras(spec: str, extras: list[str], allowed: tuple[str, ...]) -> dict[str, str]:
    """``+key`` / ``+key=value`` options of a spec: key -> value ("" for a bare key)."""
    out: dict[str, str] = {}
    for extra in extras:
        key, _, value = extra.partition("=")
        if key not in allowed or (value == "" and "=" in extra):
            raise ValueError(f"format spec {spec!r}: unknown option {'+' + extra!r}; allowed: "
                             + ", ".join(f"+{a}" for a in allowed))  # fmt: skip
        if key in out:
            raise ValueError(f"format spec {spec!r}: +{key} given twice")
        out[key] = value
    return out


def _number(spec: str, key: str, text: str, kind: type) -> Any:
    try:
        return kind(text)
    except ValueError:
        raise ValueError(f"format spec {spec!r}: +{key}= takes a number, got {text!r}") from None

