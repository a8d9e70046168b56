"""One weight in one format: its stored bits per weight, relative squared error and decoding."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from bofrs.formats.format import Format, KeepFormat


def parse_formats(specs: Sequence[str | Format], argument: str = "formats") -> list[Format]:
    """The :class:`bofrs.Format` of each spec, checked before any expensive work; ValueError /
    TypeError naming ``argument`` and the bad spec."""
    out = []
    for spec in specs:
        try:
            out.append(Format.parse(spec))
        except (TypeError, ValueError) as err:
            raise type(err)(f"{argument}: {err}") from None
    return out


def quantized(weight: torch.Tensor, fmt: str | Format) -> tuple[float, float, torch.Tensor]:
    """(bits per weight, relative squared error ``||W^ - W||^2 / ||W||^2``, float32 CPU
    reconstruction ``W^``) of ``weight`` in ``fmt`` (made concrete for its row length, as
    :meth:`bofrs.Format.resolved`; a 16-bit format counts 16 bits)."""
    f = Format.parse(fmt)
    w = weight.detach().float().cpu()
    if isinstance(f, KeepFormat):
        bits, back = 16.0, f.fake_quantize(w).float()
    else:
        packed = f.resolved(int(w.shape[-1])).pack(w)
        bits, back = packed.bits_per_weight, packed.dequantize(torch.float32)
    norm2 = float((w.double() ** 2).sum())
    err = float(((back - w).double() ** 2).sum())
    return bits, err / norm2 if norm2 else 0.0, back
