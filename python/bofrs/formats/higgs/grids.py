"""Gaussian MSE-optimal grids for HIGGS, shipped as a generated table (``grids.json``).

The table is what ``python -m bofrs._grids`` writes: every grid comes from our own solver
(``_native.generate_grid``: exact Lloyd-Max for p = 1, LBG on a Gaussian quadrature for p = 2,
seeded). The test suite regenerates them and compares.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from bofrs import _native

TABLE = Path(__file__).with_name("grids.json")
#: (p, n) of every shipped grid.
GRID_SIZES = ((1, 4), (1, 8), (1, 16), (1, 32), (1, 64), (1, 256), (2, 16), (2, 64), (2, 256))
SEED = 0


@dataclass(frozen=True)
class Grid:
    """``n`` points of dimension ``p`` (float32, ``n x p``) and their MSE per coordinate."""

    p: int
    n: int
    points: npt.NDArray[np.float32]
    mse: float

    @property
    def bits_per_weight(self) -> float:
        """Code bits per weight: ``log2(n) / p``."""
        return float(np.log2(self.n)) / self.p


def generate(p: int, n: int, seed: int = SEED) -> Grid:
    """Runs the solver for one grid (p = 2, n = 256 takes several seconds)."""
    points, mse = _native.generate_grid(p, n, seed)
    return Grid(p, n, points.astype(np.float32).reshape(n, p), float(mse))


@functools.lru_cache(maxsize=None)
def _table() -> dict[str, dict[str, object]]:
    data: dict[str, dict[str, object]] = json.loads(TABLE.read_text())["grids"]
    return data


def grid(p: int, n: int) -> Grid:
    """A shipped grid; ValueError naming the valid choices otherwise."""
    key = f"p{p}n{n}"
    entry = _table().get(key)
    if entry is None:
        choices = ", ".join(f"p={a} n={b}" for a, b in GRID_SIZES)
        raise ValueError(f"no HIGGS grid with p={p}, n={n}; available: {choices}")
    points = np.array(entry["points"], dtype=np.float32).reshape(n, p)
    points.setflags(write=False)
    return Grid(p, n, points, float(entry["mse"]))  # type: ignore[arg-type]


def write_table(path: Path = TABLE) -> None:
    """Regenerates every grid and writes the table."""
    grids = {}
    for p, n in GRID_SIZES:
        g = generate(p, n)
        grids[f"p{p}n{n}"] = {"p": p, "n": n, "mse": g.mse, "points": [float(v) for v in g.points.ravel()]}
    path.write_text(json.dumps({"seed": SEED, "generator": "bofrs._native.generate_grid", "grids": grids}, indent=1) + "\n")


if __name__ == "__main__":
    write_table()
    print(f"wrote {TABLE}")
