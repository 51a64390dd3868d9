"""The report's pictures, drawn from a run's rows alone (matplotlib, PNG)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from bench.scaling import fit_power  # noqa: E402

SCALING_METRICS = {
    "time_forward_s": "forward time (s)",
    "time_train_s": "forward + backward time (s)",
    "memory_forward_bytes": "forward peak memory (bytes)",
    "memory_train_bytes": "training-step peak memory (bytes)",
    "flops_forward": "forward FLOPs",
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


def niah_heatmap(frame: pd.DataFrame, model: str, out: Path) -> Path | None:
    rows = frame[(frame["task"] == "niah") & (frame["model"] == model) & (frame["metric"] == "exact_match")]
    if rows.empty:
        return None
    grid = rows.pivot_table(index="depth", columns="n", values="value", aggfunc="mean").sort_index(ascending=False)
    fig, ax = plt.subplots(figsize=(1.2 * grid.shape[1] + 2.5, 0.55 * grid.shape[0] + 1.8))
    im = ax.imshow(grid.values, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(grid.shape[1]), [f"{int(n)}" for n in grid.columns])
    ax.set_yticks(range(grid.shape[0]), [f"{d:g}%" for d in grid.index])
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            ax.text(j, i, f"{grid.values[i, j]:.2f}", ha="center", va="center", fontsize=8)
    trained = rows["extra"].dropna().map(lambda e: pd.read_json(pd.io.common.StringIO(e), typ="series")
                                         .get("trained_length")).dropna()
    note = f" (trained at {int(trained.iloc[0])})" if len(trained) else ""
    ax.set(xlabel="context length", ylabel="needle depth", title=f"NIAH exact match — {model}{note}")
    fig.colorbar(im, ax=ax, fraction=0.05)
    return _save(fig, out / f"niah_heatmap_{model}.png")


def accuracy_vs_length(frame: pd.DataFrame, task: str, out: Path) -> Path | None:
    rows = frame[(frame["task"] == task) & (frame["metric"] == "exact_match") & (frame["status"] == "ok")]
    if rows.empty:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for model, group in rows.groupby("model"):
        g = group.groupby("n").agg(value=("value", "mean"), lo=("ci_low", "mean"), hi=("ci_high", "mean"))
        yerr = [(g["value"] - g["lo"]).clip(lower=0), (g["hi"] - g["value"]).clip(lower=0)]
        ax.errorbar(g.index, g["value"], yerr=yerr, marker="o", capsize=3, label=model)
    ax.set(xscale="log", ylim=(-0.03, 1.03), xlabel="length n" + (" (copied tokens)" if task == "copy" else ""),
           ylabel="exact match (95 % Wilson CI)", title=f"{task}: accuracy vs length")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, out / f"accuracy_vs_length_{task}.png")


def forecasts(frame: pd.DataFrame, out: Path) -> Path | None:
    rows = frame[frame["metric"].isin(["example_input", "example_target", "example_forecast"])]
    if rows.empty:
        return None
    models_ = sorted(rows["model"].unique())
    fig, axes = plt.subplots(len(models_), 1, figsize=(8, 2.2 * len(models_)), sharex=True, squeeze=False)
    for ax, model in zip(axes[:, 0], models_, strict=True):
        m = rows[rows["model"] == model]
        for metric, style in (("example_input", "k-"), ("example_target", "g-"), ("example_forecast", "r--")):
            s = m[m["metric"] == metric].groupby("n")["value"].mean()
            ax.plot(s.index, s.values, style, lw=1, label=metric.removeprefix("example_"))
        ax.axvline(0, color="grey", lw=0.5)
        ax.set_ylabel(model)
        ax.legend(fontsize=7, loc="upper left")
    axes[-1, 0].set_xlabel("hours from the forecast origin (last channel, normalised)")
    fig.suptitle("forecast examples (one test window)")
    return _save(fig, out / "forecast_examples.png")


def dynamics(frame: pd.DataFrame, out: Path) -> Path | None:
    rows = frame[frame["kind"] == "dynamics"]
    if rows.empty:
        return None
    metrics = ["surprise_norm", "memory_norm", "inner_loss"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, metric in zip(axes, metrics, strict=True):
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
        for ax, metric in zip(axes, ("stream_peak_bytes", "stream_time_s"), strict=True):
            s = group[group["metric"] == metric].groupby("n")["value"].mean()
            ax.plot(s.index, s.values / (2**20 if metric.endswith("bytes") else 1), "o-", label=model)
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
    made += [niah_heatmap(frame, m, out) for m in sorted(frame[frame["task"] == "niah"]["model"].dropna().unique())]
    made += [accuracy_vs_length(frame, t, out) for t in ("copy", "niah")]
    made += [forecasts(frame, out), dynamics(frame, out), streaming(frame, out)]
    return [p for p in made if p is not None]
