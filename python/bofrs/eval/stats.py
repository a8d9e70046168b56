"""Seeded, paired bootstrap intervals for per-token scores.

Every format is resampled with the *same* draws (one :class:`Bootstrap` per evaluation), so
the interval of a difference between two formats is the interval of a paired difference.
The resampled unit is either a window (default) or a token. Windows are disjoint stretches of
text, each scored from its own start, while the tokens of one window share their context (a
hard passage raises every token's KL): resampling single tokens treats them as independent
and gives intervals that are too narrow. Windows are the independent units.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

UNITS = ("window", "token")

FloatArray = npt.NDArray[np.float64]


@dataclass(frozen=True)
class Interval:
    """A point estimate and its bootstrap percentile interval."""

    value: float
    low: float
    high: float

    def to_list(self) -> list[float]:
        """``[low, high]``."""
        return [self.low, self.high]


class Bootstrap:
    """Resampling weights shared by all formats of one evaluation.

    ``unit_of_token`` gives, for each scored token, the index of its unit (its window for
    ``unit="window"``); ``resamples`` draws of as many units as there are, with replacement,
    from a generator seeded with ``seed``. ``confidence`` sets the percentile interval."""

    def __init__(
        self,
        unit_of_token: npt.ArrayLike,
        *,
        resamples: int = 1000,
        seed: int = 0,
        confidence: float = 0.95,
    ) -> None:
        if isinstance(resamples, bool) or not isinstance(resamples, int) or resamples < 10:
            raise ValueError(f"resamples must be an int >= 10, got {resamples!r}")
        if not 0.5 <= float(confidence) < 1.0:
            raise ValueError(f"confidence must be in [0.5, 1), got {confidence!r}")
        units = np.asarray(unit_of_token, dtype=np.int64)
        if units.ndim != 1 or units.size == 0:
            raise ValueError("unit_of_token must be a non-empty 1-D array")
        if units.min() < 0:
            raise ValueError("unit_of_token must hold unit indices >= 0")
        count = int(units.max()) + 1
        if np.bincount(units, minlength=count).min() == 0:
            raise ValueError("unit_of_token: every unit needs at least one token")
        self.unit_of_token = units
        self.units = count
        self.resamples = resamples
        self.seed = seed
        self.confidence = float(confidence)
        rng = np.random.default_rng(seed)
        draws = rng.integers(0, count, size=(resamples, count))
        # counts[b, u]: how often unit u is drawn in resample b.
        self.counts = np.zeros((resamples, count), dtype=np.float64)
        np.add.at(self.counts, (np.arange(resamples)[:, None], draws), 1.0)
        self.tokens_per_unit = np.bincount(units, minlength=count).astype(np.float64)
        self._resampled_tokens = self.counts @ self.tokens_per_unit

    def _unit_sums(self, values: npt.ArrayLike) -> FloatArray:
        v = np.asarray(values, dtype=np.float64)
        if v.shape != self.unit_of_token.shape:
            raise ValueError(f"values: expected {self.unit_of_token.shape[0]} per-token values, got {v.shape}")
        return np.asarray(np.bincount(self.unit_of_token, weights=v, minlength=self.units), dtype=np.float64)

    def mean_samples(self, values: npt.ArrayLike) -> tuple[float, FloatArray]:
        """The mean of per-token ``values`` and its value in every resample."""
        sums = self._unit_sums(values)
        return float(sums.sum() / self.tokens_per_unit.sum()), (self.counts @ sums) / self._resampled_tokens

    def quantile_samples(self, values: npt.ArrayLike, q: float) -> tuple[float, FloatArray]:
        """The ``q`` quantile (inverted CDF: the smallest value with at least a fraction ``q``
        of the tokens at or below it) and its value in every resample."""
        v = np.asarray(values, dtype=np.float64)
        if v.shape != self.unit_of_token.shape:
            raise ValueError(f"values: expected {self.unit_of_token.shape[0]} per-token values, got {v.shape}")
        order = np.argsort(v, kind="stable")
        sorted_values, sorted_units = v[order], self.unit_of_token[order]
        point = float(np.quantile(v, q, method="inverted_cdf"))
        out = np.empty(self.resamples)
        for first in range(0, self.resamples, 64):
            weights = self.counts[first : first + 64][:, sorted_units]
            cumulative = np.cumsum(weights, axis=1)
            need = q * cumulative[:, -1:]
            index = np.argmax(cumulative >= need - 1e-9 * need, axis=1)
            out[first : first + 64] = sorted_values[index]
        return point, out

    def interval(self, value: float, samples: FloatArray) -> Interval:
        """``value`` with the percentile interval of ``samples``."""
        tail = (1.0 - self.confidence) / 2.0
        low, high = np.quantile(samples, [tail, 1.0 - tail])
        return Interval(float(value), float(low), float(high))

    def describe(self) -> dict[str, Any]:
        """The settings, for a JSON record."""
        return {
            "resamples": self.resamples, "seed": self.seed, "confidence": self.confidence,
            "units": self.units,
        }  # fmt: skip


def unit_of_token(tokens_per_window: npt.ArrayLike, unit: str) -> npt.NDArray[np.int64]:
    """The bootstrap unit of each token of windows holding ``tokens_per_window`` scored
    tokens, in order: the window index for ``"window"``, the token index for ``"token"``."""
    if unit not in UNITS:
        raise ValueError(f"unit must be one of {UNITS}, got {unit!r}")
    sizes = np.asarray(tokens_per_window, dtype=np.int64)
    windows = np.repeat(np.arange(sizes.size), sizes)
    return windows if unit == "window" else np.arange(windows.size)
