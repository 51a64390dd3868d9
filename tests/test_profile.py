import pandas as pd
import pytest

import models
from bench.cells import Cell, ProfileRun
from bench.cli import main
from bench.measuring.profile import ProfileConfig, count_flops, profile_point
from bench.measuring.streaming import stream


def test_both_attention_backends_report_equal_flops():
    cfg = ProfileConfig()
    naive = count_flops(models.build("transformer-naive"), 512, "forward", cfg, "cpu")[0]["value"]
    sdpa = count_flops(models.build("transformer"), 512, "forward", cfg, "cpu")[0]["value"]
    train_naive = count_flops(models.build("transformer-naive"), 256, "train", cfg, "cpu")[0]["value"]
    train_sdpa = count_flops(models.build("transformer"), 256, "train", cfg, "cpu")[0]["value"]
    assert naive == sdpa > 0
    # backward: the fused kernel recomputes the scores (5 products instead of 4), so it may count more
    forward_256 = count_flops(models.build("transformer"), 256, "forward", cfg, "cpu")[0]["value"]
    assert train_sdpa >= train_naive > 2 * forward_256


@pytest.mark.parametrize("name", models.names())
def test_flops_grow_linearly_for_linear_models_and_quadratically_for_attention(name):
    model, cfg = models.build(name), ProfileConfig()
    small, large = (count_flops(model, n, "forward", cfg, "cpu")[0]["value"] for n in (1024, 4096))
    exponent = __import__("math").log(large / small, 4)
    if model.complexity.time == "n^2":
        assert exponent > 1.5
    else:
        assert exponent < 1.1


def test_fresh_process_memory_shows_the_naive_n2_term():
    run = ProfileRun(2048, "memory", ("forward",))
    naive = profile_point(Cell("transformer-naive", run), "cpu", 1)[0]
    sdpa = profile_point(Cell("transformer", run), "cpu", 1)[0]
    assert naive["status"] == sdpa["status"] == "ok"
    assert naive["value"] > 3 * sdpa["value"]  # 4 heads x 2048^2 x 4 B x 2 = 134 MB of scores


def test_points_over_budget_are_recorded_and_larger_n_skipped(tmp_path):
    code = main(["profile", "--models", "transformer-naive,swa", "--lengths", "256,512,1024,2048", "--metrics",
                 "time", "--modes", "train", "--memory-budget-mb", "60", "--repeats", "1", "--threads", "1",
                 "--run-dir", str(tmp_path)])
    assert code == 0
    df = pd.read_csv(tmp_path / "results.csv")
    naive = df[(df.model == "transformer-naive") & df.metric.str.startswith("time")].set_index("n")["status"]
    # 2 layers x 4 matrices x 4 heads x 1024^2 x 4 B = 134 MB > 60 MB
    assert naive[256] == "ok" and naive[1024] == "oom" and naive[2048] == "skipped"
    assert set(df[df.status == "skipped"]["metric"]) == {"time_train_s"}  # a skipped point names what it skipped
    assert (df[df.model == "swa"]["status"] == "ok").all()


def test_stream_keeps_state_and_reports_each_checkpoint():
    rows = stream(models.build("lmm"), 3000, 700, [1000, 3000], "cpu", 60, lambda: {"stream_peak_bytes": 123})
    got = {(r["n"], r["metric"]) for r in rows}
    assert {(1000, "stream_time_s"), (3000, "stream_peak_bytes"), (3000, "stream_tokens_per_s")} <= got


def test_profile_cli_rejects_bad_lengths_and_models():
    with pytest.raises(SystemExit) as err:
        main(["profile", "--lengths", "9:3"])
    assert err.value.code == 2
    with pytest.raises(SystemExit) as err:
        main(["profile", "--models", "gpt"])
    assert err.value.code == 2
