"""What the claims ledger reads from a run's rows, and how per-part verdicts add up.

Every rule of bench/analysing/claims.py builds its verdict from `Part`s: one measurement of one model (a fitted
exponent, a trend over a stream), each with the cell ids of the rows behind it. A part is only made for a
measurement the run attempted (it has rows, whatever their status); a part whose rows all failed (oom, timeout,
diverged, error, skipped) is "not measured" with the statuses as its reason, never a number read from a NaN.
Models are found through the registry (`family`, and the complexity each declares under the run's own config),
so a model registered later is judged without editing the rules.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

import models
from bench.analysing.scaling import PowerFit, fit_samples, t95
from bench.metrics import STATUS, profile_family
from models.base import Complexity

SUPPORTED, CONTRADICTED, INCONCLUSIVE, NOT_MEASURED = "supported", "contradicted", "inconclusive", "not measured"
VERDICTS = (SUPPORTED, CONTRADICTED, INCONCLUSIVE, NOT_MEASURED)


@dataclass(frozen=True)
class Judgement:
    """A verdict, the numbers that decided it, and the cells (ids) whose rows were read."""

    verdict: str
    evidence: str
    cells: tuple[str, ...] = ()


@dataclass
class Series:
    """The ok measurements of one (model, metric) per n (every stored repeat), the cells read, and the statuses
    of the rows that failed."""

    samples: dict[float, list[float]] = field(default_factory=dict)
    cells: set[str] = field(default_factory=set)
    failed: dict[str, int] = field(default_factory=dict)

    @property
    def attempted(self) -> bool:
        return bool(self.samples or self.failed)

    def failures(self) -> str:
        return ", ".join(f"{count} {status}" for status, count in sorted(self.failed.items()))

    def missing(self, what: str) -> Judgement | None:
        """'not measured' when no row is ok (None when there is something to judge)."""
        if self.samples:
            return None
        return Judgement(NOT_MEASURED, f"{what}: no ok rows ({self.failures() or 'none stored'})", tuple(self.cells))


def cell_ids(rows: pd.DataFrame) -> set[str]:
    return {str(c) for c in rows["cell_id"].dropna().unique()}


def repeats(row: pd.Series) -> list[float]:
    """Every repeat a row stored (`samples` in its extra JSON, written by the time probe), else its value."""
    extra = json.loads(row["extra"]) if isinstance(row.get("extra"), str) and row["extra"] else {}
    return [float(v) for v in extra.get("samples") or [row["value"]]]


def select(frame: pd.DataFrame, **where: object) -> pd.DataFrame:
    mask = np.ones(len(frame), bool)
    for column, value in where.items():
        if value is not None:
            mask &= (frame[column] == value).to_numpy()
    return frame[mask]


def series(frame: pd.DataFrame, model: str, metric: str, kind: str | None = None) -> Series:
    rows = select(frame, model=model, metric=metric, kind=kind)
    out = Series(cells=cell_ids(rows))
    ok = rows["status"] == "ok"
    for _, row in rows[ok].iterrows():
        values = [v for v in repeats(row) if math.isfinite(v)]
        if values:
            out.samples.setdefault(float(row["n"]), []).extend(values)
    crashed = crashed_cells(frame, model, metric, kind)
    out.cells |= cell_ids(crashed)
    out.failed = pd.concat([rows[~ok], crashed])["status"].fillna("unknown").value_counts().to_dict()
    return out


def crashed_cells(frame: pd.DataFrame, model: str, metric: str, kind: str | None) -> pd.DataFrame:
    """The status rows (metric `status`: one per cell that raised) of the cells that would have measured
    `metric`: a profile cell names its metric family (time, memory, flops) in its config."""
    rows = select(frame, model=model, metric=STATUS, kind=kind)

    def measures(config: object) -> bool:
        wanted = json.loads(config).get("run_config", {}).get("metric") if isinstance(config, str) else None
        return wanted is None or profile_family(metric) == wanted
    return rows[rows["config"].map(measures).astype(bool)] if len(rows) else rows


def fitted(s: Series, fraction: float = 0.5) -> PowerFit | None:
    return fit_samples(s.samples, fraction) if len(s.samples) >= 2 else None


def band(fit: PowerFit, low: float, high: float) -> str:
    """Supported if the exponent's interval lies inside [low, high], contradicted if it lies wholly outside,
    inconclusive if it straddles an edge (or is too wide to say)."""
    lo, hi = fit.interval
    if low <= lo and hi <= high:
        return SUPPORTED
    if hi < low or lo > high:
        return CONTRADICTED
    return INCONCLUSIVE


def exponent_part(frame: pd.DataFrame, model: str, metric: str, low: float, high: float,
                  kind: str | None = None, fraction: float = 0.5) -> Judgement | None:
    """One model's fitted exponent of `metric` (over the upper `fraction` of its lengths) judged against
    [low, high]; None where the run has no such rows."""
    s = series(frame, model, metric, kind)
    if not s.attempted:
        return None
    missing = s.missing(f"{model} {metric}")
    if missing:
        return missing
    f = fitted(s, fraction)
    if f is None:
        return Judgement(NOT_MEASURED, f"{model} {metric}: one length only", tuple(s.cells))
    failed = f" ({s.failures()} not fitted)" if s.failed else ""
    return Judgement(band(f, low, high), f"{model} {metric} p = {f}{failed}", tuple(s.cells))


def combine(parts: dict[str, Judgement], rule: str, empty: str) -> Judgement:
    """All parts must hold: contradicted if any part is contradicted, supported only if every part is supported
    (a part not measured keeps it inconclusive), not measured if no part was measured."""
    if not parts:
        return Judgement(NOT_MEASURED, empty)
    verdicts = [p.verdict for p in parts.values()]
    if all(v == NOT_MEASURED for v in verdicts):
        verdict = NOT_MEASURED
    elif CONTRADICTED in verdicts:
        verdict = CONTRADICTED
    elif all(v == SUPPORTED for v in verdicts):
        verdict = SUPPORTED
    else:
        verdict = INCONCLUSIVE
    return Judgement(verdict, f"{rule} — " + "; ".join(f"[{p.verdict}] {p.evidence}" for p in parts.values()),
                     merged(parts.values()))


def merged(judgements: Iterable[Judgement]) -> tuple[str, ...]:
    return tuple(sorted({c for j in judgements for c in j.cells}))


def present(frame: pd.DataFrame, *families: str) -> list[str]:
    """The registered models of these families that have rows in the run, in registry order."""
    seen = set(frame["model"].dropna())
    return [m for m in models.in_family(*families) if m in seen]


def model_config(frame: pd.DataFrame, model: str) -> dict:
    """The model config the run's cells used for `model` (the first stored; suites share one per model)."""
    for config in select(frame, model=model)["config"].dropna():
        return json.loads(config).get("model_config") or {}
    return {}


def declared(frame: pd.DataFrame, model: str) -> Complexity:
    return models.declared(model, **model_config(frame, model))


def seed_interval(values: list[float], fallback: tuple[float, float]) -> tuple[float, float, float]:
    """Mean and 95 % Student-t interval over seeds; with one seed, `fallback` (that seed's own fit interval)."""
    mean = float(np.mean(values))
    if len(values) < 2:
        return mean, *fallback
    half = t95(len(values) - 1) * float(np.std(values, ddof=1)) / math.sqrt(len(values))
    return mean, mean - half, mean + half


@dataclass(frozen=True)
class Trend:
    """Slope of log(value) against t (or log t) fitted per seed over the whole series and over its second half,
    each as (mean, low, high) over seeds; first and last window values (means over seeds); stream length n."""

    whole: tuple[float, float, float]
    tail: tuple[float, float, float]
    seeds: int
    first: float
    last: float
    n: float
    cells: tuple[str, ...]


def _slope(x: np.ndarray, y: np.ndarray) -> tuple[float, tuple[float, float]]:
    """Least-squares slope and its 95 % t interval (the fallback when only one seed exists)."""
    xc = x - x.mean()
    slope = float((xc * (y - y.mean())).sum() / (xc * xc).sum())
    df = len(x) - 2
    resid = y - y.mean() - slope * xc
    half = t95(df) * math.sqrt(float((resid**2).sum()) / df / float((xc * xc).sum())) if df > 0 else math.inf
    return slope, (slope - half, slope + half)


def trend(frame: pd.DataFrame, variant: str, metric: str, log_x: bool = False) -> Trend | Judgement | None:
    """The trend of a dynamics diagnostic (rows per window of one stream, one cell per seed). None without rows;
    'not measured' with fewer than 4 windows; 'contradicted' where a seed diverged (a NaN or infinite value is
    no bound and no convergence)."""
    rows = select(frame, kind="dynamics", variant=variant, metric=metric)
    if rows.empty:
        return None
    cells = tuple(sorted(cell_ids(rows)))
    bad = rows[(rows["status"] != "ok") | ~np.isfinite(rows["value"].astype(float))]
    if len(bad):
        seeds = sorted({int(s) for s in bad["seed"].fillna(0)})
        return Judgement(CONTRADICTED, f"{variant} {metric} not finite (status {', '.join(set(bad['status']))}) "
                                       f"in seed(s) {seeds}", cells)
    whole, tail, firsts, lasts = [], [], [], []
    for _, g in rows.groupby(rows["seed"].fillna(0)):
        s = g.groupby("n")["value"].mean().sort_index()
        if len(s) < 4 or (s <= 0).any():
            return Judgement(NOT_MEASURED, f"{variant} {metric}: {len(s)} windows (4 positive ones needed)", cells)
        x = np.log(s.index.to_numpy(float)) if log_x else s.index.to_numpy(float)
        y = np.log(s.to_numpy(float))
        half = len(s) // 2
        whole.append(_slope(x, y))
        tail.append(_slope(x[half:], y[half:]))
        firsts.append(s.iloc[0])
        lasts.append(s.iloc[-1])
    return Trend(seed_interval([w[0] for w in whole], whole[0][1]), seed_interval([t[0] for t in tail], tail[0][1]),
                 len(whole), float(np.mean(firsts)), float(np.mean(lasts)), float(rows["n"].max()), cells)
