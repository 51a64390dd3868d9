"""pytest-benchmark records of the memory layer (forward and forward + backward at n = 1024); the speed
targets live in `python -m bench.memory_speed`, never in unit-test assertions."""

import pytest
import torch

from bench.memory_speed import main, matmul_peak_gflops, measure, ours


@pytest.mark.parametrize("chunk", [16, 64])
@pytest.mark.parametrize("mode", ["forward", "train"])
def test_memory_layer_speed(benchmark, chunk, mode):
    torch.set_num_threads(2)
    layer = ours(64, 4, 2, chunk)
    x = torch.randn(4, 1024, 64, requires_grad=mode == "train")

    def run():
        if mode == "forward":
            with torch.inference_mode():
                layer(x)
        else:
            layer(x).square().mean().backward()

    benchmark.pedantic(run, rounds=3, warmup_rounds=1)


def test_speed_script_reports_tokens_per_second_and_flop_rate(capsys):
    assert main(["--lengths", "256", "--chunks", "16", "--repeats", "1", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "matmul peak" in out and "ours" in out
    r = measure(ours(64, 4, 2, 16), 2, 256, 64, 1)
    assert r["fwd_tok_s"] > 0 and r["train_tok_s"] > 0 and 0 < r["fwd_gflops"] < 10 * matmul_peak_gflops(256, 3)
