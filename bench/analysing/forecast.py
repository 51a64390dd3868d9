"""Forecasting results from rows: each forecaster's error per setting (the models under test and the task's
references, read from the same cells), horizon averages as the papers report them, and the published rows with
their sources. Used by the report, the plots and `bench train`'s summary.

A forecasting cell writes `<split>_<mse|mae>` for its model and `<split>_<mse|mae>_<reference>` for each reference
on the same windows (bench.metrics.forecast_error), with its dataset and horizon; the rows are found by those
metric names, whatever task wrote them. The references of one data setting are the same in every cell (fitted
once, seeded), so they are averaged, which leaves them unchanged."""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from bench.analysing.accuracy import extra_field
from bench.metrics import TEST_MAE, TEST_MSE, forecast_error, parse_forecast_error

HORIZONS = (96, 192, 336, 720)  # the papers' average is over these four
SETTING = ["dataset", "lookback", "horizon"]


@dataclass(frozen=True)
class Published:
    forecaster: str
    dataset: str
    horizon: int | None  # None: the average over HORIZONS
    mse: float
    mae: float
    source: str


TIMESNET = "TimesNet (Wu et al., ICLR 2023), input-96 baseline table"
ITRANSFORMER = "iTransformer protocol, look-back 96, as reprinted in the S-Mamba paper's tables"
TITANS = "Titans (Behrouz et al. 2025) Table 3: neural memory in the Simba framework, Simba's look-back"
PUBLISHED = [
    *(Published("DLinear", "etth1", h, mse, mae, TIMESNET) for h, mse, mae in
      ((96, 0.386, 0.400), (192, 0.437, 0.432), (336, 0.481, 0.459), (720, 0.519, 0.516))),
    *(Published("TimesNet", "etth1", h, mse, mae, TIMESNET) for h, mse, mae in
      ((96, 0.384, 0.402), (192, 0.436, 0.429), (336, 0.491, 0.469), (720, 0.521, 0.500))),
    Published("iTransformer", "etth1", 96, 0.386, 0.405, ITRANSFORMER),
    Published("iTransformer", "etth1", None, 0.454, 0.447, ITRANSFORMER),
    Published("iTransformer", "etth2", 96, 0.297, 0.349, ITRANSFORMER),
    Published("iTransformer", "etth2", None, 0.383, 0.407, ITRANSFORMER),
    Published("PatchTST", "etth1", 96, 0.414, 0.419, ITRANSFORMER),
    Published("PatchTST", "etth1", None, 0.469, 0.454, ITRANSFORMER),
    Published("PatchTST", "etth2", None, 0.387, 0.407, ITRANSFORMER),
    Published("DLinear", "etth1", None, 0.456, 0.452, ITRANSFORMER),
    Published("DLinear", "etth2", None, 0.559, 0.515, ITRANSFORMER),
    Published("RLinear", "etth1", None, 0.446, 0.434, ITRANSFORMER),
    Published("RLinear", "etth2", None, 0.374, 0.398, ITRANSFORMER),
    Published("Titans neural memory", "etth1", None, 0.420, 0.421, TITANS),
    Published("Titans neural memory", "etth2", None, 0.336, 0.382, TITANS),
]


def errors(frame: pd.DataFrame) -> pd.DataFrame:
    """Long table of ok forecasting rows: dataset, lookback, horizon, forecaster, kind ("model" or "reference"),
    split, measure (mse / mae), value (mean over seeds and cells), seeds."""
    if "metric" not in frame:
        return pd.DataFrame()
    rows = frame[frame["status"] == "ok"]
    names = rows["metric"].map(lambda m: parse_forecast_error(m) if isinstance(m, str) else None).dropna()
    if names.empty:
        return pd.DataFrame()
    parsed = pd.DataFrame(names.tolist(), index=names.index, columns=[0, 1, 2])
    rows = rows.loc[parsed.index]
    known = extra_field(rows, "horizon").notna()  # rows written before horizons were recorded are left out
    rows, parsed = rows[known], parsed[known]
    if rows.empty:
        return pd.DataFrame()
    reference = parsed[2].notna()
    out = pd.DataFrame({
        "dataset": extra_field(rows, "dataset"), "lookback": rows["n"].astype(int),
        "horizon": extra_field(rows, "horizon").astype(int),
        "forecaster": parsed[2].where(reference, rows["model"]),
        "kind": reference.map({True: "reference", False: "model"}),
        "split": parsed[0], "measure": parsed[1], "value": rows["value"], "seed": rows["seed"]})
    keys = [*SETTING, "forecaster", "kind", "split", "measure"]
    return out.groupby(keys, as_index=False).agg(value=("value", "mean"), seeds=("seed", "nunique"))


def scores(frame: pd.DataFrame, split: str = "test") -> pd.DataFrame:
    """One row per setting and forecaster: mse and mae of a split (models first, then references)."""
    long = errors(frame)
    if long.empty:
        return long
    wide = long[long["split"] == split].pivot_table(index=[*SETTING, "kind", "forecaster"], columns="measure",
                                                    values="value").reset_index()
    return wide.sort_values([*SETTING, "kind", "forecaster"], ignore_index=True)


def by_horizon(frame: pd.DataFrame, lookback: int) -> pd.DataFrame:
    """Per dataset and forecaster at one look-back, "MSE / MAE" per horizon and, where all four horizons were
    run, their average (the papers' `avg` column)."""
    s = scores(frame)
    if s.empty:
        return s
    s = s[s["lookback"] == lookback]
    out = []
    for (dataset, kind, name), g in s.groupby(["dataset", "kind", "forecaster"], sort=True):
        row = {"dataset": dataset, "forecaster": name if kind == "model" else f"({name})"}
        row.update({f"h{int(h)}": f"{m:.3f} / {a:.3f}" for h, m, a in zip(g["horizon"], g["mse"], g["mae"],
                                                                            strict=True)})
        full = g[g["horizon"].isin(HORIZONS)]
        if len(full) == len(HORIZONS):
            row["avg"] = f"{full['mse'].mean():.3f} / {full['mae'].mean():.3f}"
        out.append(row)
    horizons = sorted(int(h) for h in s["horizon"].unique())
    columns = ["dataset", "forecaster", *(f"h{h}" for h in horizons), "avg"]
    return pd.DataFrame(out).reindex(columns=columns).astype(object).fillna("")


def published(datasets: set[str]) -> pd.DataFrame:
    """The published rows for these datasets, one per forecaster and source, horizons as columns."""
    out: dict[tuple[str, str, str], dict[str, str]] = {}
    for p in PUBLISHED:
        if p.dataset in datasets:
            row = out.setdefault((p.dataset, p.forecaster, p.source),
                                 {"dataset": p.dataset, "forecaster": p.forecaster})
            row["avg" if p.horizon is None else f"h{p.horizon}"] = f"{p.mse:.3f} / {p.mae:.3f}"
            row["source"] = p.source
    columns = ["dataset", "forecaster", *(f"h{h}" for h in HORIZONS), "avg", "source"]
    return pd.DataFrame(list(out.values())).reindex(columns=columns).astype(object).fillna("–")


def cell_summary(rows: pd.DataFrame) -> pd.DataFrame:
    """One cell's forecasters side by side (validation MSE, test MSE and MAE), the model first; empty for a cell
    that is not a forecasting one."""
    long = errors(rows)
    if long.empty:
        return long
    long = long.assign(column=long["split"] + "_" + long["measure"])
    wide = long.pivot_table(index=["kind", "forecaster"], columns="column", values="value").reset_index()
    keep = [c for c in (forecast_error("val", "mse"), TEST_MSE, TEST_MAE) if c in wide]
    return wide[["forecaster", *keep]]
