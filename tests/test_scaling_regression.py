"""CI gate on scaling: every registered model, a small grid of n in one process. It asserts FLOP exponents,
forward-time exponents, the time ratio to the Transformer at one n, and the number of dispatched kernels per
token (deterministic: a per-token Python loop dispatches ~100, the chunked forms at most 16): exponents,
ratios and counts from the same run, never absolute times. Two self-tests prove it bites: a masked n x n
window attention and a token-loop memory must both fail it. pytest-benchmark records each model's forward at n = 2048
(`make test` writes the JSON under results/ci-scaling/)."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import models
from bench.profile import ProfileConfig, count_flops, make_input, measure_time, step
from bench.scaling import fit_power
from models import attention

FLOP_LENGTHS = (512, 1024, 2048, 4096)
TIME_LENGTHS = (1024, 2048, 4096)
RATIO_N = 2048
MAX_RATIO = 30.0  # a linear model may be slower than sdpa attention at 2K by a constant, not by far more
MAX_OPS_PER_TOKEN = 30.0
CFG = ProfileConfig(repeats=3, warmup=1)

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
        check_scaling(models.build("lmm", memory_path="reference"), transformer_time)


def test_declared_bands_cover_every_model():
    for name in models.names():
        assert models.build(name).complexity.time in ("n", "n^2"), name
