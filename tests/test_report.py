"""The report and compare commands, from rows alone (a synthetic run: no training needed)."""

import pandas as pd

from bench.analysing import compare, report
from bench.running.store import RunStore


def synthetic_run(path, slowdown=1.0):
    store = RunStore(path)
    ns = [256, 512, 1024, 2048]
    for model, f in [("transformer", lambda n: 1e-8 * n * n), ("lmm", lambda n: 1e-5 * n * slowdown)]:
        rows = [{"kind": "profile", "model": model, "n": n, "metric": "time_forward_s", "value": f(n), "status": "ok",
                 "params": 1000} for n in ns]
        store.append(f"p-{model}", rows)
        acc = [{"kind": "train", "model": model, "task": "copy", "n": n, "metric": "exact_match",
                "value": 0.9 if model == "transformer" else 0.5 * slowdown, "ci_low": 0.4, "ci_high": 0.95,
                "status": "ok"} for n in (8, 16)]
        store.append(f"t-{model}", acc)
    return store


def test_report_has_tables_claims_and_plots_from_the_csv_alone(tmp_path):
    store = synthetic_run(tmp_path / "run")
    text = report.build(store.dir).read_text()
    for heading in ("## Setup", "## Models", "## copy", "## Scaling", "## Claims ledger", "## Plots"):
        assert heading in text
    assert "| C1 |" in text and "**supported**" in text
    pngs = list((store.dir / "plots").glob("*.png"))
    assert {"scaling_time_forward_s.png", "recall_vs_length_copy_copy.png"} <= {p.name for p in pngs}
    assert all(p.stat().st_size > 5000 for p in pngs)


def test_compare_reports_cost_ratios_and_accuracy_moves(tmp_path):
    a = pd.read_csv(synthetic_run(tmp_path / "a").path)
    b = pd.read_csv(synthetic_run(tmp_path / "b", slowdown=1.6).path)
    text = compare.compare(a, b)
    assert "costs (B / A): 8 compared, 4 moved" in text and "x1.60" in text
    assert "0.500 -> 0.800" in text  # lmm exact match moved
    assert "scaling exponents: 2 compared, 0 moved" in text


def forecast_run(path):
    """Forecasting rows as timeseries cells write them: each model's test errors and the references' on the same
    windows, on ETTh1 at the four horizons (look-back 96) and at look-back 336 (horizon 96)."""
    store = RunStore(path)
    settings = [(96, h) for h in (96, 192, 336, 720)] + [(336, 96)]
    for model, base in [("transformer", 0.40), ("lmm", 0.42)]:
        for lookback, horizon in settings:
            common = {"kind": "train", "model": model, "task": "timeseries", "n": lookback, "status": "ok", "seed": 0,
                      "dataset": "etth1", "horizon": horizon, "variant": f"etth1-h{horizon}"}
            scale = horizon / 96 * (0.9 if lookback == 336 else 1.0)
            rows = [{**common, "metric": f"test_{m}{suffix}", "value": v * scale}
                    for suffix, v in [("", base), ("_dlinear", 0.386)] for m in ("mse", "mae")]
            store.append(f"{model}-{lookback}-{horizon}", rows)
    return store


def test_report_shows_forecasters_by_horizon_with_averages_beside_published_rows(tmp_path):
    store = forecast_run(tmp_path / "run")
    text = report.build(store.dir).read_text()
    section = text[text.index("## Forecasting"):]
    transformer = next(line for line in section.splitlines() if "| transformer |" in line)
    assert "0.400 / 0.400" in transformer and f"{0.4 * 1344 / 384:.3f}" in transformer  # h96 and the average
    assert "(dlinear)" in section and "### Look-back 336" in section
    assert "| DLinear | 0.386 / 0.400 |" in section and "TimesNet (Wu et al., ICLR 2023)" in section
    assert (store.dir / "plots" / "forecast_mse_vs_lookback_etth1.png").stat().st_size > 5000
