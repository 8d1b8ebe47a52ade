"""Paired bootstrap over seeds and test prompts: a mean and its 95% interval.

The data are per-seed arrays of per-prompt values (a method's score, or its difference to a baseline
on the same prompt). One resample draws seeds with replacement, then, within each drawn seed, its
prompts with replacement; the statistic is the mean over the drawn seeds of their prompt means, so
each seed weighs the same. Both sources of noise, which data split and training run we got and which
test prompts, widen the interval. NumPy only, with a fixed RNG seed: the same data give the same
interval.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

RNG_SEED = 20_240_516
Values = Sequence[float] | np.ndarray  # one seed's per-prompt values


@dataclass(frozen=True)
class Interval:
    mean: float
    low: float
    high: float
    resamples: int

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    def as_dict(self) -> dict[str, float | int]:
        return {"mean": self.mean, "low": self.low, "high": self.high, "resamples": self.resamples}


def seed_bootstrap(
    per_seed: Sequence[Values], resamples: int = 4000, level: float = 0.95, rng_seed: int = RNG_SEED
) -> Interval:
    """The mean of the seed means, with a percentile interval from the two-level bootstrap."""
    arrays = [np.asarray(values, dtype=np.float64) for values in per_seed]
    if not arrays or any(a.size == 0 for a in arrays):
        raise ValueError("every seed needs at least one value")
    if resamples < 1 or not 0 < level < 1:
        raise ValueError(f"need resamples >= 1 and 0 < level < 1, got {resamples}, {level}")
    rng = np.random.default_rng(rng_seed)
    n_seeds = len(arrays)
    drawn_seeds = rng.integers(0, n_seeds, size=(resamples, n_seeds))
    totals = np.zeros(resamples)
    for position in range(n_seeds):
        for seed, values in enumerate(arrays):
            rows = np.flatnonzero(drawn_seeds[:, position] == seed)
            if rows.size:
                picks = rng.integers(0, values.size, size=(rows.size, values.size))
                totals[rows] += values[picks].mean(axis=1)
    statistics = totals / n_seeds
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(statistics, [tail, 100 - tail])
    point = float(np.mean([a.mean() for a in arrays]))
    return Interval(point, float(low), float(high), resamples)


def paired_differences(method: Sequence[Values], baseline: Sequence[Values]) -> list[np.ndarray]:
    """Per seed, method minus baseline on each prompt (both score the same prompts in the same order)."""
    if len(method) != len(baseline):
        raise ValueError(f"{len(method)} seeds against {len(baseline)}")
    out = []
    for m, b in zip(method, baseline, strict=True):
        a, c = np.asarray(m, dtype=np.float64), np.asarray(b, dtype=np.float64)
        if a.shape != c.shape:
            raise ValueError(f"paired scores differ in length: {a.shape} vs {c.shape}")
        out.append(a - c)
    return out
