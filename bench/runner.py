"""Runs cells and writes their rows to the store. A failing cell becomes a status row (`diverged`, `oom`,
`error`), never a crashed sweep: `oom` for any allocation failure (torch's CUDA OutOfMemoryError, Python's
MemoryError, the CPU allocator's "can't allocate memory"), `error` for the rest, with the message in `extra`.
Ctrl-C (KeyboardInterrupt) is not a cell failure: it ends the sweep, and every finished cell is stored."""

from __future__ import annotations

import json
import time
import traceback
from collections import deque
from typing import Any

import torch
from tqdm import tqdm

import models
import tasks
from bench import metrics
from bench.cells import Cell
from bench.dynamics import run_dynamics
from bench.profile import probe, profile_point
from bench.ray_executor import run_on_ray
from bench.store import RunStore
from bench.train import train

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
    out = probe(cell, device, torch.get_num_threads(), cell.run_config.budget_s * 2 + 120)
    if out.returncode != 0:
        raise RuntimeError(out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}")
    return json.loads(out.stdout.strip().splitlines()[-1])["rows"]


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


def run_cells(cells: list[Cell], store: RunStore, device: str, threads: int, progress: bool = True,
              executor: str = "local", address: str | None = None) -> int:
    """Run the cells the store does not hold yet, each once, locally (one after another) or on Ray; returns how
    many ran. Cells of one profile series run in order of n: once a point runs out of memory or time, larger n
    of the same series are recorded as `skipped` without running."""
    done = store.done_cells()
    todo = list({c.id: c for c in cells if c.id not in done}.values())
    queues: dict[str, deque] = {}
    for cell in todo:
        queues.setdefault(cell.series or cell.id, deque()).append(cell)
    failed_at: dict[str, int] = {}
    bar = tqdm(total=len(todo), desc="cells", disable=not progress, dynamic_ncols=True)

    def skipped(cell: Cell) -> list[dict[str, Any]] | None:
        run = cell.run_config
        if cell.series in failed_at and run.n > failed_at[cell.series]:
            return [{"kind": cell.kind, "model": cell.model, "n": run.n, "metric": metrics.profiled(run.metric, mode),
                     "value": float("nan"), "status": "skipped", "config": cell.as_dict(),
                     "reason": f"a smaller n ({failed_at[cell.series]}) exceeded its budget"} for mode in run.modes]
        return None

    def settle(cell: Cell, rows: list[dict[str, Any]]) -> None:
        if cell.series and any(r.get("status") in ("oom", "timeout", "skipped") for r in rows):
            n = cell.run_config.length()
            failed_at[cell.series] = min(failed_at.get(cell.series, n), n)
        store.append(cell.id, rows)
        bar.update(1)

    try:
        if executor == "ray":
            run_on_ray(queues, skipped, settle, device, threads, address)
        else:
            for queue in queues.values():
                while queue:
                    cell = queue.popleft()
                    bar.set_description(cell.label)
                    settle(cell, skipped(cell) or run_cell(cell, device, threads, progress))
    finally:
        bar.close()
    return len(todo)
