"""Cells in this process, one after another: series by series, each cell's rows yielded as soon as it ends."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from bench.cells import Cell
from bench.running.execute import run_cell
from bench.running.schedule import Schedule


def run_local(schedule: Schedule, device: str, threads: int, progress: bool = True,
              announce: Callable[[Cell], None] = lambda cell: None) -> Iterator[tuple[Cell, list[dict[str, Any]]]]:
    """Yields (cell, rows) per cell; `announce(cell)` is called before a cell starts (the progress bar's label)."""
    for key in schedule.series():
        while (taken := schedule.take(key)) is not None:
            cell, skipped = taken
            if skipped is None:
                announce(cell)
            yield cell, skipped or run_cell(cell, device, threads, progress)
