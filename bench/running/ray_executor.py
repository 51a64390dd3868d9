"""Cells on a Ray cluster. Each cell is one Ray task; the driver alone writes the store, as results arrive.

- Resources: a cell asks for `threads` CPUs (and a GPU on `--device cuda`); timing and memory cells ask for
  every CPU of the smallest node, so that nothing else runs beside a measurement.
- Order: cells of one profile series (a model and metric over n) run one after another, so a budget failure
  still skips the larger n; different series and training cells run in parallel.
- Faults: a worker that dies mid-cell is retried by Ray (`max_retries`); a cell that still fails becomes an
  `oom` row when Ray's memory monitor killed it, else an `error` row. Rows reach the store only once, from the
  driver; an interrupted driver resumes from the store.
- Connecting: `connect` first checks that something listens at HOST:PORT (CONNECT_TIMEOUT_S), because Ray
  itself retries an unreachable address for minutes; the CLI connects before it creates the run folder.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

from bench.cells import Cell
from bench.running.execute import identified, run_cell, status_row
from bench.running.schedule import Schedule

MAX_RETRIES = 2
CONNECT_TIMEOUT_S = 10.0


class RayUnreachable(RuntimeError):
    pass


def connect(address: str | None) -> None:
    """Join the Ray cluster at `address` ('auto', HOST:PORT, ray://HOST:PORT), or start a local one for None."""
    import ray

    if ray.is_initialized():
        return
    if address not in (None, "auto"):
        host, sep, port = address.removeprefix("ray://").rpartition(":")
        if not sep or not host or not port.isdigit():
            raise RayUnreachable(f"--address {address!r}: give HOST:PORT (e.g. 10.0.0.5:6379), ray://HOST:PORT "
                                 "or auto")
        try:
            socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S).close()
        except OSError as err:
            raise RayUnreachable(f"no Ray cluster reachable at {address} within {CONNECT_TIMEOUT_S:.0f} s "
                                 f"({err.strerror or err}): start one there with `ray start --head --port={port}`, "
                                 "or leave out --address to run a local Ray") from None
    try:
        ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False)
    except ConnectionError as err:
        raise RayUnreachable(f"cannot join Ray at {address}: {err}") from None


def run_cell_remote(cell: dict[str, Any], device: str, threads: int) -> list[dict[str, Any]]:
    import torch

    torch.set_num_threads(threads)
    return run_cell(Cell.from_dict(cell), device, threads, progress=False)


def exclusive(cell: Cell) -> bool:
    return cell.kind == "stream" or (cell.kind == "profile" and cell.run_config.metric in ("time", "memory"))


def failed_rows(cell: Cell, err: Exception, device: str, threads: int) -> list[dict[str, Any]]:
    """The status row of a cell whose Ray task failed for good: `oom` when Ray's memory monitor killed it (the
    worker ran out of host memory, as a CPU allocation failure inside the cell is `oom`), else `error`."""
    import ray

    status = "oom" if isinstance(err, ray.exceptions.OutOfMemoryError) else "error"
    row = status_row(cell, status, f"failed on Ray after {MAX_RETRIES} retries: {type(err).__name__}")
    return identified(cell, [row], device, threads, wall_s=float("nan"))


def run_on_ray(schedule: Schedule, device: str, threads: int,
               address: str | None) -> Iterator[tuple[Cell, list[dict[str, Any]]]]:
    """Yields (cell, rows) per cell as results arrive; the first cell of every series is in flight at once."""
    import ray

    connect(address)
    node_cpus = min(int(n["Resources"].get("CPU", 1)) for n in ray.nodes() if n["Alive"])
    remote = ray.remote(max_retries=MAX_RETRIES)(run_cell_remote)
    in_flight: dict[Any, tuple[str, Cell]] = {}

    def submit(key: str) -> Iterator[tuple[Cell, list[dict[str, Any]]]]:
        """Puts the series' next cell in flight; cells the schedule skips are yielded on the way."""
        while (taken := schedule.take(key)) is not None:
            cell, skipped = taken
            if skipped is not None:
                yield cell, skipped
                continue
            cpus = node_cpus if exclusive(cell) else min(threads, node_cpus)
            options = {"num_cpus": cpus, "num_gpus": 1 if device.startswith("cuda") else 0}
            in_flight[remote.options(**options).remote(cell.as_dict(), device, threads)] = (key, cell)
            return

    for key in schedule.series():
        yield from submit(key)
    while in_flight:
        ready, _ = ray.wait(list(in_flight), num_returns=1)
        key, cell = in_flight.pop(ready[0])
        try:
            rows = ray.get(ready[0])
        except ray.exceptions.RayError as err:
            rows = failed_rows(cell, err, device, threads)
        yield cell, rows
        yield from submit(key)
