"""The accuracy analysis behind the report, the plots and claim C9: pooling, seed spreads, the win/loss/tie rule,
the mqar slice, and recipes kept apart in a sweep. Frames are built by hand: no training needed."""

import json

import numpy as np
import pandas as pd
import pytest

from bench.analysing import accuracy, claims
from bench.running.store import COLUMNS


def row(model, n, value, samples=100, seed=0, task="copy", metric="exact_match", **more):
    extra = {"samples": samples, **more.pop("extra", {})}
    base = {c: np.nan for c in COLUMNS}
    base.update(kind="train", model=model, task=task, n=n, metric=metric, value=value, status="ok", seed=seed,
                extra=json.dumps(extra), config=json.dumps({"model_config": {}, "task_config": {}, "run_config": {}}))
    base.update(more)
    return base


def frame(rows):
    return pd.DataFrame(rows, columns=COLUMNS)


def spread(value, low, high):
    return pd.Series({"value": value, "low": low, "high": high})


@pytest.mark.parametrize("higher", [True, False])
def test_compare_calls_a_difference_only_where_the_spreads_separate(higher):
    good, bad = (spread(0.9, 0.85, 0.95), spread(0.5, 0.4, 0.6)) if higher else \
        (spread(0.1, 0.05, 0.15), spread(0.5, 0.4, 0.6))
    assert accuracy.compare(good, bad, higher) == "win"
    assert accuracy.compare(bad, good, higher) == "loss"
    assert accuracy.compare(good, spread(0.8, 0.7, 0.9) if higher else spread(0.2, 0.1, 0.3), higher) == "tie"
    assert accuracy.compare(good, spread(0.5, np.nan, np.nan), higher) == "tie"  # unknown spread decides nothing


def test_summary_uses_the_seed_range_with_seeds_and_the_wilson_interval_with_one():
    rows = [row("lmm", 16, v, seed=s) for s, v in enumerate((0.7, 0.9, 0.8))] + [row("transformer", 16, 0.5)]
    s = accuracy.summary(frame(rows), "copy").set_index("model")
    assert s.loc["lmm", "value"] == pytest.approx(0.8) and (s.loc["lmm", "low"], s.loc["lmm", "high"]) == (0.7, 0.9)
    low, high = s.loc["transformer", ["low", "high"]]
    assert low < 0.5 < high and high - low < 0.25 and s.loc["transformer", "seeds"] == 1


def test_per_seed_pools_depths_by_their_samples():
    rows = [row("lmm", 256, 1.0, samples=10, task="niah", depth=0.0),
            row("lmm", 256, 0.0, samples=30, task="niah", depth=50.0)]
    pooled = accuracy.per_seed(frame(rows), "niah")
    assert len(pooled) == 1 and pooled["value"].iloc[0] == pytest.approx(0.25)


def test_the_mqar_length_curve_is_the_slice_at_the_trained_pair_count():
    rows = [row("lmm", 98, v, task="mqar", metric="query_accuracy", pairs=p, extra={"trained_pairs": 8})
            for p, v in ((4, 1.0), (8, 0.6), (16, 0.1))]
    pooled = accuracy.per_seed(frame(rows), "mqar")
    assert pooled["value"].tolist() == [pytest.approx(0.6)]


def c9_frame(lmm_values, transformer_values):
    return frame([row("lmm", 64, v, seed=s) for s, v in enumerate(lmm_values)]
                 + [row("transformer", 64, v, seed=s) for s, v in enumerate(transformer_values)])


@pytest.mark.parametrize(("lmm", "transformer", "verdict"), [
    ((0.9, 0.95), (0.5, 0.6), "supported"),
    ((0.5, 0.6), (0.9, 0.95), "contradicted"),
    ((0.5, 0.9), (0.6, 0.8), "inconclusive"),
])
def test_c9_reaches_each_verdict_from_per_model_seed_ranges(lmm, transformer, verdict):
    judged = claims.c9(c9_frame(lmm, transformer))
    assert judged.verdict == verdict and "lmm" in judged.evidence


def test_c9_is_not_measured_without_a_transformer_beside_a_titans_model():
    assert claims.c9(frame([row("lmm", 64, 0.9)])).verdict == claims.NOT_MEASURED


def with_recipe(r, **model_config):
    r["config"] = json.dumps({"model_config": model_config, "task_config": {}, "run_config": {"steps": 10}})
    return r


def test_a_sweep_keeps_each_recipe_apart_and_a_plain_suite_is_untouched():
    sweep = frame([with_recipe(row("lmm", 16, 0.9, seed=0), **{"memory.max_lr": 0.5, "memory.clip": 1.0}),
                   with_recipe(row("lmm", 16, 0.2, seed=0), **{"memory.max_lr": 0.5, "memory.clip": 0.0}),
                   with_recipe(row("transformer", 16, 0.8, seed=0))])
    labelled = accuracy.label_recipes(sweep)
    assert sorted(labelled["model"]) == ["lmm (memory.clip=0.0)", "lmm (memory.clip=1.0)", "transformer"]
    assert len(accuracy.summary(labelled, "copy")) == 3  # not pooled as two seeds of one lmm
    plain = frame([with_recipe(row("lmm", 16, v, seed=s), **{"memory.max_lr": 0.5}) for s, v in enumerate((0.8, 0.9))])
    assert accuracy.label_recipes(plain)["model"].tolist() == ["lmm", "lmm"]
