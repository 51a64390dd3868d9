"""CI gate on scaling: every registered model, a small grid of n in one process. It asserts FLOP exponents,
forward-time exponents, the time ratio to the Transformer at one n, and the number of dispatched kernels per
token (deterministic: a per-token Python loop dispatches ~100, the chunked forms at most 16): exponents,
ratios and counts from the same run, never absolute times. Each hybrid (MAC, MAG, MAL) is also held to the sum of
its parts (a Transformer step plus an LMM step) at short training shapes, in training FLOPs and in training time
measured interleaved in one run (bench/measuring/hybrid_speed.py, where the issue's tighter targets are judged). Three
self-tests prove it bites: a masked n x n window attention, a token-loop memory and a window attention padded to
whole blocks at short n must each fail it. pytest-benchmark records each model's forward at n = 2048 and each
hybrid's training step at the shortest parts shape (`make test` writes the JSON under results/ci-scaling/)."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import models
from bench.analysing.scaling import fit_power
from bench.measuring.hybrid_speed import HYBRIDS, PARTS, best_times, parts_ratio
from bench.measuring.profile import ProfileConfig, count_flops, make_input, measure_time, step
from models import attention

FLOP_LENGTHS = (512, 1024, 2048, 4096)
TIME_LENGTHS = (1024, 2048, 4096)
RATIO_N = 2048
MAX_RATIO = 30.0  # a linear model may be slower than sdpa attention at 2K by a constant, not by far more
MAX_OPS_PER_TOKEN = 30.0
CFG = ProfileConfig(repeats=3, warmup=1)
PARTS_LENGTHS = (32, 128)  # training shapes where accuracy tasks train; window 64, so one within it, one past it
PARTS_BATCH = 32
MAX_PARTS_FLOP_RATIO = 1.0  # a hybrid does no more work than its two parts (MAG 0.87 at n = 32; padded window 1.06)
MAX_PARTS_TIME_RATIO = 1.5  # hybrid_speed.py's target is 1.3; the gate leaves room for a shared runner's noise

pytestmark = pytest.mark.slow


class OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        return func(*args, **(kwargs or {}))


def ops_per_token(model, n: int = 1024) -> float:
    x = make_input(model, 1, n, "cpu")
    with torch.inference_mode(), OpCounter() as counter:
        model(x)
    return counter.ops / n


def exponent(lengths, values) -> float:
    return fit_power(lengths, values, fraction=1.0).exponent


@pytest.fixture(scope="module")
def transformer_time():
    torch.set_num_threads(2)
    return measure_time(models.build("transformer"), RATIO_N, "forward", CFG, "cpu")[0]["value"]


def check_scaling(model, transformer_time: float) -> dict:
    flops = [count_flops(model, n, "forward", CFG, "cpu")[0]["value"] for n in FLOP_LENGTHS]
    info = {"flop_exponent": exponent(FLOP_LENGTHS, flops)}
    if model.complexity.time == "n^2":
        assert info["flop_exponent"] > 1.6, info
        return info
    assert info["flop_exponent"] < 1.15, info
    info["ops_per_token"] = ops_per_token(model)
    assert info["ops_per_token"] < MAX_OPS_PER_TOKEN, info
    times = [measure_time(model, n, "forward", CFG, "cpu")[0]["value"] for n in TIME_LENGTHS]
    info["time_exponent"] = exponent(TIME_LENGTHS, times)
    info["ratio_to_transformer"] = times[TIME_LENGTHS.index(RATIO_N)] / transformer_time
    assert info["time_exponent"] < 1.35, info
    assert info["ratio_to_transformer"] < MAX_RATIO, info
    return info


@pytest.mark.parametrize("name", models.names())
def test_model_scales_within_its_declared_band(name, benchmark, transformer_time):
    model = models.build(name)
    x = make_input(model, 1, RATIO_N, "cpu")
    benchmark.pedantic(step, args=(model, x, "forward"), rounds=3, warmup_rounds=1)
    benchmark.extra_info.update(check_scaling(model, transformer_time))


def dense_window(q, k, v, window, backend, q_start=0, prefix=None):
    """The regression to catch: sliding-window attention as a masked full matrix."""
    n_q, n_k = q.shape[-2], k.shape[-2]
    i = torch.arange(n_q)[:, None] + (n_k - n_q)
    j = torch.arange(n_k)[None, :]
    return attention.masked_attention(q, k, v, (j <= i) & (j > i - window), backend)


def test_gate_fails_when_window_attention_builds_the_full_matrix(monkeypatch, transformer_time):
    monkeypatch.setattr(attention, "window_attention", dense_window)
    with pytest.raises(AssertionError, match="flop_exponent"):
        check_scaling(models.build("swa"), transformer_time)


def test_gate_fails_when_the_memory_runs_as_a_token_loop(transformer_time):
    with pytest.raises(AssertionError, match="ops_per_token"):
        check_scaling(models.build("lmm", **{"memory.path": "reference"}), transformer_time)


def check_parts(hybrid: str) -> dict:
    """A hybrid's training step over (Transformer step + LMM step): FLOPs (deterministic, batch 2), then time."""
    info = {}
    for n in PARTS_LENGTHS:
        flops = {name: count_flops(models.build(name), n, "train", ProfileConfig(batch=2), "cpu")[0]["value"]
                 for name in (hybrid, *PARTS)}
        info[f"flop_ratio_{n}"] = flops[hybrid] / sum(flops[part] for part in PARTS)
        assert info[f"flop_ratio_{n}"] < MAX_PARTS_FLOP_RATIO, info
    for n in PARTS_LENGTHS:
        info[f"time_ratio_{n}"] = parts_ratio(best_times((hybrid, *PARTS), PARTS_BATCH, n, ("train",), 3), hybrid)
        assert info[f"time_ratio_{n}"] < MAX_PARTS_TIME_RATIO, info
    return info


@pytest.mark.parametrize("hybrid", HYBRIDS)
def test_hybrid_costs_no_more_than_its_parts(hybrid, benchmark):
    torch.set_num_threads(2)
    model = models.build(hybrid)
    x = make_input(model, PARTS_BATCH, PARTS_LENGTHS[0], "cpu")
    benchmark.pedantic(step, args=(model, x, "train"), rounds=3, warmup_rounds=1)
    benchmark.extra_info.update(check_parts(hybrid))


def test_gate_fails_when_window_attention_pads_short_sequences(monkeypatch):
    monkeypatch.setattr(attention, "window_attention", attention.window_attention_padded)
    with pytest.raises(AssertionError, match="flop_ratio_32"):
        check_parts("mag")


def test_declared_bands_cover_every_model():
    for name in models.names():
        assert models.build(name).complexity.time in ("n", "n^2"), name
