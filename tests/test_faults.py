"""Fault injection: each way a sweep was seen to lose, duplicate or misreport results (issue 18), done for real
through the command line: two writers, torn rows in both shapes, a zero-byte file, duplicate cells, bad values
of every type, Ctrl-C, out-of-memory, an unreachable Ray cluster, a resume with another suite. Each case checks
the exit status and that no finished row is lost or stored twice.

The cases are functions returning an Outcome (exit status, rows in results.csv before and after), so that
`python -m tests.test_faults` prints them as a table."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
import torch

from bench.cli import main
from bench.running.store import read_frame

ROOT = Path(__file__).resolve().parents[1]
TINY = """
description = "three tiny training cells"
[[train]]
task = "copy"
models = ["swa"]
seeds = {seeds}
task_config = {{ eval_lengths = [3], eval_samples = 5, train_max_len = 3 }}
train_config = {{ steps = {steps}, batch_size = 2, warmup = 1 }}
"""
# 4 training rows, validation loss and accuracy, the learning curve, then exact match and token accuracy at one length
ROWS_PER_CELL = 9


@dataclass
class Outcome:
    code: int
    before: int  # data lines in results.csv before the command (torn and duplicated ones included)
    after: int
    out: str = ""
    err: str = ""


def data_lines(run_dir: Path) -> int:
    path = run_dir / "results.csv"
    if not path.is_file():
        return 0
    return max(0, len([line for line in path.read_bytes().split(b"\n") if line.strip()]) - 1)


def invoke(*argv: str) -> tuple[int, str, str]:
    """`python -m bench ARGV` in this process: (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            light = argv[0] in ("train", "run", "profile") and "--threads" not in argv
            code = main([*argv, "--threads", "1"] if light else list(argv))
        except SystemExit as exit_:  # argparse
            code = exit_.code
    return code, out.getvalue(), err.getvalue()


def outcome(run_dir: Path, *argv: str) -> Outcome:
    before = data_lines(run_dir)
    code, out, err = invoke(*argv)
    return Outcome(code, before, data_lines(run_dir), out, err)


def suite_file(tmp: Path, seeds=(0, 1, 2), steps=3, name="tiny") -> Path:
    path = tmp / f"{name}.toml"
    path.write_text(TINY.format(seeds=list(seeds), steps=steps))
    return path


def finished_run(tmp: Path) -> tuple[Path, Path]:
    """A complete run of the tiny suite: (suite file, run folder)."""
    suite, run = suite_file(tmp), tmp / "run"
    run.mkdir()
    (run / "results.csv").write_text("")
    assert invoke("run", "--suite", str(suite), "--resume", str(run))[0] == 0
    return suite, run


def assert_whole(run: Path, cells: int) -> pd.DataFrame:
    """Every cell once, with all its rows, and the file on disk is exactly what readers see."""
    frame = read_frame(run)
    assert frame["cell_id"].nunique() == cells and len(frame) == cells * ROWS_PER_CELL
    assert frame.groupby("cell_id").size().eq(frame.groupby("cell_id")["cell_rows"].first()).all()
    assert data_lines(run) == len(frame)
    return frame


# -- data loss ------------------------------------------------------------------------------------------------


def case_two_writers(tmp: Path) -> Outcome:
    suite, run = finished_run(tmp)
    holder = subprocess.Popen([sys.executable, "-c", "import sys; from bench.running.store import RunStore; "
                               f"s = RunStore({str(run)!r}); print('locked', flush=True); sys.stdin.read()"],
                              cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        result = outcome(run, "run", "--suite", str(suite), "--resume", str(run))
        assert f"pid {holder.pid} on " in result.err and "two writers" in result.err
    finally:
        holder.communicate("", timeout=60)
    assert invoke("run", "--suite", str(suite), "--resume", str(run))[0] == 0  # once the holder is gone
    return result


def test_a_second_writer_is_refused_naming_the_holder(tmp_path):
    result = case_two_writers(tmp_path)
    assert result.code == 2 and result.before == result.after == 3 * ROWS_PER_CELL
    assert_whole(tmp_path / "run", 3)


def torn(tmp: Path, newline: bool) -> Outcome:
    """The last row cut mid-line, as a kill mid-write leaves it (or followed by a newline): readers still work
    and a resume re-runs only the cut cell."""
    suite, run = finished_run(tmp)
    raw = (run / "results.csv").read_bytes()
    last = raw.rstrip(b"\n").rsplit(b"\n", 1)[1]
    (run / "results.csv").write_bytes(raw[: len(raw) - len(last) // 2 - 2] + (b"\n" if newline else b""))
    for argv in (["claims", str(run)], ["compare", str(run), str(run)]):
        code, _, err = invoke(*argv)
        assert code == 0, err
    result = outcome(run, "run", "--suite", str(suite), "--resume", str(run))
    assert "1 cell(s) run, 2 already done" in result.out and "repaired on open: torn line(s) 1" in result.err
    return result


def case_torn_tail(tmp: Path) -> Outcome:
    return torn(tmp, newline=False)


def case_half_row_with_newline(tmp: Path) -> Outcome:
    return torn(tmp, newline=True)


@pytest.mark.parametrize("case", [case_torn_tail, case_half_row_with_newline])
def test_a_torn_file_is_read_and_resumed_without_losing_a_finished_row(tmp_path, case):
    result = case(tmp_path)
    assert result.code == 0 and result.after == 3 * ROWS_PER_CELL
    assert_whole(tmp_path / "run", 3)


def case_zero_byte_file(tmp: Path) -> Outcome:
    suite, run = suite_file(tmp), tmp / "run"
    run.mkdir()
    (run / "results.csv").write_bytes(b"")
    for argv in (["report", str(run)], ["claims", str(run)]):
        code, _, err = invoke(*argv)
        assert code == 2 and "no finished rows" in err
    return outcome(run, "run", "--suite", str(suite), "--resume", str(run))


def test_a_zero_byte_results_file_is_an_empty_run(tmp_path):
    result = case_zero_byte_file(tmp_path)
    assert result.code == 0 and (result.before, result.after) == (0, 3 * ROWS_PER_CELL)
    assert_whole(tmp_path / "run", 3)


def case_duplicate_cells_in_suite(tmp: Path) -> Outcome:
    suite, run = suite_file(tmp, seeds=(0, 0, 1)), tmp / "run"
    run.mkdir()
    (run / "results.csv").write_text("")
    result = outcome(run, "run", "--suite", str(suite), "--resume", str(run))
    assert "lists 1 cell(s) more than once" in result.err and "2 cell(s) run" in result.out
    again = outcome(run, "run", "--suite", str(suite), "--resume", str(run))
    assert again.code == 0 and "0 cell(s) run, 2 already done" in again.out and again.after == result.after
    return result


def test_a_cell_listed_twice_runs_and_is_stored_once(tmp_path):
    result = case_duplicate_cells_in_suite(tmp_path)
    assert result.code == 0 and result.after == 2 * ROWS_PER_CELL
    assert_whole(tmp_path / "run", 2)


def case_every_row_written_twice(tmp: Path) -> Outcome:
    """What two unlocked writers left before this fix: every cell twice. Nothing is re-run or dropped."""
    suite, run = finished_run(tmp)
    raw = (run / "results.csv").read_bytes()
    (run / "results.csv").write_bytes(raw + raw.split(b"\n", 1)[1])
    result = outcome(run, "run", "--suite", str(suite), "--resume", str(run))
    assert "0 cell(s) run, 3 already done" in result.out and "duplicate cell copy(ies) 3" in result.err
    return result


def test_cells_stored_twice_keep_their_first_copy_and_are_not_rerun(tmp_path):
    result = case_every_row_written_twice(tmp_path)
    assert result.code == 0 and (result.before, result.after) == (6 * ROWS_PER_CELL, 3 * ROWS_PER_CELL)
    assert assert_whole(tmp_path / "run", 3)["time"].nunique() == 3  # one append per cell
    assert (tmp_path / "run" / "results.dropped").read_bytes().count(b"\n") == 3 * ROWS_PER_CELL + 1


def case_resume_with_another_suite(tmp: Path) -> Outcome:
    suite, run = finished_run(tmp)
    other = suite_file(tmp, seeds=(5,), name="other")
    result = outcome(run, "run", "--suite", str(other), "--resume", str(run))
    assert "was run with suite 'tiny' (3 cells)" in result.err and "--allow-suite-change" in result.err
    return result


def test_a_resume_with_another_suite_is_refused_unless_asked_for(tmp_path):
    result = case_resume_with_another_suite(tmp_path)
    assert result.code == 2 and result.before == result.after == 3 * ROWS_PER_CELL
    run, other = tmp_path / "run", tmp_path / "other.toml"
    assert invoke("run", "--suite", str(other), "--resume", str(run), "--allow-suite-change")[0] == 0
    assert_whole(run, 4)
    assert invoke("run", "--suite", str(tmp_path / "tiny.toml"), "--resume", str(run))[0] == 2
    env = json.loads((run / "env.json").read_text())
    assert [i["suite"] for i in env["invocations"]] == ["tiny", "other"]  # every invocation kept, in order


# -- bad input ------------------------------------------------------------------------------------------------

TRAIN = ["train", "--model", "swa", "--task", "copy"]
SUITE_VALUES = {  # a bad value of every type a suite file can hold: suite key -> (entry, the error names)
    "steps string": ('[[train]]\ntask = "copy"\nmodels = ["swa"]\ntrain_config = { steps = "many" }', "steps='many'"),
    "models string": ('[[train]]\ntask = "copy"\nmodels = "lmm"', "models='lmm'"),
    "lengths string": ('[[profile]]\nmodels = ["lmm"]\nlengths = "256:1024"', "lengths='256:1024'"),
    "lengths empty": ('[[profile]]\nmodels = ["lmm"]\nlengths = []', "lengths=[]"),
    "checkpoints empty": ('[[stream]]\nmodels = ["lmm"]\ncheckpoints = []', "checkpoints=[]"),
    "n string": ('[[dynamics]]\nn = "big"', "n='big'"),
    "seeds strings": ('[[train]]\ntask = "copy"\nmodels = ["swa"]\nseeds = ["a"]', "seeds=['a']"),
    "train not a table list": ("train = 3", "train must be a list of tables"),
    "profile key misspelt": ('[[profile]]\nmodels = ["lmm"]\nlengths = [64]\nprofile = { repeatz = 2 }', "repeatz"),
    "model value out of range": ('[model_config]\nd_model = 0\n[[train]]\ntask = "copy"\nmodels = ["swa"]',
                                 "d_model=0: must be >= 1"),
    "boolean for a number": ('[[train]]\ntask = "copy"\nmodels = ["swa"]\ntrain_config = { steps = true }',
                             "steps=True: must be an integer"),
}
BAD_ARGS = {  # flags: argv -> what the error names
    "d_model=0": ([*TRAIN, "--model-arg", "d_model=0"], "d_model=0: must be >= 1"),
    "n_layers=-1": ([*TRAIN, "--model-arg", "n_layers=-1"], "n_layers=-1: must be >= 1"),
    "d_model=abc": ([*TRAIN, "--model-arg", "d_model=abc"], "d_model='abc': must be an integer"),
    "d_model=64.5": ([*TRAIN, "--model-arg", "d_model=64.5"], "d_model=64.5: must be an integer"),
    "eval_lengths=8": ([*TRAIN, "--task-arg", "eval_lengths=8"], "eval_lengths=8: must be a non-empty list"),
    "malformed --model-arg": ([*TRAIN, "--model-arg", "d_model"], "--model-arg expects KEY=VALUE"),
    "--steps 0": ([*TRAIN, "--steps", "0"], "steps=0: must be >= 1"),
    "--lr -1": ([*TRAIN, "--lr", "-1"], "lr=-1.0: must be > 0"),
    "--seed -1": ([*TRAIN, "--seed", "-1"], "invalid seed '-1': give a whole number in [0, 2^63)"),
    "--batch 0": (["profile", "--batch", "0"], "batch=0: must be >= 1"),
    "--threads 0": ([*TRAIN, "--threads", "0"], "invalid value '0': give a whole number >= 1"),
    "--threads -1": ([*TRAIN, "--threads", "-1"], "invalid value '-1'"),
    "--lengths 1000:3000": (["profile", "--lengths", "1000:3000"], "2000 or 4000 would end the doublings"),
    "--resume without a run": (["run", "--resume", "nowhere"], "no results.csv there"),
}


def case_bad_input(tmp: Path, argv: list[str], needle: str) -> Outcome:
    results = tmp / "results"
    result = outcome(results, *argv, "--results", str(results))
    assert needle in result.err, result.err
    assert "Traceback" not in result.err
    assert not results.exists() or not any(results.iterdir()), "bad input must leave no run folder behind"
    return result


@pytest.mark.parametrize("argv,needle", list(BAD_ARGS.values()), ids=list(BAD_ARGS))
def test_bad_flags_exit_2_naming_key_value_and_what_is_valid(tmp_path, argv, needle):
    assert case_bad_input(tmp_path, argv, needle).code == 2


@pytest.mark.parametrize("text,needle", list(SUITE_VALUES.values()), ids=list(SUITE_VALUES))
def test_bad_suite_values_exit_2_naming_key_value_and_what_is_valid(tmp_path, text, needle):
    (tmp_path / "bad.toml").write_text(text + "\n")
    assert case_bad_input(tmp_path, ["run", "--suite", str(tmp_path / "bad.toml")], needle).code == 2


def test_a_misspelt_entry_key_names_the_entry_once(tmp_path):
    (tmp_path / "bad.toml").write_text('[[train]]\ntask = "copy"\nmodels = ["swa"]\nseed = [1]\n')
    result = case_bad_input(tmp_path, ["run", "--suite", str(tmp_path / "bad.toml")], "key(s) ['seed']; valid: ")
    assert result.code == 2 and result.err.count("[[train]] #1") == 1, result.err


def test_unreadable_data_and_results_exit_2(tmp_path):
    (tmp_path / "a_folder").mkdir()  # a path that cannot be read as a file (as root, mode 000 still reads)
    niah = ["train", "--model", "swa", "--task", "niah", "--task-arg", "haystack=text"]
    data = case_bad_input(tmp_path, [*niah, "--task-arg", f"text_path={tmp_path / 'a_folder'}"], "cannot read")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "results.csv").mkdir()
    results = case_bad_input(tmp_path, [*TRAIN, "--run-dir", str(tmp_path / "run")], "cannot use")
    (tmp_path / "file").write_text("")
    root = outcome(tmp_path / "x", *TRAIN, "--results", str(tmp_path / "file"))
    assert data.code == results.code == root.code == 2 and "cannot create a run folder" in root.err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_requested_without_cuda_exits_2(tmp_path):
    assert case_bad_input(tmp_path, [*TRAIN, "--device", "cuda"], "no CUDA device").code == 2


# -- failures and interruptions -------------------------------------------------------------------------------


def case_cpu_oom(tmp: Path) -> Outcome:
    result = outcome(tmp / "run", *TRAIN, "--batch-size", "1000000000000", "--run-dir", str(tmp / "run"))
    assert "failed: train swa copy: oom (RuntimeError" in result.err and "allocate memory" in result.err
    return result


def test_a_cpu_allocation_failure_is_oom_and_the_command_fails(tmp_path):
    result = case_cpu_oom(tmp_path)
    assert result.code == 1 and result.after == 1
    assert read_frame(tmp_path / "run")["status"].tolist() == ["oom"]


def case_profile_series_after_oom(tmp: Path) -> Outcome:
    return outcome(tmp / "run", "profile", "--models", "swa", "--lengths", "64,128", "--metrics", "flops",
                   "--modes", "forward", "--batch", "1000000000000", "--run-dir", str(tmp / "run"))


def test_a_profile_series_skips_its_larger_n_after_a_cpu_oom(tmp_path):
    result = case_profile_series_after_oom(tmp_path)
    assert result.code == 0 and result.after == 2  # oom and skipped are budget verdicts, not failures
    assert read_frame(tmp_path / "run").sort_values("n")["status"].tolist() == ["oom", "skipped"]


def case_ctrl_c(tmp: Path) -> Outcome:
    """SIGINT to a real `bench run` once two cells are stored, then the resume command it printed. The child gets
    SIGINT's default disposition back: under a shell's background job (`make test &`, a CI runner) SIGINT is
    ignored and the child would inherit that, run to the end and never see the signal."""
    suite, results = suite_file(tmp, seeds=range(8), steps=40), tmp / "results"
    proc = subprocess.Popen([sys.executable, "-m", "bench", "run", "--suite", str(suite), "--results", str(results),
                             "--threads", "1"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline, runs = time.monotonic() + 240, []
    while time.monotonic() < deadline and proc.poll() is None:
        runs = list(results.glob("*/results.csv")) if results.exists() else []
        if runs and data_lines(runs[0].parent) >= 2 * ROWS_PER_CELL:
            break
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    run = runs[0].parent
    stored = read_frame(run)
    last = err.strip().splitlines()[-1]
    assert last.startswith("interrupted: ") and "Traceback" not in err, err
    resume = shlex.split(last.split("resume with: ")[1])
    assert resume[:4] == ["python", "-m", "bench", "run"] and resume[-2:] == ["--resume", str(run)]
    result = Outcome(proc.returncode, 0, data_lines(run), out, err)
    code, _, _ = invoke(*resume[3:])
    assert code == 0
    final = read_frame(run)
    columns = ["cell_id", "metric", "value", "status", "time"]
    kept = final[final["cell_id"].isin(stored["cell_id"])].reset_index(drop=True)
    pd.testing.assert_frame_equal(kept[columns], stored[columns])  # every row stored before Ctrl-C, as it was
    return result


def test_ctrl_c_exits_130_with_one_line_and_the_resume_loses_nothing(tmp_path):
    result = case_ctrl_c(tmp_path)
    assert result.code == 130 and result.after >= 2 * ROWS_PER_CELL and result.after % ROWS_PER_CELL == 0
    assert_whole(next((tmp_path / "results").iterdir()), 8)


def case_unreachable_ray(tmp: Path) -> Outcome:
    pytest.importorskip("ray")
    start = time.monotonic()
    result = case_bad_input(tmp, ["run", "--suite", str(suite_file(tmp)), "--executor", "ray", "--address",
                                  "127.0.0.1:1"], "no Ray cluster reachable at 127.0.0.1:1")
    assert time.monotonic() - start < 30
    return result


def test_an_unreachable_ray_cluster_is_a_clear_error_and_leaves_no_folder(tmp_path):
    assert case_unreachable_ray(tmp_path).code == 2


@pytest.mark.parametrize("err", [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
                                 MemoryError(), RuntimeError("DefaultCPUAllocator: can't allocate memory")],
                         ids=["cuda", "python", "cpu-allocator"])
def test_cuda_and_cpu_allocation_failures_are_both_oom(monkeypatch, err):
    from bench.cells import Cell, ProfileRun
    from bench.running import execute

    def fail(cell, device, progress):
        raise err

    monkeypatch.setitem(execute.RUNNERS, "profile", fail)
    [row] = execute.run_cell(Cell("swa", ProfileRun(64, "memory")), "cpu", 1)
    assert row["status"] == "oom" and row["n"] == 64


def test_a_cell_killed_by_rays_memory_monitor_is_oom():
    ray = pytest.importorskip("ray")
    from bench.cells import Cell, ProfileRun
    from bench.running.ray_executor import failed_rows

    cell = Cell("swa", ProfileRun(512, "memory"))
    [oom] = failed_rows(cell, ray.exceptions.OutOfMemoryError("killed by the memory monitor"), "cpu", 1)
    [crash] = failed_rows(cell, ray.exceptions.WorkerCrashedError(), "cpu", 1)
    assert (oom["status"], crash["status"]) == ("oom", "error") and oom["n"] == 512  # the series skips larger n


def test_the_report_names_every_invocation_and_survives_an_unreadable_env_json(tmp_path):
    suite, run = finished_run(tmp_path)
    assert invoke("run", "--suite", str(suite), "--resume", str(run))[0] == 0
    assert len(json.loads((run / "env.json").read_text())["invocations"]) == 2
    assert invoke("report", str(run))[0] == 0
    assert "**invocations**: 2" in (run / "report.md").read_text()
    (run / "env.json").write_text('{"suite": "tin')  # torn by hand: the report still comes from the rows
    code, _, err = invoke("report", str(run))
    assert code == 0 and "Traceback" not in err and "**rows**: 27" in (run / "report.md").read_text()


CASES = {
    "two writers at once": case_two_writers,
    "torn last line (kill mid-write)": case_torn_tail,
    "half row ending in a newline": case_half_row_with_newline,
    "zero-byte results.csv": case_zero_byte_file,
    "suite lists a cell twice": case_duplicate_cells_in_suite,
    "every cell stored twice (old double writer)": case_every_row_written_twice,
    "resume with another suite": case_resume_with_another_suite,
    **{f"flag {k}": (lambda tmp, a=a, n=n: case_bad_input(tmp, a, n)) for k, (a, n) in BAD_ARGS.items()},
    "CPU out of memory (train)": case_cpu_oom,
    "CPU out of memory (profile series)": case_profile_series_after_oom,
    "Ctrl-C mid-sweep": case_ctrl_c,
    "unreachable Ray address": case_unreachable_ray,
}

if __name__ == "__main__":  # the table: python -m tests.test_faults
    import tempfile

    torch.set_num_threads(1)
    print("| case | exit | rows before | rows after |\n|---|---|---|---|")
    for name, case in CASES.items():
        with tempfile.TemporaryDirectory() as tmp:
            os.chdir(tmp)
            result = case(Path(tmp))
            print(f"| {name} | {result.code} | {result.before} | {result.after} |", flush=True)
    os.chdir(ROOT)


FAULTY_PROBE = """
import json, os, signal, sys, time
fault = json.loads(sys.argv[1])["fault"]
if fault == "killed":
    os.kill(os.getpid(), signal.SIGKILL)
if fault == "hangs":
    time.sleep(30)
if fault == "out_of_memory":
    raise RuntimeError("DefaultCPUAllocator: out of memory: you tried to allocate 9 GB")
if fault == "crashes":
    raise ValueError("the probe broke")
print("noise before the result")
print(json.dumps({"fault": fault, "mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_")}))
"""


@pytest.mark.parametrize(("fault", "status"), [("killed", "oom"), ("hangs", "timeout"), ("out_of_memory", "oom"),
                                               ("crashes", "error")])
def test_a_fresh_process_probe_that_fails_says_how(tmp_path, monkeypatch, fault, status):
    from bench.measuring import isolated

    (tmp_path / "faulty_probe.py").write_text(FAULTY_PROBE)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    monkeypatch.setattr(isolated, "PROBE", "faulty_probe")
    with pytest.raises(isolated.ProbeFailed) as failed:
        isolated.run_isolated({"fault": fault}, timeout_s=3)
    assert failed.value.status == status
    if fault == "crashes":
        assert str(failed.value) == "ValueError: the probe broke"  # the probe's last stderr line


def test_a_fresh_process_probe_returns_its_last_line_and_runs_with_the_allocator_pinned(tmp_path, monkeypatch):
    from bench.measuring import isolated

    (tmp_path / "faulty_probe.py").write_text(FAULTY_PROBE)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    monkeypatch.setattr(isolated, "PROBE", "faulty_probe")
    assert isolated.run_isolated({"fault": "none"}, timeout_s=30) == {"fault": "none", "mmap_threshold": "131072"}


def test_a_stream_cell_whose_process_is_killed_is_an_oom_row(monkeypatch):
    from bench.cells import Cell, StreamRun
    from bench.measuring.isolated import ProbeFailed
    from bench.running import execute

    def killed(*args, **kwargs):
        raise ProbeFailed("oom", "exit -9")

    monkeypatch.setattr(execute, "measure_stream", killed)
    [row] = execute.run_cell(Cell("lmm", StreamRun((32, 64), piece=32, budget_s=10)), "cpu", 1)
    assert row["status"] == "oom" and row["error"] == "exit -9" and row["model"] == "lmm"
