"""What a run says about accuracy, computed once for the report, the plots and the claims ledger.

Each task names its headline metric in the task registry (`TaskSpec.headline`: exact_match for copy and niah,
query_accuracy for mqar, test_mse for timeseries; its direction is the metric's, bench/metrics.py). Per model,
task, seed and length n the headline is pooled over the task's other grid axes (the needle depths of niah,
weighting each cell by its samples); for mqar the length curve is the slice at the largest trained pair count,
and the full grid (each axis the task declares x length) has its own heatmap.
Across seeds a model's value at n is the seeds' mean, with their range as the spread: a difference between two
models is called only where those ranges separate. With a single seed, the 95 % Wilson interval of the pooled
answers stands in for the range; a single seed of an error metric (forecast MSE) has no spread and decides
nothing.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd

import tasks
from bench import metrics
from tasks.base import wilson_interval


def headline(task: str) -> str | None:
    """The task's headline metric, from the registry (None for a task that is not registered)."""
    return tasks.spec(task).headline if task in tasks.TASKS else None


def accuracy_tasks(frame: pd.DataFrame) -> list[str]:
    """The registered tasks with rows in the run whose headline is better higher (an accuracy): the ones with
    accuracy tables and accuracy-by-length plots, in registry order."""
    seen = set(frame["task"].dropna()) if "task" in frame else set()
    return [t for t, s in tasks.TASKS.items() if t in seen and s.higher_is_better]


def extra_field(frame: pd.DataFrame, key: str) -> pd.Series:
    """One key of the rows' `extra` JSON column, NaN where absent."""
    def get(e):
        if not isinstance(e, str):
            return np.nan
        value = json.loads(e).get(key)
        return np.nan if value is None else value
    return frame["extra"].map(get) if "extra" in frame else pd.Series(np.nan, index=frame.index)


def _recipe(config: object) -> dict[str, str]:
    """A train cell's settings (model, task and training options; not its seed) as flat key -> JSON value."""
    if not isinstance(config, str):
        return {}
    cell = json.loads(config)
    return {key: json.dumps(value, sort_keys=True) for section in ("model_config", "task_config", "run_config")
            for key, value in (cell.get(section) or {}).items()}


def label_recipes(frame: pd.DataFrame) -> pd.DataFrame:
    """Where one model runs under several recipes on one task variant (a sweep suite), its train rows are
    relabelled `model (key=value, ...)` with the settings that differ, so that every table, plot and verdict
    keeps the recipes apart instead of pooling them as if they were seeds. Other frames come back unchanged."""
    train = frame[frame["kind"] == "train"]
    if train.empty or "config" not in frame:
        return frame
    recipes = train["config"].map(_recipe)
    variants = train["variant"].astype(object).fillna(train["task"])
    labels = {}
    for _, group in train.groupby([train["task"], variants, train["model"]]):
        settings = recipes[group.index]
        keys = sorted({k for r in settings for k in r})
        varying = [k for k in keys if len({r.get(k) for r in settings}) > 1]
        if not varying:
            continue
        for index, recipe in settings.items():
            shown = ", ".join(f"{k}={json.loads(recipe[k]) if k in recipe else '-'}" for k in varying)
            labels[index] = f"{frame.at[index, 'model']} ({shown})"
    if not labels:
        return frame
    out = frame.copy()
    out.loc[list(labels), "model"] = pd.Series(labels)
    return out


def trained_length(rows: pd.DataFrame) -> float:
    """The training length the rows declare (their task's longest training sequence), NaN if none."""
    values = extra_field(rows, "trained_length").dropna()
    return float(values.max()) if len(values) else float("nan")


def headline_rows(frame: pd.DataFrame, task: str) -> pd.DataFrame:
    """The ok rows of the task's headline metric on its length curve, with `samples` and `hits` columns."""
    metric = headline(task)
    rows = frame[(frame["task"] == task) & (frame["metric"] == metric) & (frame["status"] == "ok")].copy()
    if rows.empty:
        return rows
    rows["samples"] = extra_field(rows, "samples").fillna(0)
    rows["hits"] = (rows["value"] * rows["samples"]).round()
    if "pairs" in rows and rows["pairs"].notna().any():  # mqar: the slice at the trained pair count
        top = extra_field(rows, "trained_pairs")
        rows = rows[rows["pairs"] == top]
    return rows


def per_seed(frame: pd.DataFrame, task: str) -> pd.DataFrame:
    """The headline per (variant, model, seed, n), pooled over the other grid axes: columns variant, model, seed,
    n, value, hits, samples. A task's variants (copy and selective copy, haystack kinds, datasets) are kept apart."""
    rows = headline_rows(frame, task)
    if rows.empty:
        return pd.DataFrame(columns=["variant", "model", "seed", "n", "value", "hits", "samples"])
    rows["variant"], rows["seed"] = rows["variant"].astype(object).fillna(task), rows["seed"].fillna(0)
    pooled = rows.groupby(["variant", "model", "seed", "n"]).agg(
        hits=("hits", "sum"), samples=("samples", "sum"), mean=("value", "mean")).reset_index()
    pooled["value"] = np.where(pooled["samples"] > 0, pooled["hits"] / pooled["samples"].clip(lower=1),
                               pooled["mean"])
    return pooled.drop(columns="mean")


def summary(frame: pd.DataFrame, task: str) -> pd.DataFrame:
    """Per (variant, model, n): mean over seeds, the spread (seed range, or the Wilson interval with one seed) as
    low and high, and the number of seeds."""
    seeds = per_seed(frame, task)
    out = []
    for (variant, model, n), g in seeds.groupby(["variant", "model", "n"]):
        if len(g) > 1:
            low, high = g["value"].min(), g["value"].max()
        elif g["samples"].iloc[0] > 0:
            low, high = wilson_interval(int(g["hits"].iloc[0]), int(g["samples"].iloc[0]))
        else:  # one seed of a metric with no sampling interval (an error over fixed windows): no spread known
            low = high = np.nan
        out.append({"variant": variant, "model": model, "n": n, "value": g["value"].mean(), "low": low, "high": high,
                    "seeds": len(g)})
    return pd.DataFrame(out, columns=["variant", "model", "n", "value", "low", "high", "seeds"])


def compare(a: pd.Series, b: pd.Series, higher: bool) -> str:
    """'win' / 'loss' for a against b where their spreads (low, high) separate, else 'tie' (also where a spread
    is unknown)."""
    if np.isnan([a["low"], a["high"], b["low"], b["high"]]).any():
        return "tie"
    if (a["low"] > b["high"]) if higher else (a["high"] < b["low"]):
        return "win"
    if (a["high"] < b["low"]) if higher else (a["low"] > b["high"]):
        return "loss"
    return "tie"


def cost_table(frame: pd.DataFrame, task: str) -> pd.DataFrame:
    """Per (variant, model): parameters, training tokens (tokens/s x wall time), wall time and the final
    validation accuracy, means over seeds; and every status its cells ended with."""
    rows = frame[(frame["task"] == task) & (frame["kind"] == "train")].copy()
    rows["variant"] = rows["variant"].astype(object).fillna(task)
    out = []
    for (variant, model), g in rows.groupby(["variant", "model"]):
        means = g.groupby("metric")["value"].mean()
        steps, rate, wall, val = (float(means.get(name, math.nan)) for name in
                                  (metrics.TRAIN_STEPS, metrics.TRAIN_TOKENS_PER_S, metrics.TRAIN_WALL_S,
                                   metrics.VAL_ACCURACY))
        params = g["params"].dropna()
        out.append({"variant": variant, "model": model, "params": int(params.iloc[0]) if len(params) else 0,
                    "seeds": g["seed"].nunique(), "steps": steps, "training tokens": rate * wall,
                    "wall s": wall, "val accuracy": val,
                    "statuses": ", ".join(sorted(set(g["status"].dropna())))})
    return pd.DataFrame(out)
