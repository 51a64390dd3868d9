"""What moved between two runs: scaling exponents (difference), accuracies and errors (difference; every metric
declared with the role `quality` in bench/metrics.py), times and memory (ratio B / A, since absolute values drift
between machines and days)."""

from __future__ import annotations

import pandas as pd

from bench import metrics
from bench.analysing.plots import SCALING_METRICS
from bench.analysing.scaling import fit_power

COSTS = (metrics.TIME_FORWARD_S, metrics.TIME_TRAIN_S, metrics.MEMORY_FORWARD_BYTES, metrics.MEMORY_TRAIN_BYTES,
         metrics.FLOPS_FORWARD, metrics.TRAIN_TOKENS_PER_S)


def exponents(frame: pd.DataFrame) -> pd.Series:
    out = {}
    for (metric, model), group in frame[frame["status"] == "ok"].groupby(["metric", "model"]):
        if metric in SCALING_METRICS:
            s = group.groupby("n")["value"].median()
            f = fit_power(s.index.to_numpy(), s.to_numpy())
            if f is not None:
                out[(metric, model)] = f.exponent
    return pd.Series(out, dtype=float)


def quality(*frames: pd.DataFrame) -> list[str]:
    """The quality metrics (accuracies, test errors) the runs hold."""
    names = {m for frame in frames for m in frame["metric"].dropna().unique()}
    return sorted(m for m in names if metrics.role(m) == "quality")


def medians(frame: pd.DataFrame, names) -> pd.Series:
    rows = frame[frame["metric"].isin(names) & (frame["status"] == "ok")].copy()
    rows["n"], rows["task"] = rows["n"].fillna(-1), rows["task"].fillna("")
    return rows.groupby(["metric", "model", "task", "n"])["value"].median()


def paired(a: pd.Series, b: pd.Series) -> pd.DataFrame:
    return pd.concat([a, b], axis=1, keys=["a", "b"]).dropna()


def compare(a: pd.DataFrame, b: pd.DataFrame, threshold: float = 0.05) -> str:
    """Text tables of the entries that changed by more than `threshold` (absolute for exponents and scores,
    relative for cost ratios)."""
    lines = []
    e = paired(exponents(a), exponents(b))
    moved = e[(e["b"] - e["a"]).abs() > threshold]
    lines.append(f"scaling exponents: {len(e)} compared, {len(moved)} moved by more than {threshold}")
    lines += [f"  {m:<22} {model:<18} {r.a:6.2f} -> {r.b:6.2f} ({r.b - r.a:+.2f})"
              for (m, model), r in moved.iterrows()]
    names = quality(a, b)
    q = paired(medians(a, names), medians(b, names))
    moved = q[(q["b"] - q["a"]).abs() > threshold]
    lines.append(f"accuracy / error: {len(q)} compared, {len(moved)} moved by more than {threshold}")
    lines += [f"  {m:<16} {model:<18} {task:<11} n={n:<7g} {r.a:.3f} -> {r.b:.3f} ({r.b - r.a:+.3f})"
              for (m, model, task, n), r in moved.iterrows()]
    c = paired(medians(a, COSTS), medians(b, COSTS))
    c = c[c["a"] > 0]
    moved = c[(c["b"] / c["a"] - 1).abs() > threshold]
    lines.append(f"costs (B / A): {len(c)} compared, {len(moved)} moved by more than {threshold:.0%}")
    lines += [f"  {m:<22} {model:<18} n={n:<7g} x{r.b / r.a:.2f}" for (m, model, _task, n), r in moved.iterrows()]
    return "\n".join(lines)
