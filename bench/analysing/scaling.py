"""Scaling fits: log-log least squares with a 95 % confidence interval, best-fit complexity class, and
the crossover length where one cost curve drops below another.

Two intervals per exponent. The analytic one (Student t on the regression residuals) assumes independent
normal errors around a straight line; on three to five lengths it is either huge (one degree of freedom: t = 12.7)
or, where the points happen to line up, implausibly narrow (Besiroglu et al. 2024). The bootstrap one resamples
the measurements themselves: where a length has repeats, each draw resamples the repeats of every length (with
replacement) and refits the medians, so the interval is the measurement noise carried through the fit; where every
length has a single measurement (FLOPs, one memory probe), each draw resamples the (n, value) points instead, so
the interval is the misfit of the power law over the fit range. Percentile interval of `DRAWS` draws, fixed seed:
the same rows give the same interval. Verdicts use the bootstrap interval (`PowerFit.interval`)."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

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
    boot_low: float = math.nan
    boot_high: float = math.nan

    @property
    def interval(self) -> tuple[float, float]:
        """The interval verdicts use: the bootstrap one where it was computed, else the analytic one."""
        if math.isfinite(self.boot_low) and math.isfinite(self.boot_high):
            return self.boot_low, self.boot_high
        return self.ci_low, self.ci_high

    @property
    def half_width(self) -> float:
        low, high = self.interval
        return (high - low) / 2

    def __str__(self) -> str:
        half = (self.ci_high - self.ci_low) / 2
        boot = f", bootstrap [{self.boot_low:.2f}, {self.boot_high:.2f}]" if math.isfinite(self.boot_low) else ""
        return f"{self.exponent:.2f} ± {half:.2f}{boot} (R² {self.r2:.3f}, n {self.n_min}..{self.n_max})"


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


DRAWS = 2000
Samples = Mapping[float, Sequence[float]]  # n -> the repeats measured at n


def _positive(samples: Samples) -> dict[float, np.ndarray]:
    out = {float(n): np.asarray(v, float) for n, v in samples.items()}
    out = {n: v[np.isfinite(v) & (v > 0)] for n, v in out.items()}
    return {n: v for n, v in sorted(out.items()) if len(v)}


def _slopes(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least-squares slopes of each row of y against the same row of x ([draws, k]); NaN where x is constant."""
    xc = x - x.mean(axis=1, keepdims=True)
    sxx = (xc * xc).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(sxx > 1e-12, (xc * (y - y.mean(axis=1, keepdims=True))).sum(axis=1) / sxx, np.nan)


def _bootstrap(fit: PowerFit, series: list[dict[float, np.ndarray]], combine: Callable[..., np.ndarray],
               draws: int, seed: int) -> PowerFit:
    """`fit` with the percentile bootstrap interval of its exponent (see the module docstring); `series` are
    the samples per n of each input, restricted to the fit range, and `combine` maps their medians to y."""
    rng = np.random.default_rng(seed)
    ns = np.array(sorted(series[0]))
    x = np.log(ns)
    if all(len(s[n]) == 1 for s in series for n in ns):  # one measurement per n: resample the points
        y = np.log(combine(*[np.array([s[n][0] for n in ns]) for s in series]))
        idx = rng.integers(0, len(ns), (draws, len(ns)))
        slopes = _slopes(x[idx], y[idx])
    else:  # resample the repeats of every n, refit the medians
        medians = [np.stack([np.median(s[n][rng.integers(0, len(s[n]), (draws, len(s[n])))], axis=1)
                             for n in ns], axis=1) for s in series]
        slopes = _slopes(np.broadcast_to(x, (draws, len(ns))), np.log(combine(*medians)))
    slopes = slopes[np.isfinite(slopes)]
    if len(slopes) < draws // 2:
        return fit
    low, high = np.percentile(slopes, [2.5, 97.5])
    return replace(fit, boot_low=float(low), boot_high=float(high))


def _fit_series(series: list[Samples], combine: Callable[..., np.ndarray], fraction: float, draws: int,
                seed: int) -> PowerFit | None:
    clean = [_positive(s) for s in series]
    common = sorted(set.intersection(*(set(s) for s in clean))) if clean else []
    if len(common) < 2:
        return None
    ns = np.array(common)
    fit = fit_power(ns, combine(*[np.array([np.median(s[n]) for n in common]) for s in clean]), fraction)
    if fit is None:
        return None
    kept = ns[upper_part(ns, fraction)]
    return _bootstrap(fit, [{n: s[n] for n in kept} for s in clean], combine, draws, seed)


def fit_samples(samples: Samples, fraction: float = 0.5, draws: int = DRAWS, seed: int = 0) -> PowerFit | None:
    """y = a n^p fitted to the median of the repeats at each n (as `fit_power`), with the bootstrap interval."""
    return _fit_series([samples], lambda y: y, fraction, draws, seed)


def fit_ratio(numerator: Samples, denominator: Samples, fraction: float = 0.5, draws: int = DRAWS,
              seed: int = 0) -> PowerFit | None:
    """The log-log slope of numerator / denominator over their common lengths (a growing cost ratio has a
    positive slope), with the bootstrap interval resampling both inputs' repeats."""
    return _fit_series([numerator, denominator], lambda a, b: a / b, fraction, draws, seed)


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
