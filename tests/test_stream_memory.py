"""What a stream holds at each checkpoint (the state's own bytes beside the process's accounts), and the trained
memory behind claim C6. Tiny shapes: a few hundred tokens, one training step."""

import math

import torch

import models
from bench.measuring import memprobe
from bench.measuring.dynamics import run_dynamics
from bench.measuring.streaming import state_bytes, stream

CHECKPOINTS = [32, 64, 96]


def held(name):
    meter = memprobe.CpuPeak()
    rows = stream(models.build(name).eval(), CHECKPOINTS[-1], 32, CHECKPOINTS, "cpu", 60.0, meter.snapshot)
    return {(r["metric"], r["n"]): r["value"] for r in rows}


def test_a_memory_state_stays_flat_while_a_kv_cache_grows_and_the_process_is_measured_beside_it():
    lmm, transformer = held("lmm"), held("transformer")
    flat = [lmm[("stream_state_bytes", n)] for n in CHECKPOINTS]
    growing = [transformer[("stream_state_bytes", n)] for n in CHECKPOINTS]
    assert flat[0] > 0 and len(set(flat)) == 1
    assert growing[0] <= growing[1] < growing[2]  # the first piece's k, v are views of its fused projection
    metrics = {m for m, _ in lmm}
    assert {"stream_rss_bytes", "stream_peak_bytes", "stream_time_s"} <= metrics
    assert ("stream_heap_used_bytes" in metrics) == bool(memprobe.heap())


def test_state_bytes_count_a_shared_storage_once():
    t = torch.zeros(10, 4)
    assert state_bytes({"a": t, "b": [t[:5], (t[5:],)], "c": 3}) == t.numel() * 4


def test_trained_dynamics_rows_say_so_and_differ_from_the_untrained_layer():
    trained = run_dynamics("stationary", "titans", 64, 16, train_steps=1)
    untrained = run_dynamics("stationary", "titans", 64, 16)
    assert {r["variant"] for r in trained} == {"stationary/titans/trained"}
    assert all(r["trained_steps"] == 1 and math.isfinite(r["train_loss"]) for r in trained)
    assert {r["variant"] for r in untrained} == {"stationary/titans"}
    assert [r["value"] for r in trained] != [r["value"] for r in untrained]
