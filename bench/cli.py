"""`python -m bench`: list, train, run, profile, claims, compare, report.

Exit status: 0 done; 1 a requested cell failed (`train`: its cell did not end `ok`; `run` and `profile`: a cell
ended `error`; the reason is printed); 2 bad input (arguments, option values, suite files, data files, a run
folder that is unreadable, locked by another writer or holds another suite); 130 interrupted (Ctrl-C), after one
line saying what is stored and the command that resumes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import pandas as pd
import torch

import models
import tasks
from bench.analysing import claims, compare, forecast, report
from bench.cells import Cell
from bench.measuring.profile import METRICS
from bench.metrics import LEARNING_CURVE, MODES, is_example, parse_forecast_error
from bench.running import env, suite
from bench.running.ray_executor import RayUnreachable, connect
from bench.running.runner import run_cells
from bench.running.store import RunStore, StoreError, read_frame
from models.config import ConfigError
from tasks.data import DataError

RESULTS_ROOT = Path("results")


class UsageError(ValueError):
    pass


class Interrupted(Exception):
    """Ctrl-C during a sweep; the message says what is stored and how to resume."""


BAD_INPUT = (UsageError, suite.SuiteError, ConfigError, DataError, StoreError, RayUnreachable, env.DeviceError)


def parse_assignments(items: list[str] | None, flag: str) -> dict[str, Any]:
    """KEY=VALUE pairs; VALUE is read as TOML (numbers, booleans, [lists], "strings") or else kept as text (the
    option's type check then names a value that should have been a number or a list)."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise UsageError(f"{flag} expects KEY=VALUE, got {item!r}")
        try:
            out[key] = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            out[key] = raw
    return out


def new_run_dir(root: Path, label: str) -> Path:
    """A fresh run folder, created here so that two runs started in the same second never share one."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path, i = root / f"{stamp}-{label}", 1
    while True:
        try:
            path.mkdir(parents=True)
            return path
        except FileExistsError:
            path, i = root / f"{stamp}-{label}-{i}", i + 1
        except OSError as err:
            raise StoreError(f"cannot create a run folder under {root}: {err.strerror}") from None


def setup(args: argparse.Namespace) -> tuple[str, int]:
    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    return env.resolve_device(args.device), threads


def print_rows(frame) -> None:
    """A cell's rows, short: a forecasting cell as its forecasters side by side (model and references) after its
    training rows; the learning curve and the example forecasts stay in the CSV and the plots."""
    forecasters = forecast.cell_summary(frame)
    if not forecasters.empty:
        frame = frame[frame["metric"].map(parse_forecast_error).isna()]
    frame = frame[(frame["metric"] != LEARNING_CURVE) & ~frame["metric"].map(is_example)]
    cols = [c for c in ("model", "task", "n", "metric", "value", "ci_low", "ci_high", "status") if c in frame]
    with pd.option_context("display.max_rows", 1000, "display.width", 160):
        print(frame[cols].to_string(index=False))
        if not forecasters.empty:
            print("\n" + forecasters.to_string(index=False, float_format="{:.4f}".format))


def prepare(cells: list[Cell]) -> None:
    """Locate and verify every data file the cells need before any of them runs."""
    seen = set()
    for cell in cells:
        key = (cell.task, json.dumps(cell.task_config, sort_keys=True, default=list))
        if cell.task and key not in seen:
            seen.add(key)
            try:
                tasks.build(cell.task, **cell.task_config).prepare()
            except OSError as err:
                what = err.filename or "its data"
                raise DataError(f"task {cell.task!r}: cannot read {what}: {err.strerror}") from None


def open_store(run_dir: Path) -> RunStore:
    """The run folder's store (its lock held), saying what a repair on open left out."""
    store = RunStore(run_dir)
    if store.repairs.summary():
        kept = " (the dropped lines are kept in results.dropped)" if store.repairs.dropped else ""
        print(f"note: {store.path} repaired on open: {store.repairs.summary()}{kept}", file=sys.stderr)
    return store


def fingerprint(cells: list[Cell]) -> str:
    return hashlib.sha256("\n".join(sorted(c.id for c in cells)).encode()).hexdigest()[:16]


def invocation(threads: int, device: str, label: str, cells: list[Cell]) -> dict[str, Any]:
    """env.json's entry for this command: the environment, and which cells it was asked to run."""
    return {**env.collect(threads, device), "suite": label, "cells": len(cells),
            "cells_fingerprint": fingerprint(cells)}


def check_same_suite(store: RunStore, s: suite.Suite) -> None:
    """Refuse to resume a run with a suite other than the one it was started with (cells would mix)."""
    ids = {c.id for c in s.cells}
    recorded = [inv for inv in store.invocations() if "cells_fingerprint" in inv]
    foreign = store.done_cells() - ids
    if foreign or (recorded and recorded[-1]["cells_fingerprint"] != fingerprint(s.cells)):
        was = f"suite {recorded[-1]['suite']!r} ({recorded[-1]['cells']} cells)" if recorded else "another suite"
        raise UsageError(f"{store.dir} was run with {was}; suite {s.name!r} has {len(ids)} cell(s), "
                         f"{len(ids - store.done_cells())} of them not stored yet, and {len(foreign)} stored cell(s) "
                         "are not in it. Resuming would mix two suites in one run: give a new run folder, or add "
                         "--allow-suite-change to mix them on purpose.")


def resume_command(argv: list[str], flag: str, run_dir: Path) -> str:
    """The command line that continues this one: argv with `flag RUN_DIR` set to the run folder."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == flag:
            skip = True
        elif not arg.startswith(flag + "="):
            out.append(arg)
    return shlex.join(["python", "-m", "bench", *out, flag, str(run_dir)])


def execute(args: argparse.Namespace, cells: list[Cell], store: RunStore, device: str, threads: int,
            resume_flag: str, **kwargs: Any) -> int:
    """Run the cells; on Ctrl-C raise Interrupted with one line: what is stored and the command that resumes."""
    try:
        return run_cells(cells, store, device, threads, **kwargs)
    except KeyboardInterrupt:
        stored = len({c.id for c in cells} & set(store.frame()["cell_id"]))  # the file, even mid-append
        raise Interrupted(f"interrupted: {stored} of {len(cells)} cell(s) stored in {store.path} (finished cells "
                          f"are kept, the one running is not); resume with: "
                          f"{resume_command(args.argv, resume_flag, store.dir)}") from None


def failures(frame: pd.DataFrame, cells: list[Cell], statuses: tuple[str, ...]) -> list[str]:
    """One line per requested cell whose rows carry one of `statuses`, with the reason from `extra`."""
    labels = {c.id: c.label for c in cells}
    bad = frame[frame["cell_id"].isin(labels) & frame["status"].isin(statuses)]
    out = []
    for cell_id, rows in bad.groupby("cell_id", sort=False):
        extra = rows["extra"].dropna()
        try:
            reason = json.loads(extra.iloc[0]).get("error", "") if len(extra) else ""
        except (json.JSONDecodeError, AttributeError):  # extra of a row from an older version
            reason = str(extra.iloc[0])
        out.append(f"{labels[cell_id]}: {rows['status'].iloc[0]}" + (f" ({reason})" if reason else ""))
    return out


def report_failures(lines: list[str]) -> int:
    for line in lines:
        print(f"failed: {line}", file=sys.stderr)
    return 1 if lines else 0


def cmd_list(args: argparse.Namespace) -> int:
    print("models:")
    print(f"  {'name':<18} {'params':>9} {'state@1K':>10} {'state@1M':>12} {'time':>6} {'memory':>7} streams  summary")
    for name, s in models.MODELS.items():
        m = models.build(name)
        c = m.complexity
        print(f"  {name:<18} {m.num_params():>9,} {m.state_numel(1024):>10,} {m.state_numel(1 << 20):>12,} "
              f"{c.time:>6} {c.memory:>7} {'yes' if m.streams else 'no':>7}  {s.summary}")
    print("tasks:")
    for name, s in tasks.TASKS.items():
        print(f"  {name:<12} {s.summary}")
    print("suites:")
    for name in suite.available():
        print(f"  {name:<12} {suite.load(name).description}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    device, threads = setup(args)
    train_cfg = {k: v for k, v in {"steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
                                   "val_every": args.val_every, "patience": args.patience}.items() if v is not None}
    task_cfg = parse_assignments(args.task_arg, "--task-arg")
    task_cfg.update({k: v for k, v in {"dataset": args.dataset, "data_dir": args.data_dir}.items() if v})
    entry = {"task": args.task, "models": [args.model], "seeds": [args.seed], "task_config": task_cfg,
             "train_config": train_cfg, "model_config": parse_assignments(args.model_arg, "--model-arg")}
    cells = suite.expand("train", {"train": [entry]}, where="train").cells
    prepare(cells)
    with open_store(args.run_dir or new_run_dir(args.results, f"train-{args.model}-{args.task}")) as store:
        store.record_invocation(invocation(threads, device, "train", cells))
        execute(args, cells, store, device, threads, "--run-dir")
        frame = store.frame()
    print_rows(frame[frame["cell_id"] == cells[0].id])
    print(f"results: {store.path}")
    return report_failures(failures(frame, cells, ("error", "oom", "timeout", "diverged")))


def cmd_run(args: argparse.Namespace) -> int:
    device, threads = setup(args)
    if args.executor == "ray":
        try:
            import ray  # noqa: F401
        except ImportError:
            raise UsageError("--executor ray needs Ray: pip install '.[ray]'") from None
    s = suite.load(args.suite)
    if s.duplicates:
        print(f"note: suite {s.name!r} lists {s.duplicates} cell(s) more than once; each runs once", file=sys.stderr)
    prepare(s.cells)
    if args.resume and not (Path(args.resume) / "results.csv").is_file():
        raise UsageError(f"--resume {args.resume}: no results.csv there (give a run folder, results/<run-id>)")
    if args.executor == "ray":
        connect(args.address)  # before the run folder exists: an unreachable cluster leaves nothing behind
    with open_store(Path(args.resume) if args.resume else new_run_dir(args.results, s.name)) as store:
        if not args.allow_suite_change:
            check_same_suite(store, s)
        store.record_invocation(invocation(threads, device, s.name, s.cells))
        ran = execute(args, s.cells, store, device, threads, "--resume", executor=args.executor,
                      address=args.address)
        print(f"{s.name}: {ran} cell(s) run, {len(s.cells) - ran} already done; results: {store.path}")
        try:
            print(f"report: {build_report(store.dir)}")
        except KeyboardInterrupt:
            raise Interrupted(f"interrupted while writing the report; all {len(s.cells)} cells are stored in "
                              f"{store.path}; rebuild it with: python -m bench report {store.dir}") from None
        return report_failures(failures(store.frame(), s.cells, ("error",)))


def finished_rows(run_dir: str) -> pd.DataFrame:
    """A run's rows through the store's repairing read; a run with none yet is bad input for a reader."""
    frame = read_frame(run_dir)
    if frame.empty:
        raise UsageError(f"{run_dir} holds no finished rows yet")
    return frame


def cmd_compare(args: argparse.Namespace) -> int:
    print(compare.compare(finished_rows(args.run_a), finished_rows(args.run_b), threshold=args.threshold))
    return 0


def build_report(run_dir: Path | str) -> Path:
    try:
        return report.build(run_dir)
    except OSError as err:
        raise StoreError(f"cannot write the report in {run_dir}: {err.strerror}") from None


def cmd_report(args: argparse.Namespace) -> int:
    finished_rows(args.run_dir)
    print(f"report: {build_report(args.run_dir)}")
    return 0


def parse_lengths(text: str) -> list[int]:
    """`256:16384` (doublings from 256 to 16384: HIGH must be LOW times a power of two) or `256,1000,4096`."""
    usage = "use LOW:HIGH (doublings, 1 <= LOW <= HIGH, HIGH = LOW x 2^k) or a comma list of lengths >= 1"
    try:
        if ":" in text:
            low, high = (int(v) for v in text.split(":"))
            if low < 1:
                raise ValueError
            out = [low]
            while out[-1] < high:
                out.append(out[-1] * 2)
            if out[-1] != high:
                raise ValueError
            return out
        out = [int(v) for v in text.split(",")]
        if min(out) < 1:
            raise ValueError
        return out
    except ValueError:
        hint = ""
        if ":" in text and all(v.strip().isdigit() for v in text.split(":")) and text.count(":") == 1:
            low, high = (int(v) for v in text.split(":"))
            if 1 <= low <= high:
                below = low * 2 ** ((high // low).bit_length() - 1)
                hint = f" ({below} or {below * 2} would end the doublings; or list them: {low},...,{high})"
        raise argparse.ArgumentTypeError(f"invalid lengths {text!r}{hint}: {usage}") from None


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: give a whole number >= 1")
    return value


def seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not suite.SEED.ok(value):
        raise argparse.ArgumentTypeError(f"invalid seed {text!r}: give a whole number {suite.SEED.valid}")
    return value


def parse_choices(valid: tuple[str, ...] | list[str], what: str):
    def parse(text: str) -> list[str]:
        items = [t for t in text.split(",") if t]
        bad = [t for t in items if t not in valid]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"unknown {what} {bad}; valid: {', '.join(valid)}")
        return items
    return parse


def cmd_profile(args: argparse.Namespace) -> int:
    device, threads = setup(args)
    profile = {k: v for k, v in {"batch": args.batch, "repeats": args.repeats,
                                 "memory_budget_mb": args.memory_budget_mb, "time_budget_s": args.time_budget_s}.items()
               if v is not None}
    data = {"profile": [{"models": args.models, "lengths": args.lengths, "metrics": args.metrics,
                         "modes": args.modes, "profile": profile}]}
    cells = suite.expand("profile", data, where="profile").cells
    with open_store(args.run_dir or new_run_dir(args.results, "profile")) as store:
        store.record_invocation(invocation(threads, device, "profile", cells))
        execute(args, cells, store, device, threads, "--run-dir")
        frame = store.frame()
    print_rows(frame[frame["cell_id"].isin({c.id for c in cells})])
    print(f"results: {store.path}")
    return report_failures(failures(frame, cells, ("error",)))


def cmd_claims(args: argparse.Namespace) -> int:
    for v in claims.ledger(finished_rows(args.run_dir)):
        print(f"{v.id:<4} {v.verdict:<13} {v.claim}\n     {v.evidence}\n     cells: {', '.join(v.cells) or '-'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="{list,train,run,profile,claims,compare,report}")

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="cuda when available unless set (default: auto)")
    common.add_argument("--threads", type=positive_int, default=None,
                        help="torch threads (>= 1), fixed and recorded (default: all cores)")
    common.add_argument("--results", type=Path, default=RESULTS_ROOT, help="root folder of run folders")

    sub.add_parser("list", help="models (with parameter counts and state sizes), tasks and suites")

    p = sub.add_parser("train", parents=[common], help="train one model on one task, then evaluate it")
    p.add_argument("--model", required=True, choices=models.names())
    p.add_argument("--task", required=True, choices=tasks.names())
    p.add_argument("--seed", type=seed, default=0, help="model-init seed (data seeds are task options)")
    p.add_argument("--steps", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--val-every", type=int, help="score validation every N steps and keep the best weights")
    p.add_argument("--patience", type=int, help="with --val-every: stop after N validations without a new best")
    p.add_argument("--model-arg", action="append", metavar="KEY=VALUE", help="model option, repeatable")
    p.add_argument("--task-arg", action="append", metavar="KEY=VALUE", help="task option, repeatable")
    p.add_argument("--dataset", help="timeseries: synthetic, etth1 or etth2 (same as --task-arg dataset=...)")
    p.add_argument("--data-dir", help="folder holding data files (ETTh1.csv, tinyshakespeare.txt, ...)")
    p.add_argument("--run-dir", type=Path, help="write here instead of a new results/<run-id>")

    p = sub.add_parser("run", parents=[common], help="run a suite (bench/suites/NAME.toml)")
    p.add_argument("--suite", default="quick", help=f"suite name ({', '.join(suite.available())}) or a .toml path")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a run: cells already stored are skipped")
    p.add_argument("--executor", choices=["local", "ray"], default="local",
                   help="local: one cell after another here; ray: cells as Ray tasks (pip install .[ray])")
    p.add_argument("--address", help="Ray cluster: 'auto' or HOST:PORT (default: start a local Ray)")
    p.add_argument("--allow-suite-change", action="store_true",
                   help="let --resume add the cells of a suite other than the run's (they mix in one run)")

    p = sub.add_parser("profile", parents=[common], help="time / memory / FLOPs of models against n")
    default_models = [models.first("attention"), models.first("memory")]
    p.add_argument("--models", type=parse_choices(models.names(), "model"), default=default_models,
                   help=f"comma list from {', '.join(models.names())} (default: the first attention and the first "
                        f"memory model, {','.join(default_models)})")
    p.add_argument("--lengths", type=parse_lengths, default=parse_lengths("256:4096"), help="LOW:HIGH or a,b,c")
    p.add_argument("--metrics", type=parse_choices(METRICS, "metric"), default=list(METRICS),
                   help=f"comma list from {', '.join(METRICS)}")
    p.add_argument("--modes", type=parse_choices(MODES, "mode"), default=list(MODES),
                   help=f"comma list from {', '.join(MODES)}")
    p.add_argument("--batch", type=int)
    p.add_argument("--repeats", type=int)
    p.add_argument("--memory-budget-mb", type=float)
    p.add_argument("--time-budget-s", type=float)
    p.add_argument("--run-dir", type=Path, help="write here instead of a new results/<run-id>")

    p = sub.add_parser("claims", help="the claims ledger of a run: verdicts and the numbers behind them")
    p.add_argument("run_dir", metavar="RUN_DIR")

    p = sub.add_parser("compare", help="what moved between two runs: exponents, accuracies, cost ratios")
    p.add_argument("run_a", metavar="RUN_A")
    p.add_argument("run_b", metavar="RUN_B")
    p.add_argument("--threshold", type=float, default=0.05, help="smallest change shown (default 0.05)")

    p = sub.add_parser("report", help="rebuild report.md and the plots of a run from its results.csv")
    p.add_argument("run_dir", metavar="RUN_DIR")
    return parser


COMMANDS = {"list": cmd_list, "train": cmd_train, "run": cmd_run, "profile": cmd_profile, "claims": cmd_claims,
            "compare": cmd_compare, "report": cmd_report}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    try:
        return COMMANDS[args.command](args)
    except BAD_INPUT as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except Interrupted as err:
        print(f"\n{err}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("\ninterrupted while no cell was running; nothing was lost", file=sys.stderr)
        return 130
