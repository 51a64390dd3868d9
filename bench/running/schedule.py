"""Which cell runs next. Cells of one profile series (a model and metric over n, `Cell.series`) run in order
of n, one at a time: once a point ends `oom`, `timeout` or `skipped`, the larger n of its series are not run but
recorded as `skipped`, with the n that exceeded its budget. Every other cell is a series of its own, so series
can run side by side (bench.running.ray_executor)."""

from __future__ import annotations

from collections import deque
from typing import Any

from bench import metrics
from bench.cells import Cell

BUDGET_FAILURES = ("oom", "timeout", "skipped")


class Schedule:
    def __init__(self, cells: list[Cell]):
        self.queues: dict[str, deque[Cell]] = {}
        for cell in cells:
            self.queues.setdefault(cell.series or cell.id, deque()).append(cell)
        self.failed_at: dict[str, int] = {}

    def series(self) -> list[str]:
        return list(self.queues)

    def take(self, key: str) -> tuple[Cell, list[dict[str, Any]] | None] | None:
        """The next cell of series `key` with, when it must not run, its `skipped` rows; None once the series is
        done. The rows of what was taken must be `record`ed before the series' next take."""
        queue = self.queues[key]
        if not queue:
            return None
        cell = queue.popleft()
        return cell, self.skipped(cell)

    def skipped(self, cell: Cell) -> list[dict[str, Any]] | None:
        """One `skipped` row per mode, under the mode's metric name, once a smaller n of the series failed."""
        run = cell.run_config
        if cell.series not in self.failed_at or run.length() <= self.failed_at[cell.series]:
            return None
        return [{"kind": cell.kind, "model": cell.model, "n": run.n, "metric": metrics.profiled(run.metric, mode),
                 "value": float("nan"), "status": "skipped", "config": cell.as_dict(),
                 "reason": f"a smaller n ({self.failed_at[cell.series]}) exceeded its budget"} for mode in run.modes]

    def record(self, cell: Cell, rows: list[dict[str, Any]]) -> None:
        """Note a finished cell's outcome: a budget failure in a series skips the series' larger n."""
        if cell.series and any(r.get("status") in BUDGET_FAILURES for r in rows):
            n = cell.run_config.length()
            self.failed_at[cell.series] = min(self.failed_at.get(cell.series, n), n)
