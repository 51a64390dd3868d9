import json
from pathlib import Path

import pandas as pd
import pytest
import torch

import models
import tasks
from bench.analysing import accuracy
from tasks import forecasters
from tasks.forecasters import LinearRecipe
from tasks.timeseries import TEST_END, TRAIN_END, VAL_END, TimeseriesTask

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def test_protocol_keeps_every_test_window_and_starts_lookback_early():
    task = tasks.build("timeseries", lookback=96, horizon=192)
    test = task.windows("test")
    assert len(test) == (TEST_END - VAL_END) - 192 + 1  # every target row of the test months is forecast
    assert test[0] + 96 == VAL_END and test[-1] + 96 + 192 == TEST_END
    assert task.windows("train")[-1] + 96 + 192 == TRAIN_END


def test_standardisation_is_fitted_on_train_rows_only():
    d = tasks.build("timeseries").data
    torch.testing.assert_close(d[:TRAIN_END].mean(0), torch.zeros(d.shape[1]), atol=1e-4, rtol=0)
    torch.testing.assert_close(d[:TRAIN_END].std(0), torch.ones(d.shape[1]), atol=1e-4, rtol=0)
    assert d[TRAIN_END:].mean(0).abs().max() > 1e-3  # the trend moves later splits: not refitted there


def test_reference_forecasts_are_exact_on_their_own_kind_of_series():
    t = torch.arange(200.0)
    seasonal = torch.sin(2 * torch.pi * t / 24)[None, :, None]
    refs = TimeseriesTask.references(seasonal[:, :96], 48)
    torch.testing.assert_close(refs["seasonal_naive"], seasonal[:, 96:144], atol=1e-5, rtol=0)
    constant = torch.full((1, 96, 3), 2.5)
    torch.testing.assert_close(TimeseriesTask.references(constant, 10)["repeat_last"], torch.full((1, 10, 3), 2.5))


def test_training_then_evaluation_reports_model_and_references(monkeypatch):
    """Every forecaster is scored on the same windows: the model, the two learned linear references (one quick
    epoch here) and the two naive ones; each forecaster's example forecast is kept for the plot."""
    from bench.measuring.train import TrainConfig, train
    quick = LinearRecipe(lr=1e-3, batch_size=256, epochs=1)
    for name, (cls, _) in list(forecasters.REFERENCES.items()):
        monkeypatch.setitem(forecasters.REFERENCES, name, (cls, quick))
    task = tasks.build("timeseries", lookback=48, horizon=24)
    net = task.build_network(models.build("lmm"), 64)
    result = train(net, task, TrainConfig(steps=30, batch_size=16, warmup=5), progress=False)
    assert result.status == "ok" and result.losses[-1] < result.losses[0]
    rows = task.evaluate(net, "cpu")
    metrics = {r["metric"]: r["value"] for r in rows}
    for name in ("", "_seasonal_naive", "_repeat_last", "_dlinear", "_rlinear"):
        assert {f"test_mse{name}", f"test_mae{name}", f"val_mse{name}", f"example_forecast{name}"} <= set(metrics)
    assert metrics["test_mse_seasonal_naive"] < metrics["test_mse_repeat_last"]  # the synthetic set is seasonal
    assert metrics["test_mse_dlinear"] < metrics["test_mse_repeat_last"]  # one epoch already learns the season
    assert next(r for r in rows if r["metric"] == "test_mse_dlinear")["fit"]["epochs"] == 1


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED / "ETTh1.csv").exists(), reason="needs ../shared/data/ETTh1.csv")
def test_dlinear_reproduces_its_published_etth1_row():
    """The protocol check: DLinear fitted by its published recipe on our windows lands within 3 % of its published
    ETTh1 look-back-96 horizon-96 row, 0.386 / 0.400 (TimesNet's baseline table). A wrong split, scaler or
    window count moves it further."""
    task = tasks.build("timeseries", dataset="etth1", data_dir=str(SHARED), lookback=96, horizon=96)
    dlinear, _ = task.fitted_references()["dlinear"]
    sums, windows = task.split_errors({"dlinear": dlinear}, "test")
    mse, mae = (float(v) / (windows * 96 * 7) for v in sums["dlinear"])
    assert abs(mse / 0.386 - 1) < 0.03 and abs(mae / 0.400 - 1) < 0.03, (mse, mae)


@pytest.mark.skipif(not (SHARED / "ETTh1.csv").exists(), reason="needs ../shared/data/ETTh1.csv")
def test_etth1_loads_verified_from_a_data_folder():
    task = tasks.build("timeseries", dataset="etth1", data_dir=str(SHARED))
    assert task.data.shape == (TEST_END, 7)


def test_unknown_dataset_names_the_valid_ones():
    with pytest.raises(ValueError, match="synthetic, etth1, etth2"):
        tasks.build("timeseries", dataset="weather")


def test_one_model_at_two_lookbacks_is_two_settings_not_two_recipes():
    short, long = (tasks.build("timeseries", lookback=lb, horizon=24) for lb in (48, 96))
    assert short.variant != long.variant and short.variant.startswith("synthetic-l48")
    rows = pd.DataFrame([{"kind": "train", "task": "timeseries", "model": "lmm", "variant": task.variant,
                          "config": json.dumps({"task_config": {"lookback": lb, "horizon": 24}})}
                         for task, lb in ((short, 48), (long, 96))])
    assert list(accuracy.label_recipes(rows)["model"]) == ["lmm", "lmm"]
