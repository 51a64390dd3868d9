"""The fresh process of one memory measurement (launched by bench.measuring.isolated):
`python -m bench.measuring.memprobe '<json request>'`, the request being {"cell": a memory profile or stream cell
as Cell.as_dict writes it, "mode": the profile mode to measure (forward or train; null for a stream), "device",
"threads"} (built by profile.measure_memory and streaming.measure_stream).
Prints one JSON line: peak_bytes (above the baseline), baseline_bytes, probe (which counter was used).
A fresh process per point keeps one point's allocations from hiding another's.

A stream also reports, at each checkpoint, what the process holds (`snapshot`), all above the baseline taken after
the model is built: `stream_rss_bytes` (resident memory now; on GPU the bytes allocated now), and the allocator's
own accounts, `stream_heap_used_bytes` (bytes handed out: glibc's uordblks + hblkhd; on GPU memory_allocated) and
`stream_heap_free_bytes` (bytes the allocator holds but has not handed out: glibc's fordblks; on GPU reserved -
allocated). Beside the bytes the state's tensors own (bench.measuring.streaming), they tell state growth from
allocator retention: a peak that grows while the state and the used heap stay flat is the allocator or the
libraries, not the memory."""

from __future__ import annotations

import ctypes
import json
import resource
import sys
from pathlib import Path

import torch

import models
from bench.cells import Cell
from bench.measuring.profile import make_input, step
from bench.measuring.streaming import stream
from bench.metrics import STREAM_HEAP_FREE_BYTES, STREAM_HEAP_USED_BYTES, STREAM_PEAK_BYTES, STREAM_RSS_BYTES


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def heap() -> dict[str, int]:
    """glibc's malloc accounts (empty where mallinfo2 is missing: another libc, glibc < 2.33)."""
    try:
        info = ctypes.CDLL(None).mallinfo2
    except (AttributeError, OSError):
        return {}
    info.restype = _MallInfo2
    m = info()
    return {STREAM_HEAP_USED_BYTES: m.uordblks + m.hblkhd, STREAM_HEAP_FREE_BYTES: m.fordblks}


def _above(now: dict[str, int], base: dict[str, int]) -> dict[str, int]:
    return {k: v - base.get(k, 0) for k, v in now.items()}


class CpuPeak:
    """Peak RSS above a baseline. Resets the kernel's high-water mark (clear_refs 5) where allowed;
    otherwise falls back to getrusage, whose peak includes everything before the baseline."""

    def __init__(self):
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.probe = "VmHWM"
        except OSError:
            self.probe = "ru_maxrss"
        self.baseline = _status_kb("VmRSS") * 1024
        self.heap = heap()

    def snapshot(self) -> dict[str, int]:
        return {STREAM_PEAK_BYTES: self.peak(), STREAM_RSS_BYTES: _status_kb("VmRSS") * 1024 - self.baseline,
                **_above(heap(), self.heap)}

    def peak(self) -> int:
        if self.probe == "VmHWM":
            top = _status_kb("VmHWM") * 1024
        else:
            top = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return max(0, top - self.baseline)


class CudaPeak:
    probe = "max_memory_allocated"

    def __init__(self):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        self.baseline = torch.cuda.memory_allocated()
        self.reserved = torch.cuda.memory_reserved()

    def snapshot(self) -> dict[str, int]:
        torch.cuda.synchronize()
        allocated = torch.cuda.memory_allocated()
        free = torch.cuda.memory_reserved() - allocated - (self.reserved - self.baseline)
        return {STREAM_PEAK_BYTES: self.peak(), STREAM_RSS_BYTES: allocated - self.baseline,
                STREAM_HEAP_USED_BYTES: allocated - self.baseline, STREAM_HEAP_FREE_BYTES: free}

    def peak(self) -> int:
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - self.baseline


def main(request: dict) -> dict:
    torch.set_num_threads(request["threads"])
    device, mode, cell = request["device"], request["mode"], Cell.from_dict(request["cell"])
    run = cell.run_config
    torch.manual_seed(0)
    model = models.build(cell.model, **cell.model_config).to(device)
    if cell.kind == "stream":
        meter = CudaPeak() if device.startswith("cuda") else CpuPeak()
        rows = stream(model, run.total, run.piece, list(run.checkpoints), device, run.budget_s, meter.snapshot)
        return {"rows": rows, "baseline_bytes": meter.baseline, "probe": meter.probe}
    batch = run.profile.batch
    x = make_input(model, batch, run.n, device)
    if mode == "train":
        step(model, make_input(model, batch, 8, device), "train")  # allocate grads before the baseline
    meter = CudaPeak() if device.startswith("cuda") else CpuPeak()
    step(model, x, mode)
    return {"peak_bytes": meter.peak(), "baseline_bytes": meter.baseline, "probe": meter.probe}


if __name__ == "__main__":
    print(json.dumps(main(json.loads(sys.argv[1]))))
