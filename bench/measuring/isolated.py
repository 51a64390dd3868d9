"""One measurement in a fresh process (`python -m bench.measuring.memprobe '<json request>'`), so that one
point's allocations cannot hide another's: the one place that launches the probe and reads its outcome.

A probe that runs past its time is `timeout`; one the kernel killed (SIGKILL: the OOM killer) or that
reported running out of memory is `oom`; any other failure is `error`, with the probe's last stderr line."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

PROBE = "bench.measuring.memprobe"


class ProbeFailed(RuntimeError):
    """The probe ended without a result; `status` is the row status to record (timeout, oom or error)."""

    def __init__(self, status: str, detail: str):
        super().__init__(detail)
        self.status = status


def run_isolated(request: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    """The probe's JSON result for `request` (see memprobe.main), or ProbeFailed."""
    try:
        out = subprocess.run([sys.executable, "-m", PROBE, json.dumps(request)], capture_output=True, text=True,
                             timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise ProbeFailed("timeout", f"the probe ran past {timeout_s:.0f} s") from None
    if out.returncode != 0:
        detail = out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}"
        oom = out.returncode in (-9, 137) or "out of memory" in out.stderr.lower()
        raise ProbeFailed("oom" if oom else "error", detail)
    return json.loads(out.stdout.strip().splitlines()[-1])
