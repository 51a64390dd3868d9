"""The results store: `results/<run-id>/results.csv`, one tidy row per measurement, plus env.json.

What it guarantees, whatever is killed or run twice:

- One writer per run folder. `RunStore` holds an exclusive lock (flock on `results.lock`, which names the
  holder's pid, host and command) until `close()` or the process ends (the kernel drops the lock even on
  kill -9, so a stale lock file never blocks). A second writer gets `StoreLocked` naming the holder.
- All rows of one cell are appended in a single write, flushed and fsynced; every row carries `cell_rows`, the
  size of its cell, and the append's time stamp (microseconds). A cell already stored is never appended again.
- Every reader (`read_frame`, the writer's open, report, compare, claims) parses through `_parse`, which never
  trusts the file: a line that is not a whole row (torn tail, a half row that ends in a newline, wrong field
  count, a malformed number of rows or stamp) is skipped; rows are grouped into copies (consecutive rows of one
  cell with one stamp); a copy with fewer rows than it announced is dropped, and of a cell stored more than once
  the first complete copy is kept. A zero-byte or header-only file is an empty run.
- A file written under another column list (an older schema) is read by its own header, the rows mapped by
  column name (blanks for new columns); the writer's open rewrites it under the current header, so later
  appends never misalign.
- The writer's open writes the repaired file back atomically (temp file, fsync, rename) and appends every line
  it dropped to `results.dropped`, so a repair never destroys bytes.

env.json keeps one entry per invocation (`invocations`), the first one's fields also at the top level.
"""

from __future__ import annotations

import csv
import datetime
import fcntl
import io
import json
import math
import os
import re
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

SCHEMA_VERSION = 2  # 2: pairs and distance (mqar's grid and its accuracy by key-to-query distance)
COLUMNS = [
    "run_id", "cell_id", "kind", "model", "task", "variant", "n", "depth", "pairs", "distance", "metric", "value",
    "ci_low", "ci_high", "status", "seed", "params", "state_numel", "device", "threads", "wall_s", "extra", "config",
    "cell_rows", "schema", "time",
]
RESULTS, LOCK, DROPPED, ENV = "results.csv", "results.lock", "results.dropped", "env.json"
STAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,6})?")


class StoreError(RuntimeError):
    """A run folder that cannot be used: unreadable, not a results file, or written by another process."""


class StoreLocked(StoreError):
    pass


def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, dict | list | tuple):
        return json.dumps(value, sort_keys=True, default=list)
    return str(value).replace("\r", "\\r").replace("\n", "\\n")  # one physical line per row


@dataclass
class Parsed:
    """What `_parse` found: the rows kept (as dicts over COLUMNS) and what it left out."""

    rows: list[dict[str, str]] = field(default_factory=list)
    header: list[str] = field(default_factory=lambda: list(COLUMNS))
    dropped: list[bytes] = field(default_factory=list)  # raw lines left out
    torn: int = 0  # lines that are not a whole row
    partial: int = 0  # copies of a cell with fewer rows than announced
    duplicate: int = 0  # complete copies of a cell stored before

    @property
    def clean(self) -> bool:
        return not self.dropped and self.header == COLUMNS

    def summary(self) -> str:
        parts = [f"{k} {v}" for k, v in (("torn line(s)", self.torn), ("partial cell copy(ies)", self.partial),
                                         ("duplicate cell copy(ies)", self.duplicate)) if v]
        if self.header != COLUMNS:
            parts.append("migrated from an older column list")
        return ", ".join(parts)


def _whole_row(fields: list[str], header: list[str]) -> dict[str, str] | None:
    if len(fields) != len(header):
        return None
    row = dict(zip(header, fields, strict=True))
    if not row["cell_id"] or not row["cell_rows"].isdigit() or int(row["cell_rows"]) < 1:
        return None
    if ("schema" in row and not row["schema"].isdigit()) or ("time" in row and not STAMP.fullmatch(row["time"])):
        return None
    return row


def _to_columns(row: dict[str, str]) -> dict[str, str]:
    """A row under the current COLUMNS: blanks for columns its file lacked, unknown columns folded into extra."""
    out = {c: row.get(c, "") for c in COLUMNS}
    unknown = {k: v for k, v in row.items() if k not in COLUMNS and v != ""}
    if unknown:
        try:
            extra = json.loads(out["extra"]) if out["extra"] else {}
        except json.JSONDecodeError:
            extra = {"extra": out["extra"]}
        out["extra"] = json.dumps({**extra, **unknown}, sort_keys=True)
    return out


def _parse(raw: bytes, where: Path) -> Parsed:
    out = Parsed()
    lines = raw.split(b"\n")
    if len(lines) == 1:  # empty, or a header torn before its newline: nothing stored yet
        out.dropped = [lines[0]] if lines[0] else []
        return out
    tail = lines.pop()
    if tail:  # a last line without its newline: torn mid-write
        out.dropped.append(tail)
        out.torn += 1
    try:
        header = next(csv.reader([lines[0].decode().rstrip("\r")], strict=True))
    except (UnicodeDecodeError, csv.Error):
        header = []
    if "cell_id" not in header or "cell_rows" not in header:
        raise StoreError(f"{where} is not a titans-bench results file (its header has no cell_id and cell_rows "
                         f"columns): move it away or give another run folder")
    out.header = header
    rows: list[tuple[dict[str, str], bytes]] = []
    for line in lines[1:]:
        try:
            row = _whole_row(next(csv.reader([line.decode().rstrip("\r")], strict=True), []), header)
        except (UnicodeDecodeError, csv.Error):
            row = None
        if row is None:
            if line.strip():
                out.dropped.append(line)
                out.torn += 1
        else:
            rows.append((row, line))
    done: set[str] = set()
    i = 0
    while i < len(rows):  # copies: consecutive rows of one cell from one append
        key = [rows[i][0].get(c) for c in ("cell_id", "time", "cell_rows")]
        j = i + 1
        while j < len(rows) and [rows[j][0].get(c) for c in ("cell_id", "time", "cell_rows")] == key:
            j += 1
        cell_id, size = key[0], int(key[2])
        copies = [rows[k : min(k + size, j)] for k in range(i, j, size)]
        for copy in copies:
            if len(copy) < size:
                out.partial += 1
            elif cell_id in done:
                out.duplicate += 1
            else:
                done.add(cell_id)
                out.rows += [_to_columns(row) for row, _ in copy]
                continue
            out.dropped += [line for _, line in copy]
        i = j
    return out


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise StoreError(f"no {path.name} in {path.parent}: give a run folder (results/<run-id>)") from None
    except OSError as err:
        raise StoreError(f"cannot read {path}: {err.strerror}") from None


def _csv_text(rows: list[dict[str, str]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def read_frame(run_dir: str | Path) -> pd.DataFrame:
    """The rows of a run as a DataFrame, repaired in memory (the file is left as it is: a writer may hold it)."""
    path = Path(run_dir) / RESULTS
    parsed = _parse(_read(path), path)
    return pd.read_csv(io.StringIO(_csv_text(parsed.rows)))


def _holder() -> dict[str, Any]:
    return {"pid": os.getpid(), "host": socket.gethostname(), "since": _now(), "command": " ".join(sys.argv)}


def _now() -> str:
    return datetime.datetime.now().isoformat(timespec="microseconds")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


class RunStore:
    """The one writer of a run folder. Use as a context manager (or call close()) to release the lock."""

    def __init__(self, run_dir: str | Path):
        self.dir = Path(run_dir)
        self.path = self.dir / RESULTS
        self.run_id = self.dir.name
        self._lock_fd: int | None = None
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            self._lock()
        except StoreError:
            raise
        except OSError as err:
            raise StoreError(f"cannot write to the run folder {self.dir}: {err.strerror}") from None
        try:
            self.repairs = self._repair()
        except OSError as err:
            self.close()
            raise StoreError(f"cannot use {self.path}: {err.strerror}") from None
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> RunStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _lock(self) -> None:
        path = self.dir / LOCK
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 4096, 0).decode(errors="replace")
                os.close(fd)
                raise StoreLocked(self._locked_message(holder)) from None
            try:  # a holder that released in between unlinked this file: lock the one now at the path
                if os.fstat(fd).st_ino == os.stat(path).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(_holder()) + "\n").encode(), 0)
        os.fsync(fd)
        self._lock_fd = fd

    def _locked_message(self, holder: str) -> str:
        try:
            h = json.loads(holder)
            who = f"pid {h['pid']} on {h['host']} (since {h['since']}: {h['command']})"
        except (json.JSONDecodeError, KeyError, TypeError):
            who = "another process"
        return (f"{self.dir} is being written by {who}; two writers would store every cell twice. Wait for it to "
                f"finish (or stop it), then run again.")

    def close(self) -> None:
        if self._lock_fd is not None:
            (self.dir / LOCK).unlink(missing_ok=True)
            os.close(self._lock_fd)
            self._lock_fd = None

    def _repair(self) -> Parsed:
        """Make the file on disk what `_parse` reads: the current header and whole, first copies only."""
        raw = self.path.read_bytes() if self.path.exists() else b""
        parsed = _parse(raw, self.path)
        unknown = [c for c in parsed.header if c not in COLUMNS]
        if unknown:
            raise StoreError(f"{self.path} has columns {unknown} this version does not know (written by a newer "
                             "titans-bench?): update, or write to another run folder")
        if not raw or not parsed.clean:
            if parsed.dropped:
                with open(self.dir / DROPPED, "ab") as f:
                    f.write(f"# {_now()} dropped on open: {parsed.summary()}\n".encode())
                    f.write(b"".join(line + b"\n" for line in parsed.dropped))
                    f.flush()
                    os.fsync(f.fileno())
            _replace(self.path, _csv_text(parsed.rows).encode())
        self._done = {row["cell_id"] for row in parsed.rows}
        return parsed

    def done_cells(self) -> set[str]:
        return set(self._done)

    def append(self, cell_id: str, rows: list[dict[str, Any]]) -> bool:
        """Append every row of one finished cell at once; False (nothing written) if the cell is stored already."""
        if self._lock_fd is None:
            raise StoreError(f"the store of {self.dir} is closed")
        if cell_id in self._done:
            return False
        stamp = _now()
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
        self._done.add(cell_id)
        return True

    def frame(self) -> pd.DataFrame:
        return read_frame(self.dir)

    def invocations(self) -> list[dict[str, Any]]:
        """One entry per command that wrote to this run, oldest first (a legacy env.json counts as one)."""
        path = self.dir / ENV
        if not path.exists():
            return []
        try:
            env = json.loads(path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError):  # keep its bytes, start a new history
            os.replace(path, path.with_name(f"{ENV}.unreadable-{_now()}"))
            return []
        return env.get("invocations") or [{k: v for k, v in env.items() if k != "invocations"}]

    def record_invocation(self, payload: dict[str, Any]) -> None:
        """Add this invocation to env.json's history (never overwriting an earlier one)."""
        history = [*self.invocations(), {"started": _now(), **payload}]
        _replace(self.dir / ENV, (json.dumps({**history[0], "invocations": history}, indent=2, default=str)
                                  + "\n").encode())
