"""Runs one cell where it stands (this process, or a Ray worker): its kind's measurement, and its rows with the
cell's identity filled in. A failing cell becomes a status row (`diverged`, `oom`, `timeout`, `error`), never a
crashed sweep: `oom` for any allocation failure (torch's CUDA OutOfMemoryError, Python's MemoryError, the CPU
allocator's "can't allocate memory", a fresh process the kernel killed), `error` for the rest, with the message
in `error`. Ctrl-C (KeyboardInterrupt) is not a cell failure: it propagates."""

from __future__ import annotations

import time
import traceback
from typing import Any

import torch

import models
import tasks
from bench import metrics
from bench.cells import Cell
from bench.measuring.dynamics import run_dynamics
from bench.measuring.isolated import ProbeFailed
from bench.measuring.profile import profile_point
from bench.measuring.streaming import measure_stream
from bench.measuring.train import train

OOM_MESSAGES = ("out of memory", "can't allocate memory", "cannot allocate memory")


def is_oom(err: BaseException) -> bool:
    text = str(err).lower()
    return isinstance(err, torch.OutOfMemoryError | MemoryError) or any(m in text for m in OOM_MESSAGES)


def run_train_cell(cell: Cell, device: str, progress: bool = True) -> list[dict[str, Any]]:
    task = tasks.build(cell.task, **cell.task_config)
    torch.manual_seed(cell.seed)
    backbone = models.build(cell.model, **cell.model_config)
    net = task.build_network(backbone, backbone.config.d_model)
    result = train(net, task, cell.run_config.train, device, desc=f"{cell.model} on {cell.task}", progress=progress)
    rows: list[dict[str, Any]] = [
        {"metric": metrics.TRAIN_LOSS, "value": result.final_loss, "status": result.status},
        {"metric": metrics.TRAIN_STEPS, "value": result.steps, "status": result.status},
        {"metric": metrics.TRAIN_TOKENS_PER_S, "value": result.tokens_per_s, "status": result.status},
        {"metric": metrics.TRAIN_WALL_S, "value": result.wall_s, "status": result.status},
    ]
    if result.best_val is not None:
        rows.append({"metric": metrics.BEST_VAL_LOSS, "value": result.best_val, "status": result.status})
    rows += [{"metric": name, "value": value, "status": result.status}
             for name, value in result.final_validation.items()]
    rows.append({"metric": metrics.LEARNING_CURVE, "value": result.final_loss, "status": result.status,
                 "curve": result.curve()})
    if result.status == "ok":
        rows += [{**row, "status": "ok"} for row in task.evaluate(net, device)]
    common = {"params": backbone.num_params(), "state_numel": backbone.state_numel(1024), "variant": task.variant}
    return [{**common, **row} for row in rows]


def run_profile_cell(cell: Cell, device: str, progress: bool = True) -> list[dict[str, Any]]:
    rows = profile_point(cell, device, torch.get_num_threads())
    return [{**row, "variant": cell.run_config.metric} for row in rows]


def run_stream_cell(cell: Cell, device: str, progress: bool = True) -> list[dict[str, Any]]:
    return measure_stream(cell, device, torch.get_num_threads())


def run_dynamics_cell(cell: Cell, device: str, progress: bool = True) -> list[dict[str, Any]]:
    r = cell.run_config
    return run_dynamics(r.stream, r.rule, r.n, r.window, seed=cell.seed, memory=dict(r.memory),
                        train_steps=r.train_steps)


RUNNERS = {"train": run_train_cell, "profile": run_profile_cell, "stream": run_stream_cell,
           "dynamics": run_dynamics_cell}


def run_cell(cell: Cell, device: str, threads: int, progress: bool = True) -> list[dict[str, Any]]:
    """Rows of one cell, with the cell's identity columns filled in; failures become status rows."""
    start = time.perf_counter()
    try:
        rows = RUNNERS[cell.kind](cell, device, progress)
    except ProbeFailed as failed:  # its fresh process said how it ended
        rows = [status_row(cell, failed.status, str(failed))]
    except Exception as err:  # a failing cell must not end the sweep
        rows = [status_row(cell, "oom" if is_oom(err) else "error", traceback.format_exception_only(err)[-1].strip())]
    return identified(cell, rows, device, threads, time.perf_counter() - start)


def status_row(cell: Cell, status: str, detail: str) -> dict[str, Any]:
    """The one row of a cell that failed (here or on a Ray worker); n: a profile point that failed says where."""
    return {"n": cell.run_config.length(), "metric": metrics.STATUS, "value": float("nan"), "status": status,
            "error": detail}


def identified(cell: Cell, rows: list[dict[str, Any]], device: str, threads: int,
               wall_s: float) -> list[dict[str, Any]]:
    """Rows with the cell's identity columns filled in."""
    identity = {"kind": cell.kind, "model": cell.model, "task": cell.task, "seed": cell.seed,
                "device": device, "threads": threads, "wall_s": wall_s, "config": cell.as_dict()}
    return [{**identity, **row} for row in rows]
