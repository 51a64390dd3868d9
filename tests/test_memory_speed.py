"""pytest-benchmark records of the memory layer (forward and forward + backward at n = 1024); the speed
side-by-side numbers come from the developer script `python -m tools.memory_speed`, never from unit-test
assertions."""

import pytest
import torch

from models.memory import native
from tools.memory_speed import breakdown, comparisons, main, matmul_peak_gflops, measure_cell, ours


@pytest.mark.parametrize("kernel", ["native", "torch"])
@pytest.mark.parametrize("chunk", [16, 64])
@pytest.mark.parametrize("mode", ["forward", "train"])
def test_memory_layer_speed(benchmark, chunk, mode, kernel):
    if kernel == "native" and not native.available():
        pytest.skip("no C++ compiler: the compiled scan is unavailable")
    torch.set_num_threads(2)
    layer = ours(64, 4, 2, chunk, kernel=kernel)
    x = torch.randn(4, 1024, 64, requires_grad=mode == "train")

    def run():
        if mode == "forward":
            with torch.inference_mode():
                layer(x)
        else:
            layer(x).square().mean().backward()

    benchmark.pedantic(run, rounds=3, warmup_rounds=1)


def test_speed_script_reports_tokens_per_second_and_flop_rate(capsys):
    assert main(["--lengths", "256", "--chunks", "16", "--repeats", "1", "--threads", "1", "--breakdown"]) == 0
    out = capsys.readouterr().out
    assert "matmul peak" in out and "ours" in out and "fwd GFLOP " in out
    assert "training step of ours, chunk 16, n=256" in out
    r = measure_cell({"ours": ours(64, 4, 2, 16)}, 2, 256, 64, 1)["ours"]
    assert r["fwd_tok_s"] > 0 and r["train_tok_s"] > 0 and 0 < r["fwd_gflops"] < 10 * matmul_peak_gflops(256, 3)
    assert r["fwd_gflop"] == pytest.approx(r["fwd_gflops"] * 2 * 256 / r["fwd_tok_s"])  # work = rate x time


def test_breakdown_shares_out_a_training_step_over_its_operators():
    total, top = breakdown(ours(64, 4, 2, 16, kernel="torch"), 2, 64, 64)
    names = [name for name, _ in top]
    assert "KeyScanBackward" in names and "aten::mm" in names  # the torch loops' backward, the projections
    assert 0 < sum(ms for _, ms in top) <= total


def test_comparisons_state_flatness_and_ratios_from_the_measured_numbers():
    def cell(fwd, train):
        return {"fwd_tok_s": fwd, "train_tok_s": train, "fwd_gflops": 1.0}

    results = {("ours", 16, 1024): cell(100, 50), ("ours", 16, 4096): cell(90, 30), ("ours", 16, 16384): cell(85, 45),
               ("titans-pytorch", 16, 4096): cell(80, 10), ("titans-pytorch", 16, 16384): cell(80, 30),
               ("titans-pytorch/anchored", 16, 4096): cell(10, 5)}
    lines = comparisons(results)
    assert lines[0] == "chunk 16: forward tokens/s over n = 1024..16384: slowest 15% below fastest"
    assert lines[1] == "chunk 16: forward+backward tokens/s over n = 1024..16384: slowest 40% below fastest"
    assert lines[2] == "chunk 16: at n=4096, ours over titans-pytorch: forward 1.12x, forward+backward 3.00x"
    assert lines[3] == "chunk 16: at n=16384, ours over titans-pytorch: forward 1.06x, forward+backward 1.50x"
    assert lines[4] == "chunk 16: at n=4096, ours over titans-pytorch/anchored: forward 9.00x, forward+backward 6.00x"
    assert len(lines) == 5 and not any("target" in line for line in lines)
