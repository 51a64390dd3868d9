"""One measurement in a fresh process (`python -m bench.measuring.memprobe '<json request>'`), so that one
point's allocations cannot hide another's: the one place that launches the probe and reads its outcome.

The probe's allocator is pinned: glibc by default raises its mmap threshold each time a large block is freed
(up to 32 MiB), after which tensors of a few MiB come from the heap, whose free lists the peak RSS then counts
too, by an amount that depends on the order of earlier frees. Measured (transformer, batch 1, training step,
n = 2896 / 4096 / 5793 / 8192): 55.7 / 86.2 / 130.2 / 176.1 MiB with the default (ratios 1.55, 1.51, 1.35 per
sqrt(2) step, and 93.6 / 121.3 MiB at 4096 / 5793 in another run) against 48.5 / 68.5 / 96.5 / 136.6 MiB with
the threshold fixed at 128 KiB (1.41, 1.41, 1.42): every block above it is mapped and unmapped on its own, so
the peak follows the bytes alive. Only the probe process is pinned; timed code runs with the default allocator.

A probe that runs past its time is `timeout`; one the kernel killed (SIGKILL: the OOM killer) or that
reported running out of memory is `oom`; any other failure is `error`, with the probe's last stderr line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

PROBE = "bench.measuring.memprobe"
PINNED_ALLOCATOR = {"MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}  # glibc's fixed threshold (see above)


class ProbeFailed(RuntimeError):
    """The probe ended without a result; `status` is the row status to record (timeout, oom or error)."""

    def __init__(self, status: str, detail: str):
        super().__init__(detail)
        self.status = status


def run_isolated(request: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    """The probe's JSON result for `request` (see memprobe.main), or ProbeFailed."""
    try:
        out = subprocess.run([sys.executable, "-m", PROBE, json.dumps(request)], capture_output=True, text=True,
                             timeout=timeout_s, env={**os.environ, **PINNED_ALLOCATOR})
    except subprocess.TimeoutExpired:
        raise ProbeFailed("timeout", f"the probe ran past {timeout_s:.0f} s") from None
    if out.returncode != 0:
        detail = out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}"
        oom = out.returncode in (-9, 137) or "out of memory" in out.stderr.lower()
        raise ProbeFailed("oom" if oom else "error", detail)
    return json.loads(out.stdout.strip().splitlines()[-1])
