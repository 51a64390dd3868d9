import argparse
import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from bench.cli import main, parse_assignments, parse_lengths, resume_command
from bench.running import suite


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "bench", *args], capture_output=True, text=True, timeout=300)


def test_help_at_every_level():
    for args in ([], ["list"], ["train"], ["run"]):
        out = run_cli(*args, "--help")
        assert out.returncode == 0 and "usage" in out.stdout


def test_list_shows_models_with_params_state_and_complexity():
    out = run_cli("list")
    assert out.returncode == 0
    assert "transformer" in out.stdout and "98,368" in out.stdout and "quick" in out.stdout


@pytest.mark.parametrize("args,needle", [
    (["train", "--model", "gpt", "--task", "copy"], "choose from 'transformer'"),
    (["train", "--model", "swa", "--task", "sort"], "choose from 'copy'"),
    (["run", "--suite", "nope"], "valid suites: "),
    (["train", "--model", "swa", "--task", "copy", "--model-arg", "width=3"], "valid: "),
    (["train", "--model", "lmm", "--task", "copy", "--model-arg", "memory.kernl=torch"],
     "unknown model 'lmm' option(s) ['memory.kernl']; valid: memory.block, memory.chunk,"),
    (["train", "--model", "swa", "--task", "copy", "--task-arg", "variant=reverse"], "valid: copy, selective"),
    (["frobnicate"], "invalid choice"),
    (["run", "--device", "tpu"], "choose from 'auto', 'cpu', 'cuda'"),
])
def test_bad_arguments_exit_2_naming_valid_choices(args, needle):
    out = run_cli(*args)
    assert out.returncode == 2, out.stderr
    assert needle in out.stderr


def test_assignments_parse_toml_values():
    assert parse_assignments(["a=3", "b=[1, 2]", "c=naive", 'd="x"', "e=true"], "--x") == {
        "a": 3, "b": [1, 2], "c": "naive", "d": "x", "e": True}


def test_train_command_writes_a_tidy_csv_and_env(tmp_path):
    code = main(["train", "--model", "swa", "--task", "copy", "--steps", "5", "--batch-size", "4",
                 "--task-arg", "eval_lengths=[4]", "--task-arg", "eval_samples=10", "--threads", "1",
                 "--run-dir", str(tmp_path / "r")])
    assert code == 0
    frame = pd.read_csv(tmp_path / "r" / "results.csv")
    assert {"train_loss", "exact_match", "token_accuracy"} <= set(frame["metric"])
    env = json.loads((tmp_path / "r" / "env.json").read_text())
    assert env["threads"] == 1 and env["memory_kernel"].startswith(("compiled (", "torch loops"))
    assert frame["threads"].eq(1).all() and frame["params"].gt(0).all()


def test_a_nested_model_arg_reaches_the_memory_config_end_to_end(tmp_path):
    code = main(["train", "--model", "lmm", "--task", "copy", "--steps", "2", "--batch-size", "2",
                 "--task-arg", "eval_lengths=[4]", "--task-arg", "eval_samples=4", "--threads", "1",
                 "--model-arg", "memory.kernel=torch", "--model-arg", "memory.chunk=8",
                 "--run-dir", str(tmp_path / "r")])
    assert code == 0
    frame = pd.read_csv(tmp_path / "r" / "results.csv")
    configs = {json.dumps(json.loads(c)["model_config"], sort_keys=True) for c in frame["config"]}
    assert configs == {'{"memory.chunk": 8, "memory.kernel": "torch"}'}


def test_suite_rerun_skips_finished_cells(tmp_path):
    path = tmp_path / "tiny.toml"
    path.write_text("""
description = "tiny"
[[train]]
task = "copy"
models = ["swa", "transformer"]
task_config = { eval_lengths = [3], eval_samples = 5, train_max_len = 3 }
train_config = { steps = 3, batch_size = 2, warmup = 1 }
""")
    run_dir = tmp_path / "run"
    assert main(["run", "--suite", str(path), "--resume", str(run_dir)]) == 2  # nothing to resume yet
    run_dir.mkdir()
    (run_dir / "results.csv").write_text("")
    assert main(["run", "--suite", str(path), "--resume", str(run_dir), "--threads", "1"]) == 0
    first = pd.read_csv(run_dir / "results.csv")
    assert main(["run", "--suite", str(path), "--resume", str(run_dir), "--threads", "1"]) == 0
    second = pd.read_csv(run_dir / "results.csv")
    assert len(first) == len(second) and first["cell_id"].nunique() == 2


def test_every_shipped_suite_parses():
    for name in suite.available():
        assert suite.load(name).cells


def test_bad_suite_entry_says_what_is_wrong(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('[[train]]\ntask = "copy"\nmodels = ["nosuch"]\n')
    with pytest.raises(suite.SuiteError, match="valid models"):
        suite.load(str(path))


def test_resume_command_continues_in_the_run_folder():
    argv = ["run", "--suite", "my suite.toml", "--resume=old", "--threads", "2"]
    assert resume_command(argv, "--resume", Path("results/x")) == (
        "python -m bench run --suite 'my suite.toml' --threads 2 --resume results/x")
    assert resume_command(["train", "--model", "lmm", "--run-dir", "a"], "--run-dir", Path("b")).endswith(
        "--model lmm --run-dir b")


def test_lengths_double_from_low_and_must_land_on_high():
    assert parse_lengths("256:1024") == [256, 512, 1024] and parse_lengths("7:7") == [7]
    assert parse_lengths("1000,2000,3000") == [1000, 2000, 3000]
    for bad in ("1000:3000", "0:4", "8:4", "a:b", "3,0", ""):
        with pytest.raises(argparse.ArgumentTypeError, match="invalid lengths"):
            parse_lengths(bad)


def test_train_summary_puts_forecasters_side_by_side_and_leaves_the_examples_out(capsys):
    from bench.cli import print_rows
    common = {"model": "lmm", "task": "timeseries", "n": 96, "status": "ok", "seed": 0,
              "extra": json.dumps({"dataset": "etth1", "horizon": 96})}
    rows = [{**common, "metric": "train_steps", "value": 700.0}]
    rows += [{**common, "metric": f"{split}_{m}{ref}", "value": v}
             for ref, v in [("", 0.39), ("_dlinear", 0.396), ("_seasonal_naive", 0.512)]
             for split in ("val", "test") for m in ("mse", "mae")]
    rows += [{**common, "n": t, "metric": "example_forecast", "value": 0.1} for t in range(96)]
    print_rows(pd.DataFrame(rows))
    out = capsys.readouterr().out
    assert "train_steps" in out and "example" not in out and len(out.splitlines()) < 10
    assert any(line.split()[:4] == ["lmm", "0.3900", "0.3900", "0.3900"] for line in out.splitlines())
    assert any(line.split()[:1] == ["dlinear"] for line in out.splitlines())
