"""The Ray executor against a real local Ray: same deterministic rows as the local executor, a worker
killed mid-cell is retried without a lost or doubled row, and an interrupted driver resumes."""

import os
import signal
import threading
import time
from pathlib import Path

import pandas as pd
import pytest

from bench.running import suite
from bench.running.runner import run_cells
from bench.running.store import RunStore

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.slow

SUITE = {
    "train": [{"task": "copy", "models": ["swa", "lmm"], "seeds": [0],
               "task_config": {"train_max_len": 4, "eval_lengths": [4, 8], "eval_samples": 20},
               "train_config": {"steps": 20, "batch_size": 8, "warmup": 5}}],
    "profile": [{"models": ["transformer", "mag"], "lengths": [128, 256], "metrics": ["flops"], "modes": ["forward"]}],
}
DETERMINISTIC = ["cell_id", "model", "task", "n", "metric", "value", "status"]


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(Path(__file__).resolve().parents[1])}})
    yield
    ray.shutdown()


def deterministic(path):
    frame = pd.read_csv(path)
    frame = frame[~frame["metric"].isin(["train_tokens_per_s", "train_wall_s"])]
    return frame[DETERMINISTIC].sort_values(["cell_id", "metric", "n"]).reset_index(drop=True)


def test_ray_rows_equal_local_rows_on_deterministic_columns(local_ray, tmp_path):
    cells = suite.expand("t", SUITE).cells
    local, remote = RunStore(tmp_path / "local"), RunStore(tmp_path / "ray")
    assert run_cells(cells, local, "cpu", 1, progress=False) == len(cells)
    assert run_cells(cells, remote, "cpu", 1, progress=False, executor="ray") == len(cells)
    pd.testing.assert_frame_equal(deterministic(local.path), deterministic(remote.path))


def kill_first_busy_worker(found: list, stop: threading.Event):
    """Kill (SIGKILL) the first Ray worker seen running a cell, once."""
    while not stop.is_set():
        for proc in Path("/proc").iterdir():
            if proc.name.isdigit():
                try:
                    title = (proc / "cmdline").read_bytes()
                except OSError:
                    continue
                if b"run_cell_remote" in title:
                    os.kill(int(proc.name), signal.SIGKILL)
                    found.append(int(proc.name))
                    return
        time.sleep(0.05)


def test_a_worker_killed_mid_cell_is_retried_without_lost_or_doubled_rows(local_ray, tmp_path):
    data = {"profile": [{"models": ["lmm"], "lengths": [4096], "metrics": ["time"], "modes": ["train"],
                         "profile": {"repeats": 3}}]}
    cells = suite.expand("t", data).cells
    store = RunStore(tmp_path / "run")
    killed, stop = [], threading.Event()
    killer = threading.Thread(target=kill_first_busy_worker, args=(killed, stop), daemon=True)
    killer.start()
    run_cells(cells, store, "cpu", 1, progress=False, executor="ray")
    stop.set()
    frame = store.frame()
    assert killed, "the test must have killed a worker"
    assert len(frame) == 2 and (frame["status"] == "ok").all()  # time and tokens/s, once
    assert frame["cell_id"].nunique() == 1


def test_an_interrupted_driver_resumes_from_the_store(local_ray, tmp_path):
    cells = suite.expand("t", SUITE).cells
    with RunStore(tmp_path / "run") as store:
        run_cells(cells[:2], store, "cpu", 1, progress=False, executor="ray")  # as if stopped after two cells
        first = store.frame()
    with RunStore(tmp_path / "run") as store:
        assert run_cells(cells, store, "cpu", 1, progress=False, executor="ray") == len(cells) - 2
        final = store.frame()
    assert final["cell_id"].nunique() == len(cells)
    assert len(final) == len(final.drop_duplicates(["cell_id", "metric", "n", "depth"]))
    assert set(first["cell_id"]) <= set(final["cell_id"])
