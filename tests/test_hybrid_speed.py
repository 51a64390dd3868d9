"""The hybrid speed script on tiny shapes (its targets are judged on a quiet machine, never in unit tests)."""

from bench.measuring.hybrid_speed import long_lines, main, parts_lines, parts_ratio


def test_script_prints_every_ratio_the_issue_asks_for(capsys):
    assert main(["--long-n", "96", "--short-lengths", "16,80", "--batch", "2", "--repeats", "1", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "MAC / MAG forward at n=96" in out and "MAC / MAG training step at n=96" in out
    for hybrid in ("MAC", "MAG", "MAL"):
        for n in (16, 80):
            assert f"{hybrid} / (transformer + lmm) training step at batch 2, n={n}: " in out


def test_ratios_and_verdicts_come_from_the_measured_times():
    times = {("mac", "forward"): 3.0, ("mag", "forward"): 1.0, ("mac", "train"): 1.5, ("mag", "train"): 1.0,
             ("transformer", "train"): 1.0, ("lmm", "train"): 3.0, ("mal", "train"): 6.0}
    assert parts_ratio(times, "mag") == 0.25
    assert long_lines(times, 16384) == ["MAC / MAG forward at n=16384: 3.00x -- target within 2x: missed",
                                        "MAC / MAG training step at n=16384: 1.50x -- target within 2x: met"]
    lines = parts_lines(times, 32, 128)
    assert lines[0] == "MAC / (transformer + lmm) training step at batch 32, n=128: 0.38x (reported)"
    assert lines[1].endswith("0.25x -- target within 1.3x: met")
    assert lines[2].endswith("1.50x -- target within 1.3x: missed")
