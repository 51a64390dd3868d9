"""Scaling fits: log-log least squares with a 95 % confidence interval, best-fit complexity class, and
the crossover length where one cost curve drops below another."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# two-sided 95 % Student-t quantiles by degrees of freedom; 1.96 beyond the table
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        12: 2.179, 15: 2.131, 20: 2.086, 30: 2.042}

CLASSES = {
    "1": lambda n: np.ones_like(n),
    "log n": np.log,
    "n": lambda n: n,
    "n log n": lambda n: n * np.log(n),
    "n^2": lambda n: n * n,
}


def t95(df: int) -> float:
    if df <= 0:
        return math.inf
    for k in sorted(_T95):
        if df <= k:
            return _T95[k]
    return 1.96


@dataclass(frozen=True)
class PowerFit:
    exponent: float
    ci_low: float
    ci_high: float
    r2: float
    points: int
    n_min: int
    n_max: int

    def __str__(self) -> str:
        half = (self.ci_high - self.ci_low) / 2
        return f"{self.exponent:.2f} ± {half:.2f} (R² {self.r2:.3f}, n {self.n_min}..{self.n_max})"


def upper_part(ns: np.ndarray, fraction: float = 0.5) -> np.ndarray:
    """Mask of the points whose n lies in the upper `fraction` of the distinct lengths (at least 3 lengths
    where the grid has them): small n is dominated by fixed overheads, not by the asymptotic term."""
    distinct = np.unique(ns)
    keep = max(min(3, len(distinct)), math.ceil(len(distinct) * fraction))
    return ns >= distinct[-keep]


def fit_power(ns, ys, fraction: float = 0.5) -> PowerFit | None:
    """y = a n^p on the upper part of the grid: p with its 95 % CI and R² (in log space)."""
    ns, ys = np.asarray(ns, float), np.asarray(ys, float)
    ok = np.isfinite(ys) & (ys > 0)
    ns, ys = ns[ok], ys[ok]
    if len(np.unique(ns)) < 2:
        return None
    mask = upper_part(ns, fraction)
    x, y = np.log(ns[mask]), np.log(ys[mask])
    if len(np.unique(x)) < 2:
        return None
    xc = x - x.mean()
    slope = float((xc * (y - y.mean())).sum() / (xc * xc).sum())
    resid = y - y.mean() - slope * xc
    ss_res, ss_tot = float((resid**2).sum()), float(((y - y.mean()) ** 2).sum())
    df = len(x) - 2
    se = math.sqrt(ss_res / df / (xc * xc).sum()) if df > 0 else math.inf
    half = t95(df) * se
    r2 = 1 - ss_res / ss_tot if ss_tot > 0 else 1.0
    return PowerFit(slope, slope - half, slope + half, r2, len(x), int(ns[mask].min()), int(ns[mask].max()))


def best_class(ns, ys) -> tuple[str, dict[str, float]]:
    """Among 1, log n, n, n log n, n^2: the f whose y = a + c f(n) (c >= 0) fits best in relative error."""
    ns, ys = np.asarray(ns, float), np.asarray(ys, float)
    ok = np.isfinite(ys) & (ys > 0)
    ns, ys = ns[ok], ys[ok]
    errors = {}
    for name, f in CLASSES.items():
        features = np.stack([np.ones_like(ns), f(ns)], axis=1) / ys[:, None]  # relative residuals
        coef, *_ = np.linalg.lstsq(features, np.ones_like(ys), rcond=None)
        if coef[1] < 0 or name == "1":
            coef = np.array([np.sum(1 / ys) / np.sum(1 / ys**2), 0.0])
        pred = coef[0] + coef[1] * f(ns)
        errors[name] = float(np.sqrt(np.mean(((pred - ys) / ys) ** 2)))
    return min(errors, key=errors.get), errors


def crossover(ns, cheap_later, costly_later) -> float | None:
    """Smallest n from which `cheap_later` stays below `costly_later`, interpolated in log-log between grid
    points; None if it never does on the grid. Both series are indexed by the same sorted ns."""
    ns = np.asarray(ns, float)
    ratio = np.log(np.asarray(costly_later, float)) - np.log(np.asarray(cheap_later, float))
    if not np.isfinite(ratio).all() or ratio[-1] <= 0:
        return None
    below = np.where(ratio <= 0)[0]
    if len(below) == 0:
        return float(ns[0])
    i = below[-1]
    x0, x1 = np.log(ns[i]), np.log(ns[i + 1])
    t = -ratio[i] / (ratio[i + 1] - ratio[i])
    return float(np.exp(x0 + t * (x1 - x0)))
