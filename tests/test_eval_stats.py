"""bofrs.eval.stats: the paired bootstrap against brute force, and its coverage."""

from __future__ import annotations

import numpy as np
import pytest

from bofrs.eval.stats import Bootstrap, unit_of_token


def _explicit(boot: Bootstrap, b: int, values: np.ndarray) -> np.ndarray:
    """Resample ``b`` written out: the tokens of each drawn unit, repeated as often as drawn."""
    parts = []
    for unit, count in enumerate(boot.counts[b].astype(int)):
        parts += [values[boot.unit_of_token == unit]] * count
    return np.concatenate(parts)


@pytest.mark.parametrize("unit", ["window", "token"])
def test_resampled_means_and_quantiles_match_brute_force(unit: str) -> None:
    rng = np.random.default_rng(1)
    sizes = rng.integers(1, 9, size=13)
    units = unit_of_token(sizes, unit)
    values = rng.exponential(size=units.size)
    values[:5] = values[5]  # ties
    boot = Bootstrap(units, resamples=40, seed=3)
    mean, means = boot.mean_samples(values)
    q, quantiles = boot.quantile_samples(values, 0.9)
    assert mean == pytest.approx(values.mean(), rel=1e-12)
    assert q == np.quantile(values, 0.9, method="inverted_cdf")
    for b in range(40):
        drawn = _explicit(boot, b, values)
        assert means[b] == pytest.approx(drawn.mean(), rel=1e-12)
        assert quantiles[b] == np.quantile(drawn, 0.9, method="inverted_cdf")


def test_draws_are_seeded_and_shared_across_formats() -> None:
    units = unit_of_token([4] * 20, "window")
    a, b = Bootstrap(units, resamples=50, seed=7), Bootstrap(units, resamples=50, seed=7)
    assert np.array_equal(a.counts, b.counts)
    assert not np.array_equal(a.counts, Bootstrap(units, resamples=50, seed=8).counts)
    assert np.all(a.counts.sum(1) == 20)
    values = np.random.default_rng(0).normal(size=80)
    _, s1 = a.mean_samples(values)
    _, s2 = a.mean_samples(values + 0.25)
    diff = a.interval(0.25, s2 - s1)  # paired: a constant shift has no spread at all
    assert diff.low == pytest.approx(0.25) and diff.high == pytest.approx(0.25)


def _coverage(unit: str, simulations: int = 120) -> float:
    """How often the 95 % interval of the mean covers the true mean (0) when the tokens of a
    window share a window effect (intra-window correlation 0.5)."""
    rng = np.random.default_rng(11)
    windows, per = 25, 40
    hits = 0
    for s in range(simulations):
        values = np.repeat(rng.normal(size=windows), per) + rng.normal(size=windows * per)
        boot = Bootstrap(unit_of_token([per] * windows, unit), resamples=200, seed=s)
        interval = boot.interval(*boot.mean_samples(values))
        hits += interval.low <= 0.0 <= interval.high
    return hits / simulations


def test_window_intervals_cover_and_token_intervals_do_not_under_correlation() -> None:
    assert 0.86 <= _coverage("window") <= 0.995
    assert _coverage("token") < 0.5


def test_bad_arguments_raise() -> None:
    units = unit_of_token([3, 3], "window")
    with pytest.raises(ValueError, match="resamples"):
        Bootstrap(units, resamples=5)
    with pytest.raises(ValueError, match="confidence"):
        Bootstrap(units, confidence=1.0)
    with pytest.raises(ValueError, match="unit_of_token"):
        Bootstrap(np.array([], dtype=int))
    with pytest.raises(ValueError, match="every unit"):
        Bootstrap(np.array([0, 2]))
    with pytest.raises(ValueError, match="unit"):
        unit_of_token([3], "sentence")
    with pytest.raises(ValueError, match="values"):
        Bootstrap(units).mean_samples(np.zeros(5))
