"""A :class:`HiggsTensor` in a bofrs file: its manifest entry (``kind`` ``"higgs"``, the grid
points stored with it) and parts (``codes``, ``scales``), and the validated way back."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from bofrs._dtypes import SCALE_DTYPES, dtype_from_name, dtype_name
from bofrs._errors import FormatError
from bofrs.formats.blockwise.stored import shape_of
from bofrs.formats.higgs.grids import Grid

if TYPE_CHECKING:
    from bofrs.formats.higgs.tensor import HiggsTensor

KIND = "higgs"
#: Grid sizes a file may hold.
GRID_POINTS = (4, 8, 16, 32, 64, 256)


def manifest(value: HiggsTensor) -> dict[str, Any]:
    """The manifest entry of ``value`` (without checksums)."""
    return {
        "kind": KIND,
        "shape": list(value.shape),
        "dtype": dtype_name(value.dtype),
        "group_size": value.group_size,
        "scale_dtype": dtype_name(value.scales.dtype),
        "grid": {
            "p": value.grid.p, "n": value.grid.n, "mse": value.grid.mse,
            "points": [float(v) for v in value.grid.points.ravel()],
        },
    }  # fmt: skip


def from_stored(name: str, entry: Mapping[str, Any], raw: Mapping[str, torch.Tensor]) -> HiggsTensor:
    """The HIGGS tensor of an entry, every field validated."""
    from bofrs.formats.higgs.tensor import HiggsTensor

    shape = shape_of(name, entry)
    spec = entry["grid"]
    if not isinstance(spec, dict):
        raise FormatError(f"{name}: invalid grid {spec!r}")
    p, n, points = spec.get("p"), spec.get("n"), spec.get("points")
    if p not in (1, 2) or n not in GRID_POINTS or not isinstance(points, list) or len(points) != n * p:
        raise FormatError(f"{name}: invalid grid (p={p!r}, n={n!r})")
    grid_points = torch.tensor(points, dtype=torch.float64)
    if not bool(torch.isfinite(grid_points).all()) or (p == 1 and not bool((grid_points.diff() > 0).all())):
        raise FormatError(f"{name}: grid points must be finite (and ascending in 1-D)")
    grid = Grid(p, n, grid_points.float().numpy().reshape(n, p), float(spec.get("mse", 0.0)))
    scale_dtype = entry["scale_dtype"]
    if scale_dtype not in SCALE_DTYPES:
        raise FormatError(f"{name}: invalid scale_dtype {scale_dtype!r}")
    codes, scales = raw["codes"], raw["scales"]
    if scales.dtype != SCALE_DTYPES[scale_dtype]:
        raise FormatError(f"{name}: scales stored as {scales.dtype}, manifest says {scale_dtype}")
    if not bool((torch.isfinite(scales) & (scales >= 0)).all()):
        raise FormatError(f"{name}: scales must be finite and non-negative")
    group_size = entry["group_size"]
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 16 or group_size & (group_size - 1):
        raise FormatError(f"{name}: invalid group_size {group_size!r}")
    return HiggsTensor(codes, scales, torch.Size(shape), dtype_from_name(entry["dtype"]), group_size, grid)
