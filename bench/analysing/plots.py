"""The report's pictures, drawn from a run's rows alone (matplotlib, PNG). Which pictures a run gets follows from
its rows and the registries, never from model or task names: an accuracy-by-length plot per task whose headline
is better higher, a heatmap per model for each grid axis a task declares (`TaskSpec.grid`), learning curves per
task, and the metric-driven ones (scaling, key-to-query distance, forecast examples, dynamics, streaming)."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

import tasks  # noqa: E402
from bench import metrics  # noqa: E402
from bench.analysing import accuracy, forecast
from bench.analysing.scaling import fit_power  # noqa: E402

OFF_SCALE = 1.5  # forecast look-back plot: references above this many times the worst model are named, not drawn
SCALING_METRICS = {
    metrics.TIME_FORWARD_S: "forward time (s)",
    metrics.TIME_TRAIN_S: "forward + backward time (s)",
    metrics.MEMORY_FORWARD_BYTES: "forward peak memory (bytes)",
    metrics.MEMORY_TRAIN_BYTES: "training-step peak memory (bytes)",
    metrics.FLOPS_FORWARD: "forward FLOPs",
}


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def scaling(frame: pd.DataFrame, metric: str, out: Path) -> Path | None:
    rows = frame[frame["metric"] == metric]
    ok = rows[rows["status"] == "ok"]
    if ok["n"].nunique() < 2:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.6))
    for model, group in ok.groupby("model"):
        s = group.groupby("n")["value"].median().sort_index()
        f = fit_power(s.index.to_numpy(), s.to_numpy())
        label = f"{model} (slope {f.exponent:.2f})" if f else model
        (line,) = ax.plot(s.index, s.values, "o-", label=label)
        failed = rows[(rows["model"] == model) & rows["status"].isin(["oom", "timeout"])]
        for n, status in zip(failed["n"], failed["status"], strict=True):
            ax.plot([n], [s.values[-1]], "x", color=line.get_color(), markersize=10)
            ax.annotate(status, (n, s.values[-1]), fontsize=7, color=line.get_color())
    n = np.array(sorted(ok["n"].unique()), float)
    y0 = ok[ok["n"] == n[0]]["value"].median()
    ax.plot(n, y0 * n / n[0], "k--", lw=0.8, alpha=0.6, label="∝ n (guide)")
    ax.plot(n, y0 * (n / n[0]) ** 2, "k:", lw=0.8, alpha=0.6, label="∝ n² (guide)")
    ax.set(xscale="log", yscale="log", xlabel="sequence length n", ylabel=SCALING_METRICS.get(metric, metric),
           title=f"{SCALING_METRICS.get(metric, metric)} vs n")
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(fontsize=7, loc="upper left")
    return _save(fig, out / f"scaling_{metric}.png")


def _accuracy_grid(grid: pd.DataFrame, row_labels: list[str]) -> tuple[plt.Figure, plt.Axes]:
    """A [rows x lengths] accuracy table as a red-to-green heatmap with its values written in (empty cells left
    blank) and a colour bar; the caller names the axes."""
    fig, ax = plt.subplots(figsize=(1.2 * grid.shape[1] + 2.5, 0.55 * grid.shape[0] + 1.8))
    im = ax.imshow(grid.values, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(grid.shape[1]), [f"{int(n)}" for n in grid.columns])
    ax.set_yticks(range(grid.shape[0]), row_labels)
    for (i, j), value in np.ndenumerate(grid.values):
        if not np.isnan(value):
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=8)
    fig.colorbar(im, ax=ax, fraction=0.05)
    return fig, ax


def _finish_log_x(ax: plt.Axes, values: pd.Series) -> None:
    """A log x axis labelled at the measured values only (no minor labels crowding them), a light grid, a legend."""
    ticks = sorted(values.unique())
    ax.set_xticks(ticks, [f"{int(v)}" for v in ticks])
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)


def grid_heatmap(frame: pd.DataFrame, task: str, axis: str, model: str, out: Path) -> Path | None:
    """A task's headline over one of its declared grid axes (NIAH's needle depth, MQAR's pair count) x length,
    for one model, mean over seeds."""
    spec = tasks.spec(task)
    rows = frame[(frame["task"] == task) & (frame["model"] == model) & (frame["metric"] == spec.headline)
                 & (frame["status"] == "ok")]
    if rows.empty or axis not in rows or rows[axis].isna().all():
        return None
    grid = rows.pivot_table(index=axis, columns="n", values="value", aggfunc="mean").sort_index(ascending=False)
    fig, ax = _accuracy_grid(grid, [f"{v:g}" for v in grid.index])
    seeds = rows["seed"].nunique()
    trained = accuracy.trained_length(rows)
    note = f", trained up to n={int(trained)}" if not np.isnan(trained) else ""
    ax.set(xlabel=spec.length_label, ylabel=axis,
           title=f"{task} {spec.headline.replace('_', ' ')} — {model} ({seeds} seed{'s' if seeds > 1 else ''}{note})")
    return _save(fig, out / f"{task}_grid_{axis}_{model}.png")


def recall_vs_length(frame: pd.DataFrame, task: str, out: Path) -> list[Path]:
    """Per variant of an accuracy task: the headline against length, a line per model (mean over seeds), the seed
    range shaded (the Wilson interval with one seed), the training length marked."""
    spec = tasks.spec(task)
    metric = spec.headline
    summary = accuracy.summary(frame, task)
    made = []
    for variant, rows in summary.groupby("variant"):
        fig, ax = plt.subplots(figsize=(7.2, 4.4))
        for model, g in rows.groupby("model"):
            g = g.sort_values("n")
            seeds = int(g["seeds"].max())
            (line,) = ax.plot(g["n"], g["value"], "o-", label=f"{model} ({seeds} seed{'s' if seeds > 1 else ''})")
            ax.fill_between(g["n"], g["low"], g["high"], color=line.get_color(), alpha=0.18, lw=0)
        trained = accuracy.trained_length(frame[(frame["task"] == task) & (frame["variant"] == variant)])
        if not np.isnan(trained):
            ax.axvline(trained, color="grey", ls="--", lw=1)
            ax.annotate("trained up to here", (trained, 0.02), fontsize=7, color="grey", rotation=90, ha="right")
        ax.set(xscale="log", ylim=(-0.03, 1.03), xlabel=spec.length_label,
               ylabel=f"{metric.replace('_', ' ')} (mean over seeds; band: seed range)",
               title=f"{variant}: {metric.replace('_', ' ')} vs length")
        _finish_log_x(ax, rows["n"])
        made.append(_save(fig, out / f"recall_vs_length_{task}_{variant.replace('/', '-')}.png"))
    return made


def recall_by_distance(frame: pd.DataFrame, out: Path) -> Path | None:
    """Query accuracy against the distance from a key to its query (power-of-two bins), pooled over the grid and
    the seeds, a line per model."""
    rows = frame[(frame["metric"] == metrics.QUERY_ACCURACY_BY_DISTANCE) & (frame["status"] == "ok")].copy()
    if rows.empty:
        return None
    rows["samples"] = accuracy.extra_field(rows, "samples").fillna(0)
    rows["hits"] = rows["value"] * rows["samples"]
    fig, ax = plt.subplots(figsize=(7.2, 4.4))
    for model, g in rows.groupby("model"):
        pooled = g.groupby("distance")[["hits", "samples"]].sum()
        ax.plot(pooled.index, pooled["hits"] / pooled["samples"], "o-", label=model)
    ax.set(xscale="log", ylim=(-0.03, 1.03), xlabel="distance from key to query (tokens, bin lower edge)",
           ylabel="query accuracy",
           title=f"{', '.join(sorted(rows['task'].unique()))}: recall by key-to-query distance (whole grid, all seeds)")
    ax.set_xscale("log", base=2)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, out / "recall_by_distance.png")


def learning_curves(frame: pd.DataFrame, task: str, out: Path) -> list[Path]:
    """Per variant of a task: training loss against step, a thin line per cell (seed), a colour per model;
    validation accuracy where it was measured, in a second panel."""
    rows = frame[(frame["task"] == task) & (frame["metric"] == metrics.LEARNING_CURVE)].copy()
    if rows.empty:
        return []
    rows["variant"] = rows["variant"].astype(object).fillna(task)
    made = []
    for variant, group in rows.groupby("variant"):
        curves = [(model, status, json.loads(extra)["curve"]) for model, status, extra in
                  zip(group["model"], group["status"], group["extra"], strict=True) if isinstance(extra, str)]
        has_val = any(metrics.VAL_ACCURACY in c for _, _, c in curves)
        fig, axes = plt.subplots(1, 2 if has_val else 1, figsize=(12 if has_val else 7, 4.2), squeeze=False)
        colours = {m: f"C{i}" for i, m in enumerate(sorted({m for m, _, _ in curves}))}
        for model, status, c in curves:
            label = model
            loss = c[metrics.TRAIN_LOSS]
            axes[0, 0].plot(c["step"], loss, color=colours[model], lw=0.9, label=label)
            if status != "ok":
                axes[0, 0].plot(c["step"][-1:], loss[-1:], "x", color=colours[model], markersize=9)
            if has_val and metrics.VAL_ACCURACY in c:
                axes[0, 1].plot(c["val_step"], c[metrics.VAL_ACCURACY], "o-", color=colours[model], ms=3, lw=0.9,
                                label=label)
        axes[0, 0].set(yscale="log", xlabel="step", ylabel="training loss", title=f"{variant}: learning curves")
        if has_val:
            axes[0, 1].set(xlabel="step", ylabel="validation accuracy", ylim=(-0.03, 1.03),
                           title="validation (training distribution, held-out stream)")
        for ax in axes[0]:
            ax.grid(True, alpha=0.3)
            handles, labels = ax.get_legend_handles_labels()
            unique = dict(zip(labels, handles, strict=True))
            ax.legend(unique.values(), unique.keys(), fontsize=7)
        made.append(_save(fig, out / f"learning_curves_{task}_{variant.replace('/', '-')}.png"))
    return made


def forecasts(frame: pd.DataFrame, out: Path) -> Path | None:
    """One test window per model at the run's first forecasting setting (dataset, then the shortest horizon and
    look-back): the look-back, the target, the model's forecast and DLinear's on the same window."""
    rows = frame[frame["metric"].map(lambda m: isinstance(m, str) and metrics.is_example(m))]
    if rows.empty:
        return None
    rows = rows.assign(dataset=accuracy.extra_field(rows, "dataset"), horizon=accuracy.extra_field(rows, "horizon"),
                       lookback=accuracy.extra_field(rows, "lookback"))
    first = rows.sort_values(["dataset", "horizon", "lookback"]).iloc[0]
    rows = rows[(rows["dataset"] == first["dataset"]) & (rows["horizon"] == first["horizon"])
                & (rows["lookback"] == first["lookback"])]
    models_ = sorted(rows["model"].unique())
    fig, axes = plt.subplots(len(models_), 1, figsize=(8, 2.2 * len(models_)), sharex=True, squeeze=False)
    styles = ((metrics.example("input"), "k-"), (metrics.example("target"), "g-"),
              (metrics.example("forecast"), "r--"), (metrics.example("forecast", "dlinear"), "b:"))
    for ax, model in zip(axes[:, 0], models_, strict=True):
        m = rows[rows["model"] == model]
        for metric, style in styles:
            s = m[m["metric"] == metric].groupby("n")["value"].mean()
            if not s.empty:
                label = metric.removeprefix("example_").replace("forecast_", "")
                ax.plot(s.index, s.values, style, lw=1, label=label)
        ax.axvline(0, color="grey", lw=0.5)
        ax.set_ylabel(model)
        ax.legend(fontsize=7, loc="upper left")
    axes[-1, 0].set_xlabel("hours from the forecast origin (last channel, normalised)")
    fig.suptitle(f"forecast examples: {first['dataset']}, look-back {first['lookback']:.0f}, "
                 f"horizon {first['horizon']:.0f} (one test window)")
    return _save(fig, out / "forecast_examples.png")


def forecast_lookback(frame: pd.DataFrame, out: Path) -> list[Path]:
    """Test MSE against look-back, one line per forecaster (references dashed), one figure per dataset with a
    panel per horizon; only where some forecaster ran at two look-backs or more. A reference above `OFF_SCALE`
    times the worst model (repeat-last: 3x the models on ETTh1) is named in the title instead of drawn, so the
    models' differences stay readable."""
    scores = forecast.scores(frame)
    if scores.empty:
        return []
    made = []
    for dataset, d in scores.groupby("dataset"):
        horizons = [h for h, g in d.groupby("horizon") if g["lookback"].nunique() > 1]
        if not horizons:
            continue
        fig, axes = plt.subplots(1, len(horizons), figsize=(5.5 * len(horizons), 4.2), squeeze=False)
        for ax, horizon in zip(axes[0], horizons, strict=True):
            h = d[d["horizon"] == horizon]
            ceiling = OFF_SCALE * h.loc[h["kind"] == "model", "mse"].max()
            off = []
            for (kind, name), g in h.groupby(["kind", "forecaster"]):
                g = g.sort_values("lookback")
                if kind != "model" and g["mse"].min() > ceiling:
                    off.append(f"{name} {g['mse'].min():.2f}")
                    continue
                ax.plot(g["lookback"], g["mse"], "o-" if kind == "model" else "s--", ms=4, lw=1.1,
                        label=name if kind == "model" else f"({name})")
            title = f"{dataset}, horizon {horizon}" + (f"\noff scale: {', '.join(off)}" if off else "")
            ax.set(xscale="log", xlabel="look-back (steps)", ylabel="test MSE", title=title)
            _finish_log_x(ax, h["lookback"])
        made.append(_save(fig, out / f"forecast_mse_vs_lookback_{dataset}.png"))
    return made


def dynamics(frame: pd.DataFrame, out: Path) -> Path | None:
    rows = frame[frame["kind"] == "dynamics"]
    if rows.empty:
        return None
    shown = [metrics.SURPRISE_NORM, metrics.MEMORY_NORM, metrics.INNER_LOSS]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, metric in zip(axes, shown, strict=True):
        for variant, group in rows[rows["metric"] == metric].groupby("variant"):
            s = group.groupby("n")["value"].mean()
            ax.plot(s.index, s.values, label=variant, lw=1.2)
        ax.set(yscale="log", xlabel="token t", title=metric.replace("_", " "))
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("memory dynamics (one untrained memory layer; 'shift' changes the distribution half-way)")
    return _save(fig, out / "surprise_dynamics.png")


def streaming(frame: pd.DataFrame, out: Path) -> Path | None:
    rows = frame[(frame["kind"] == "stream") & (frame["status"] == "ok")]
    if rows.empty:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for model, group in rows.groupby("model"):
        for ax, metric in zip(axes, (metrics.STREAM_PEAK_BYTES, metrics.STREAM_TIME_S), strict=True):
            s = group[group["metric"] == metric].groupby("n")["value"].mean()
            ax.plot(s.index, s.values / (2**20 if metrics.lookup(metric).unit == "bytes" else 1), "o-", label=model)
    axes[0].set(xscale="log", xlabel="tokens streamed", ylabel="peak memory above baseline (MiB)",
                title="streaming: peak memory")
    axes[1].set(xscale="log", yscale="log", xlabel="tokens streamed", ylabel="elapsed (s)", title="streaming: time")
    for ax in axes:
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, out / "streaming.png")


def all_plots(frame: pd.DataFrame, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    made = [scaling(frame, m, out) for m in SCALING_METRICS]
    for task in accuracy.accuracy_tasks(frame):
        models_ = sorted(frame[frame["task"] == task]["model"].dropna().unique())
        made += [grid_heatmap(frame, task, axis, m, out) for axis in tasks.spec(task).grid for m in models_]
        made += recall_vs_length(frame, task, out)
    for task in sorted(frame["task"].dropna().unique()):
        made += learning_curves(frame, task, out)
    made.append(recall_by_distance(frame, out))
    made += [forecasts(frame, out), dynamics(frame, out), streaming(frame, out)] + forecast_lookback(frame, out)
    return [p for p in made if p is not None]
