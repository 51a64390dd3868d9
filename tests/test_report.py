"""The report and compare commands, from rows alone (a synthetic run: no training needed)."""

import pandas as pd

from bench import compare, report
from bench.store import RunStore


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
