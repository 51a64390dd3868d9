"""`python -m bench`: list, train, run. Bad arguments exit 2 with a message naming the valid choices."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import pandas as pd
import torch

import models
import tasks
from bench import claims, compare, env, report, suite
from bench.cells import Cell
from bench.profile import METRICS, MODES
from bench.runner import run_cells
from bench.store import RunStore
from tasks.data import DataError

RESULTS_ROOT = Path("results")


def parse_assignments(items: list[str] | None, flag: str) -> dict[str, Any]:
    """KEY=VALUE pairs; VALUE is read as TOML (numbers, booleans, [lists], "strings") or else kept as text."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"error: {flag} expects KEY=VALUE, got {item!r}")
        try:
            out[key] = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            out[key] = raw
    return out


def new_run_dir(root: Path, label: str) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path, i = root / f"{stamp}-{label}", 1
    while path.exists():
        path, i = root / f"{stamp}-{label}-{i}", i + 1
    return path


def setup(args: argparse.Namespace) -> tuple[str, int]:
    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    return env.resolve_device(args.device), threads


def print_rows(frame) -> None:
    cols = [c for c in ("model", "task", "n", "metric", "value", "ci_low", "ci_high", "status") if c in frame]
    with pd.option_context("display.max_rows", 500, "display.width", 160):
        print(frame[cols].to_string(index=False))


def prepare(cells: list[Cell]) -> None:
    """Locate and verify every data file the cells need before any of them runs."""
    seen = set()
    for cell in cells:
        key = (cell.task, json.dumps(cell.task_config, sort_keys=True, default=list))
        if cell.task and key not in seen:
            seen.add(key)
            tasks.build(cell.task, **cell.task_config).prepare()


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
                                   "val_every": args.val_every}.items() if v is not None}
    task_cfg = parse_assignments(args.task_arg, "--task-arg")
    task_cfg.update({k: v for k, v in {"dataset": args.dataset, "data_dir": args.data_dir}.items() if v})
    cell = Cell(kind="train", model=args.model, task=args.task, seed=args.seed,
                model_config=parse_assignments(args.model_arg, "--model-arg"), task_config=task_cfg,
                run_config=train_cfg)
    try:
        suite.expand("train", {"train": [{"task": cell.task, "models": [cell.model], "seeds": [cell.seed],
                                          "task_config": cell.task_config, "train_config": cell.run_config,
                                          "model_config": cell.model_config}]})
        prepare([cell])
    except (suite.SuiteError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    store = RunStore(args.run_dir or new_run_dir(args.results, f"train-{args.model}-{args.task}"))
    store.write_json("env.json", env.collect(threads, device))
    run_cells([cell], store, device, threads)
    print_rows(store.frame())
    print(f"results: {store.path}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    device, threads = setup(args)
    if args.executor == "ray":
        try:
            import ray  # noqa: F401
        except ImportError:
            print("error: --executor ray needs Ray: pip install '.[ray]'", file=sys.stderr)
            return 2
    try:
        s = suite.load(args.suite)
        prepare(s.cells)
    except (suite.SuiteError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.resume:
        run_dir = Path(args.resume)
        if not (run_dir / "results.csv").exists():
            print(f"error: --resume {run_dir}: no results.csv there", file=sys.stderr)
            return 2
    else:
        run_dir = new_run_dir(args.results, s.name)
    store = RunStore(run_dir)
    store.write_json("env.json", {**env.collect(threads, device), "suite": s.name})
    ran = run_cells(s.cells, store, device, threads, executor=args.executor, address=args.address)
    print(f"{s.name}: {ran} cell(s) run, {len(s.cells) - ran} already done; results: {store.path}")
    print(f"report: {report.build(store.dir)}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    frames = []
    for run in (args.run_a, args.run_b):
        path = Path(run) / "results.csv"
        if not path.exists():
            print(f"error: {path} not found: give two run folders", file=sys.stderr)
            return 2
        frames.append(pd.read_csv(path))
    print(compare.compare(*frames, threshold=args.threshold))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    if not (Path(args.run_dir) / "results.csv").exists():
        print(f"error: no results.csv in {args.run_dir}: give a run folder (results/<run-id>)", file=sys.stderr)
        return 2
    print(f"report: {report.build(args.run_dir)}")
    return 0


def parse_lengths(text: str) -> list[int]:
    """`256:16384` (powers of two from 256 to 16384) or `256,1000,4096`."""
    try:
        if ":" in text:
            low, high = (int(v) for v in text.split(":"))
            if low < 1 or high < low:
                raise ValueError
            out, n = [], low
            while n <= high:
                out.append(n)
                n *= 2
            return out
        out = [int(v) for v in text.split(",")]
        if min(out) < 1:
            raise ValueError
        return out
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid lengths {text!r}: use LOW:HIGH (powers of two, 1 <= LOW <= HIGH) or a comma list") from None


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
    s = suite.expand("profile", data)
    store = RunStore(args.run_dir or new_run_dir(args.results, "profile"))
    store.write_json("env.json", env.collect(threads, device))
    run_cells(s.cells, store, device, threads)
    frame = store.frame()
    cols = ["model", "n", "metric", "value", "status"]
    with pd.option_context("display.max_rows", 1000, "display.width", 160):
        print(frame[cols].to_string(index=False))
    print(f"results: {store.path}")
    return 0


def cmd_claims(args: argparse.Namespace) -> int:
    path = Path(args.run_dir) / "results.csv"
    if not path.exists():
        print(f"error: {path} not found: give a run folder (results/<run-id>)", file=sys.stderr)
        return 2
    for v in claims.ledger(pd.read_csv(path)):
        print(f"{v.id:<4} {v.verdict:<13} {v.claim}\n     {v.evidence}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="{list,train,run,profile,claims,compare,report}")

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="cuda when available unless set (default: auto)")
    common.add_argument("--threads", type=int, default=None,
                        help="torch threads, fixed and recorded (default: all cores)")
    common.add_argument("--results", type=Path, default=RESULTS_ROOT, help="root folder of run folders")

    sub.add_parser("list", help="models (with parameter counts and state sizes), tasks and suites")

    p = sub.add_parser("train", parents=[common], help="train one model on one task, then evaluate it")
    p.add_argument("--model", required=True, choices=models.names())
    p.add_argument("--task", required=True, choices=tasks.names())
    p.add_argument("--seed", type=int, default=0, help="model-init seed (data seeds are task options)")
    p.add_argument("--steps", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--val-every", type=int, help="score validation every N steps and keep the best weights")
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

    p = sub.add_parser("profile", parents=[common], help="time / memory / FLOPs of models against n")
    p.add_argument("--models", type=parse_choices(models.names(), "model"), default=["transformer", "lmm"],
                   help=f"comma list from {', '.join(models.names())}")
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
    args = build_parser().parse_args(argv)
    return COMMANDS[args.command](args)
