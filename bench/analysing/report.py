"""report.md from a run folder's results.csv (and env.json when present): setup, model sizes, task tables,
the scaling table, crossovers, streaming, the claims ledger, and the plots. Rebuildable at any time:
`python -m bench report RUN_DIR` (or `make report RUN=...`).

Nothing here names a model or a task: models come from the registry (family, declared complexity; the
crossover baseline is the attention family's first registered model, as in `models.first`), tasks from the task
registry (an accuracy table per task whose headline is better higher), metrics from bench/metrics.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

import models
from bench import metrics
from bench.analysing import accuracy, claims, evidence, forecast, plots
from bench.analysing.scaling import best_class, crossover
from bench.running.store import read_frame


def table(frame: pd.DataFrame, floatfmt: str = "{:.3g}") -> str:
    def fmt(v):
        if isinstance(v, float | np.floating):
            if np.isnan(v):
                return ""
            return f"{int(v):,}" if float(v).is_integer() and abs(v) >= 1000 else floatfmt.format(v)
        return str(v)

    head = "| " + " | ".join(str(c) for c in frame.columns) + " |"
    rule = "|" + "---|" * len(frame.columns)
    body = ["| " + " | ".join(fmt(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([head, rule, *body])


def setup_section(run_dir: Path, frame: pd.DataFrame) -> str:
    try:  # env.json: the first invocation's fields at the top, every invocation (resumes too) in `invocations`
        env = json.loads((run_dir / "env.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):  # absent or unreadable: the rows still report
        env = {}
    keys = ["suite", "torch", "python", "cpu", "threads", "device", "gpu", "memory_kernel", "git_commit", "command"]
    lines = [f"- **{k}**: {env[k]}" for k in keys if env.get(k) is not None]
    history = env.get("invocations") if isinstance(env.get("invocations"), list) else []
    if len(history) > 1:
        changed = [f"{k} {' / '.join(dict.fromkeys(str(inv.get(k)) for inv in history))}" for k in keys[1:-1]
                   if len({json.dumps(inv.get(k), default=str) for inv in history}) > 1]
        lines.append(f"- **invocations**: {len(history)} (the run was resumed; fields above are the first one's)"
                     + (f"; differing: {'; '.join(changed)}" if changed else ""))
    status = frame.groupby("status").size().to_dict()
    lines.append(f"- **rows**: {len(frame)} in {frame['cell_id'].nunique()} cells; status counts {status}")
    return "## Setup\n\n" + "\n".join(lines)


def models_section(frame: pd.DataFrame) -> str:
    rows = []
    for name in sorted(frame["model"].dropna().unique()):
        if name not in models.MODELS:
            continue
        m = models.build(name, **evidence.model_config(frame, name))
        seen = frame[(frame["model"] == name)].dropna(subset=["params"])
        params = int(seen["params"].iloc[0]) if len(seen) else m.num_params()
        rows.append({"model": name, "family": models.spec(name).family, "params": f"{params:,}",
                     "state @1K": f"{m.state_numel(1024):,}",
                     "state @1M": f"{m.state_numel(1 << 20):,}", "declared time": m.complexity.time,
                     "declared memory": m.complexity.memory, "streams": "yes" if m.streams else "no"})
    if not rows:
        return ""
    return ("## Models\n\nParameter counts (as this run's rows recorded them), families, and recurrent state sizes "
            "in numbers per sequence (a KV cache grows with n; Titans memory does not).\n\n"
            + table(pd.DataFrame(rows)))


def accuracy_section(frame: pd.DataFrame, task: str) -> str:
    """Per variant of an accuracy task: what each model cost to train, then its headline by length (mean over
    seeds, with the seed range, or the Wilson interval with one seed, in brackets)."""
    metric = accuracy.headline(task)
    summary, costs = accuracy.summary(frame, task), accuracy.cost_table(frame, task)
    if costs.empty:
        return ""
    parts = []
    for variant, cost in costs.groupby("variant"):
        rows = summary[summary["variant"] == variant]
        text = f"### {variant}\n\n" + table(cost.drop(columns="variant"))
        if not rows.empty:
            cells = rows.assign(cell=[f"{v:.2f} [{lo:.2f}, {hi:.2f}]" for v, lo, hi in
                                      zip(rows["value"], rows["low"], rows["high"], strict=True)])
            wide = cells.pivot(index="model", columns="n", values="cell")
            wide.columns = [f"n={int(c)}" for c in wide.columns]
            trained = accuracy.trained_length(frame[(frame["task"] == task) & (frame["variant"] == variant)])
            note = f" Trained up to n = {int(trained)}." if not np.isnan(trained) else ""
            text += (f"\n\n{metric.replace('_', ' ')} by length n.{note}\n\n" + table(wide.reset_index()))
        parts.append(text)
    return (f"## {task}\n\nTraining cost per model (means over seeds; tokens = measured tokens/s x wall time) and "
            f"the final validation accuracy on the training distribution, then the test headline by length: mean "
            f"over seeds [seed range, or the 95 % Wilson interval with one seed].\n\n" + "\n\n".join(parts))


def forecasting_section(frame: pd.DataFrame) -> str:
    """Our forecasters (models, then references in brackets) per dataset and look-back, MSE / MAE by horizon and
    the four-horizon average, then the published rows with their sources."""
    s = forecast.scores(frame)
    if s.empty:
        return ""
    parts = ["## Forecasting\n\nTest split, every window, MSE / MAE in normalised space (train statistics). "
             "References in brackets, computed on the same windows in the same run: repeat-last, seasonal-naive "
             "(period 24), DLinear and RLinear fitted by their published recipe (docs/forecasting.md). `avg` is the "
             "mean over horizons 96, 192, 336 and 720, as the papers report it."]
    for lookback in sorted(s["lookback"].unique()):
        parts.append(f"### Look-back {lookback}\n\n" + table(forecast.by_horizon(frame, lookback)))
    printed = forecast.published(set(s["dataset"]))
    if not printed.empty:
        parts.append("### Published rows (not measured here)\n\n" + table(printed))
    return "\n\n".join(parts)


def scaling_section(frame: pd.DataFrame) -> str:
    rows = []
    for metric in plots.SCALING_METRICS:
        for model in frame[(frame["metric"] == metric) & (frame["status"] == "ok")]["model"].unique():
            s = evidence.series(frame, model, metric)
            f = evidence.fitted(s)
            if f is None:
                continue
            ns = np.array(sorted(s.samples))
            rows.append({"metric": metric, "model": model, "exponent": f"{f.exponent:.2f}",
                         "95% CI (analytic)": f"[{f.ci_low:.2f}, {f.ci_high:.2f}]",
                         "95% CI (bootstrap)": f"[{f.interval[0]:.2f}, {f.interval[1]:.2f}]", "R²": f"{f.r2:.3f}",
                         "fit range": f"{f.n_min}..{f.n_max} ({f.points} lengths)",
                         "best class": best_class(ns, np.array([np.median(s.samples[n]) for n in ns]))[0]})
    if not rows:
        return ""
    return ("## Scaling\n\nLog-log least squares over the upper half of the measured lengths (medians of the "
            "repeats), with the analytic interval and the bootstrap one the claims use (resampling the repeats, or "
            "the points where a length has one measurement: bench/analysing/scaling.py); best class among 1, log n, n, "
            "n log n, n² by relative error over all lengths. FLOPs count attention as the full n×n product (the "
            "counter ignores causal masking, for both backends).\n\n" + table(pd.DataFrame(rows))
            + "\n\n" + crossover_section(frame))


def crossover_section(frame: pd.DataFrame) -> str:
    rows = []
    baseline = models.first("attention")
    for metric in (metrics.TIME_FORWARD_S, metrics.TIME_TRAIN_S, metrics.MEMORY_TRAIN_BYTES):
        ok = frame[(frame["metric"] == metric) & (frame["status"] == "ok")]
        base = ok[ok["model"] == baseline].groupby("n")["value"].median()
        for model in claims.titans(frame):
            t = ok[ok["model"] == model].groupby("n")["value"].median()
            common = base.index.intersection(t.index)
            if len(common) < 2:
                continue
            cross = crossover(common.to_numpy(), t[common].to_numpy(), base[common].to_numpy())
            top = common.max()
            rows.append({"metric": metric, "model": model, "vs": baseline,
                         "crossover n": f"{cross:,.0f}" if cross else f"none up to {int(top):,}",
                         "baseline / model at the largest n": f"{base[top] / t[top]:.2f} (n={int(top):,})"})
    if not rows:
        return ""
    return (f"Crossover: the length from which the Titans model is cheaper than {baseline}, the first attention "
            "model of the registry.\n\n") + \
        table(pd.DataFrame(rows).fillna(""))


STREAM_COLUMNS = {metrics.STREAM_TIME_S: "time s", metrics.STREAM_TOKENS_PER_S: "tokens/s",
                  metrics.STREAM_STATE_BYTES: "state MiB", metrics.STREAM_HEAP_USED_BYTES: "heap used MiB",
                  metrics.STREAM_HEAP_FREE_BYTES: "heap free MiB", metrics.STREAM_RSS_BYTES: "RSS MiB",
                  metrics.STREAM_PEAK_BYTES: "peak MiB"}


def streaming_section(frame: pd.DataFrame) -> str:
    rows = frame[frame["kind"] == "stream"]
    if rows.empty:
        return ""
    wide = rows.pivot_table(index=["model", "n"], columns="metric", values="value", aggfunc="mean").reset_index()
    for metric in (m for m in STREAM_COLUMNS if metrics.lookup(m).unit == "bytes" and m in wide):
        wide[metric] = wide[metric] / 2**20
    cols = ["model", "n", *(m for m in STREAM_COLUMNS if m in wide)]
    stopped = rows[rows["status"] != "ok"]
    note = "".join(f"\n\n{m} stopped before n={int(n):,}: {s}" for m, n, s in
                   zip(stopped["model"], stopped["n"], stopped["status"], strict=True))
    return ("## Streaming\n\nBatch 1, inference mode, pieces with the state carried. At each checkpoint: the bytes "
            "the state's tensors own, the allocator's bytes in use and held free, the resident set, and the peak "
            "so far, all above the process baseline after the model was built (bench/measuring/memprobe.py). A peak "
            "that grows while the state stays flat is the allocator or the libraries, not the memory.\n\n"
            + table(wide[cols].rename(columns=STREAM_COLUMNS)) + note)


def claims_section(frame: pd.DataFrame) -> str:
    verdicts = claims.ledger(frame)
    rows = pd.DataFrame([{"id": v.id, "claim": v.claim, "verdict": f"**{v.verdict}**", "evidence": v.evidence,
                          "cells": len(v.cells)} for v in verdicts])
    cells = "\n".join(f"- {v.id} ({v.claim}): {', '.join(v.cells)}" for v in verdicts if v.cells)
    return ("## Claims ledger\n\nEach verdict is computed from this run's rows by the rule stated in its evidence "
            "(bench/analysing/claims.py); the cells behind each are listed below the table.\n\n" + table(rows)
            + ("\n\nCells read per claim:\n\n" + cells if cells else ""))


def build(run_dir: str | Path) -> Path:
    run_dir = Path(run_dir)
    # The store's repairing read (torn or duplicated rows never reach the report); a sweep's recipes kept apart.
    frame = accuracy.label_recipes(read_frame(run_dir))
    pictures = plots.all_plots(frame, run_dir / "plots")
    sections = [f"# titans-bench report — {run_dir.name}", setup_section(run_dir, frame), models_section(frame),
                *(accuracy_section(frame, t) for t in accuracy.accuracy_tasks(frame)),
                forecasting_section(frame), scaling_section(frame), streaming_section(frame), claims_section(frame)]
    if pictures:
        sections.append("## Plots\n\n" + "\n\n".join(f"![{p.stem}](plots/{p.name})" for p in pictures))
    out = run_dir / "report.md"
    tmp = run_dir / ".report.md.tmp"
    tmp.write_text("\n\n".join(s for s in sections if s) + "\n")
    tmp.replace(out)
    return out
