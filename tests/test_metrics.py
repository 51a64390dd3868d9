"""bench/metrics.py declares every metric the harness writes, and typed cells keep their stored shape."""

import json

import pytest

import tasks
from bench import metrics
from bench.cells import Cell, DynamicsRun, ProfileRun, StreamRun, TrainRun
from bench.measuring.train import TrainConfig
from bench.running import suite
from bench.running.runner import run_cells
from bench.running.store import RunStore, read_frame
from models.config import ConfigError

TINY = {
    "model_config": {"d_model": 16, "n_layers": 1, "n_heads": 2},
    "train": [
        {"task": "copy", "models": ["lmm"], "task_config": {"train_max_len": 4, "eval_lengths": [4],
                                                            "eval_samples": 4, "val_batches": 1}},
        {"task": "mqar", "models": ["lmm"], "task_config": {"vocab": 32, "pairs": [2, 2], "gap": [0, 2],
                                                            "eval_pairs": [2], "eval_lengths": [12],
                                                            "eval_samples": 4, "val_batches": 1}},
        {"task": "niah", "models": ["lmm"], "task_config": {"train_length": 64, "train_min_length": 64,
                                                            "eval_lengths": [64], "depths": [50.0],
                                                            "eval_samples": 2, "val_batches": 1}},
        {"task": "timeseries", "models": ["lmm"], "task_config": {"lookback": 16, "horizon": 8, "patch_len": 8,
                                                                  "patch_stride": 8, "linear_references": False}},
    ],
    "profile": [{"models": ["lmm"], "lengths": [16], "profile": {"repeats": 1, "warmup": 0}}],
    "stream": [{"models": ["lmm"], "checkpoints": [16, 32], "piece": 16}],
    "dynamics": [{"streams": ["stationary"], "rules": ["titans"], "n": 128, "window": 64, "train_steps": 1}],
}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """Every kind of cell and every registered task, once, at toy sizes, through the real runner."""
    data = {**TINY, "train": [{**e, "train_config": {"steps": 2, "batch_size": 2, "warmup": 1}} for e in TINY["train"]]}
    cells = suite.expand("tiny", data).cells
    store = RunStore(tmp_path_factory.mktemp("run"))
    run_cells(cells, store, "cpu", 1, progress=False)
    store.close()
    return cells, read_frame(store.dir)


def test_the_tiny_run_covers_every_cell_kind_and_task(tiny_run):
    cells, frame = tiny_run
    assert {c.kind for c in cells} == {"train", "profile", "stream", "dynamics"}
    assert set(frame["task"].dropna()) - {""} == set(tasks.names())
    assert (frame["status"] == "ok").all(), frame[frame["status"] != "ok"][["model", "task", "metric", "extra"]]


def test_every_metric_a_run_writes_is_declared(tiny_run):
    _, frame = tiny_run
    written = set(frame["metric"])
    assert not {m for m in written if not metrics.declared(m)}
    # the patterned families are recognised, not declared one by one
    assert {metrics.TEST_MSE, metrics.forecast_error("test", "mse", "repeat_last"), metrics.example("input"),
            metrics.TIME_TRAIN_S, metrics.MEMORY_FORWARD_BYTES, metrics.STREAM_STATE_BYTES} <= written


def test_patterned_names_are_built_and_recognised_the_same_way():
    assert metrics.parse_forecast_error(metrics.forecast_error("val", "mae", "dlinear")) == ("val", "mae", "dlinear")
    assert metrics.parse_forecast_error("test_rmse") is None
    assert metrics.profile_family(metrics.profiled("memory", "train")) == "memory"
    assert metrics.profile_family("time_forward_bytes") is None
    assert metrics.is_example(metrics.example("forecast", "dlinear")) and not metrics.is_example("example_output")
    assert metrics.lookup(metrics.TEST_MSE).higher_is_better is False
    assert metrics.lookup("test_mse_dlinear").role == "reference"
    with pytest.raises(KeyError, match="undeclared metric 'accuracy'"):
        metrics.lookup("accuracy")
    with pytest.raises(ValueError, match="no direction"):
        metrics.higher_is_better(metrics.TIME_FORWARD_S)


def test_every_task_declares_a_rankable_headline():
    for spec in tasks.TASKS.values():
        assert metrics.lookup(spec.headline).role == "quality"
        assert isinstance(spec.higher_is_better, bool)


def test_a_cell_reads_back_from_its_stored_form_with_the_same_id(tiny_run):
    cells, frame = tiny_run
    for cell in cells:
        again = Cell.from_dict(json.loads(json.dumps(cell.as_dict())))
        assert again == cell and again.id == cell.id
    stored = {json.loads(c)["kind"] for c in frame["config"]}
    assert stored == {"train", "profile", "stream", "dynamics"}


def test_typed_cells_keep_the_ids_they_had_as_dicts():
    """Ids computed before run configs were typed (from the dict shapes the suite built then): options a suite spelt
    out are kept as written, defaults and integers included, so a resume still finds the cells of an older run."""
    train = TrainRun({"steps": 400, "lr": 0.003})  # lr is the default, and stays in the stored options
    assert train.train == TrainConfig(steps=400) and train.as_dict() == {"steps": 400, "lr": 0.003}
    profile = ProfileRun(256, "time", ("forward",), {"repeats": 3, "time_budget_s": 120})
    assert profile.profile.time_budget_s == 120.0 and profile.as_dict()["profile"]["time_budget_s"] == 120
    assert Cell("lmm", train, task="copy").id == "bb829fff17509eb9"
    assert Cell("lmm", profile).id == "047b5a361afc4497"
    assert Cell("lmm", StreamRun((16, 64), 16, 60.0)).id == "2efb18a7b55b20ad"
    assert Cell("lmm", DynamicsRun("shift", "seed", 512, 64, train_steps=5), seed=1).id == "b3d4b24199ff2fdc"


@pytest.mark.parametrize("make, message", [
    (lambda: ProfileRun(0, "time"), "n=0"),
    (lambda: ProfileRun(64, "energy"), "metric='energy'"),
    (lambda: ProfileRun(64, "time", options={"repeatz": 2}), "repeatz"),
    (lambda: TrainRun({"steps": 0}), "steps=0"),
    (lambda: StreamRun((64, 16)), "must ascend"),
    (lambda: DynamicsRun("stationary", "titans", memory={"rule": "seed"}), "memory sets `rule`"),
    (lambda: DynamicsRun("stationary", "titans", memory={"chunkz": 4}), "chunkz"),
])
def test_run_configs_refuse_bad_values_by_name(make, message):
    with pytest.raises((ConfigError, ValueError), match=message):
        make()
