"""Runs a sweep: the cells the store does not hold yet, each once, through an executor (this process, or Ray),
and settles each cell's rows as it ends: the schedule hears of budget failures, the store writes the rows,
the progress bar moves. The runner alone settles; executors only yield (cell, rows). Ctrl-C ends the sweep with
every finished cell stored."""

from __future__ import annotations

from tqdm import tqdm

from bench.cells import Cell
from bench.running.local_executor import run_local
from bench.running.ray_executor import run_on_ray
from bench.running.schedule import Schedule
from bench.running.store import RunStore


def run_cells(cells: list[Cell], store: RunStore, device: str, threads: int, progress: bool = True,
              executor: str = "local", address: str | None = None) -> int:
    """Run the cells the store does not hold yet, each once, locally (one after another) or on Ray; returns how
    many ran. Cells of one profile series run in order of n: once a point runs out of memory or time, larger n
    of the same series are recorded as `skipped` without running."""
    done = store.done_cells()
    todo = list({c.id: c for c in cells if c.id not in done}.values())
    schedule = Schedule(todo)
    bar = tqdm(total=len(todo), desc="cells", disable=not progress, dynamic_ncols=True)
    if executor == "ray":
        finished = run_on_ray(schedule, device, threads, address)
    else:
        finished = run_local(schedule, device, threads, progress, announce=lambda cell: bar.set_description(cell.label))
    try:
        for cell, rows in finished:
            schedule.record(cell, rows)
            store.append(cell.id, rows)
            bar.update(1)
    finally:
        bar.close()
    return len(todo)
