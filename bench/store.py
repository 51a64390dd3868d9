"""The results store: `results/<run-id>/results.csv`, one tidy row per measurement, plus env.json.

Crash safety: all rows of one cell are appended in a single write, flushed and fsynced; every row carries
`cell_rows`, the size of its cell. On open, a torn tail (a line without newline) is cut off and a cell with
fewer rows than it announced is dropped, so an interrupted run (Ctrl-C, kill -9) loses no finished cell and
keeps no partial one. `done_cells()` is what a resumed run skips.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import pandas as pd

SCHEMA_VERSION = 2  # 2: pairs and distance (mqar's grid and its accuracy by key-to-query distance)
COLUMNS = [
    "run_id", "cell_id", "kind", "model", "task", "variant", "n", "depth", "pairs", "distance", "metric", "value",
    "ci_low", "ci_high", "status", "seed", "params", "state_numel", "device", "threads", "wall_s", "extra", "config",
    "cell_rows", "schema", "time",
]
RESULTS = "results.csv"


def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, dict | list | tuple):
        return json.dumps(value, sort_keys=True, default=list)
    return str(value)


class RunStore:
    def __init__(self, run_dir: str | Path):
        self.dir = Path(run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / RESULTS
        self.run_id = self.dir.name
        self._repair()

    def _repair(self) -> None:
        """Cut a torn last line and drop cells whose rows are not all present."""
        if not self.path.exists() or self.path.stat().st_size == 0:
            with open(self.path, "w", newline="") as f:
                csv.writer(f).writerow(COLUMNS)
            return
        raw = self.path.read_bytes()
        if not raw.endswith(b"\n"):
            raw = raw[: raw.rfind(b"\n") + 1]
        reader = csv.DictReader(io.StringIO(raw.decode()))
        rows = list(reader)
        counts: dict[str, int] = {}
        for row in rows:
            counts[row["cell_id"]] = counts.get(row["cell_id"], 0) + 1
        complete = [r for r in rows if counts[r["cell_id"]] == int(r["cell_rows"])]
        older_schema = reader.fieldnames != COLUMNS  # rewritten under today's header, blanks in new columns
        if len(complete) != len(rows) or raw != self.path.read_bytes() or older_schema:
            tmp = self.path.with_suffix(".tmp")
            with open(tmp, "w", newline="") as f:
                writer = csv.DictWriter(f, COLUMNS, extrasaction="ignore")
                writer.writeheader()
                writer.writerows(complete)
            os.replace(tmp, self.path)

    def done_cells(self) -> set[str]:
        with open(self.path, newline="") as f:
            return {row["cell_id"] for row in csv.DictReader(f)}

    def append(self, cell_id: str, rows: list[dict[str, Any]]) -> None:
        """Append every row of one finished cell at once."""
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
        buf = io.StringIO()
        writer = csv.writer(buf)
        for row in rows:
            unknown = {k: v for k, v in row.items() if k not in COLUMNS}
            full = {**{k: v for k, v in row.items() if k in COLUMNS}, "run_id": self.run_id,
                    "cell_id": cell_id, "cell_rows": len(rows), "schema": SCHEMA_VERSION, "time": stamp}
            if unknown:
                full["extra"] = json.dumps(unknown, sort_keys=True, default=str)
            writer.writerow([_cell(full.get(c)) for c in COLUMNS])
        with open(self.path, "a", newline="") as f:
            f.write(buf.getvalue())
            f.flush()
            os.fsync(f.fileno())

    def frame(self) -> pd.DataFrame:
        return pd.read_csv(self.path)

    def write_json(self, name: str, payload: dict[str, Any]) -> None:
        tmp = self.dir / f".{name}.tmp"
        tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n")
        os.replace(tmp, self.dir / name)
