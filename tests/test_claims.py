"""The claims ledger says no: for every claim, synthetic rows that make it say supported, contradicted,
inconclusive and not measured (each verdict the rule can give), the cells behind each verdict listed, and a run
full of failed rows (oom, diverged, error, timeout, skipped) that must not crash any rule. No model is trained
or timed: the rows are built by hand from known curves."""

import json
import math
import zlib

import numpy as np
import pandas as pd
import pytest

import models
from bench.analysing import claims
from bench.analysing.evidence import CONTRADICTED, INCONCLUSIVE, NOT_MEASURED, SUPPORTED, VERDICTS
from bench.running.store import COLUMNS
from models import lmm, titans
from models.registry import ModelSpec

NS = [1024, 1448, 2048, 2896, 4096, 5793, 8192, 11585, 16384]
STREAM = [65536, 262144, 1048576, 2097152]


def row(model, metric, n, value, kind="profile", status="ok", seed=0, cell=None, samples=None, **more):
    base = {c: np.nan for c in COLUMNS}
    base.update(kind=kind, model=model, n=n, metric=metric, value=value, status=status, seed=seed,
                cell_id=cell or f"{kind}-{model}-{metric}-{n}-{seed}",
                extra=json.dumps({"samples": samples} if samples else {}))
    base.update(more)
    return base


def curve(model, metric, f, ns=NS, noise=0.01, repeats=3, kind="profile", seed=0, edge=0.0):
    """Rows of y = f(n) with multiplicative noise; time metrics keep every repeat (as the time probe does).
    edge > 0 puts a curve exactly on a band's edge with a symmetric spread (so its interval straddles the edge):
    repeats f(n) exp(-edge, 0, +edge), or one point per n alternately above and below f(n)."""
    rng = np.random.default_rng(zlib.crc32(f"{model} {metric} {seed}".encode()))
    out = []
    for i, n in enumerate(ns):
        if edge:
            spread = (-edge, 0.0, edge) if repeats > 1 else (edge * (-1) ** i,)
            values = [float(f(n) * math.exp(e)) for e in spread]
        else:
            values = [float(f(n) * math.exp(rng.normal(0, noise))) for _ in range(repeats)]
        keep = values if metric.startswith("time") else None
        out.append(row(model, metric, n, float(np.median(values)), kind=kind, samples=keep))
    return out


def failed(model, metric, status, ns=NS, kind="profile"):
    return [row(model, metric, n, float("nan"), kind=kind, status=status) for n in ns]


def frame(*parts):
    return pd.DataFrame([r for p in parts for r in p], columns=COLUMNS)


def quad(c=1e-9):
    return lambda n: c * n * n


def lin(c=1e-6):
    return lambda n: c * n


def power(p, c=1e-6):
    return lambda n: c * n**p


def judge(rule, df):
    out = rule(df.reindex(columns=COLUMNS))
    return out[0][1] if isinstance(out, list) else out


def attention(time_f, flops_f=None, model="transformer", **kw):
    return [*curve(model, "time_forward_s", time_f, **kw), *curve(model, "flops_forward", flops_f or time_f, repeats=1)]


# --- C1 -----------------------------------------------------------------------------------------------------

C1_CASES = {
    SUPPORTED: lambda: frame(attention(quad())),
    CONTRADICTED: lambda: frame(attention(lin())),
    INCONCLUSIVE: lambda: frame(curve("transformer", "time_forward_s", quad()),  # FLOP rows all failed
                                failed("transformer", "flops_forward", "error")),
    NOT_MEASURED: lambda: frame(failed("transformer", "time_forward_s", "oom"), curve("lmm", "time_forward_s", lin())),
}


@pytest.mark.parametrize("verdict", list(C1_CASES))
def test_c1_reaches_each_verdict_from_time_and_flops_together(verdict):
    j = judge(claims.c1, C1_CASES[verdict]())
    assert j.verdict == verdict, j.evidence
    if verdict != NOT_MEASURED:
        assert "transformer" in j.evidence and any("time_forward_s" in c for c in j.cells)


def test_c1_time_alone_cannot_support_when_flops_are_linear():
    assert judge(claims.c1, frame(attention(quad(), lin()))).verdict == CONTRADICTED


# --- C2 -----------------------------------------------------------------------------------------------------

C2_CASES = {
    SUPPORTED: lambda: frame(curve("transformer-naive", "memory_train_bytes", quad(4.0), repeats=1)),
    CONTRADICTED: lambda: frame(curve("transformer", "memory_train_bytes", lin(300.0), repeats=1)),
    INCONCLUSIVE: lambda: frame(curve("transformer-naive", "memory_train_bytes", power(1.7, 30.0), edge=0.1,
                                      repeats=1)),
    NOT_MEASURED: lambda: frame(failed("transformer-naive", "memory_train_bytes", "oom")),
}


@pytest.mark.parametrize("verdict", list(C2_CASES))
def test_c2_reaches_each_verdict_per_attention_model(verdict):
    j = judge(claims.c2, C2_CASES[verdict]())
    assert j.verdict == verdict, j.evidence


def test_c2_gives_one_row_per_attention_model_with_its_declared_memory():
    rows = claims.c2(frame(curve("transformer-naive", "memory_train_bytes", quad(4.0), repeats=1),
                           curve("transformer", "memory_train_bytes", lin(300.0), repeats=1)).reindex(columns=COLUMNS))
    got = {text: j.verdict for text, j in rows}
    assert got == {"Transformer memory O(n^2): transformer (declares n)": CONTRADICTED,
                   "Transformer memory O(n^2): transformer-naive (declares n^2)": SUPPORTED}


# --- C3 -----------------------------------------------------------------------------------------------------

C3_CASES = {
    SUPPORTED: lambda: frame(curve("lmm", "time_forward_s", lin()), curve("mac", "time_forward_s", lin(2e-6))),
    CONTRADICTED: lambda: frame(curve("lmm", "time_forward_s", lin()), curve("mac", "time_forward_s", quad())),
    INCONCLUSIVE: lambda: frame(curve("lmm", "time_forward_s", lin()), failed("mac", "time_forward_s", "error")),
    NOT_MEASURED: lambda: frame(curve("transformer", "time_forward_s", quad())),
}


@pytest.mark.parametrize("verdict", list(C3_CASES))
def test_c3_reaches_each_verdict_and_one_quadratic_titans_model_contradicts(verdict):
    j = judge(claims.c3, C3_CASES[verdict]())
    assert j.verdict == verdict, j.evidence
    if verdict in (SUPPORTED, CONTRADICTED):
        assert "best class" in j.evidence


def test_c3_judges_a_model_registered_later_without_editing_the_rules(monkeypatch):
    monkeypatch.setitem(models.MODELS, "lmm-twin", ModelSpec("lmm-twin", lmm.LMM, titans.TitansConfig, "a copy",
                                                             "memory"))
    j = judge(claims.c3, frame(curve("lmm", "time_forward_s", lin()), curve("lmm-twin", "time_forward_s", quad())))
    assert j.verdict == CONTRADICTED and "lmm-twin" in j.evidence


# --- C4 -----------------------------------------------------------------------------------------------------

def stream_rows(model="lmm", state=lambda n: 2e6, ns=STREAM, rss=lambda n: 1e8 * (1 + n / 1e7), edge=0.0):
    return [*curve(model, "stream_state_bytes", state, ns=ns, noise=0.0, repeats=1, kind="stream", edge=edge),
            *curve(model, "stream_rss_bytes", rss, ns=ns, noise=0.0, repeats=1, kind="stream"),
            *curve(model, "stream_time_s", lambda n: n / 1e4, ns=ns, noise=0.0, repeats=1, kind="stream")]


C4_CASES = {
    SUPPORTED: lambda: frame(curve("lmm", "memory_train_bytes", lin(500.0), repeats=1), stream_rows()),
    CONTRADICTED: lambda: frame(curve("lmm", "memory_train_bytes", lin(500.0), repeats=1),
                                stream_rows(state=lin(8.0))),
    INCONCLUSIVE: lambda: frame(curve("lmm", "memory_train_bytes", lin(500.0), repeats=1),
                                failed("lmm", "stream_state_bytes", "error", ns=STREAM, kind="stream")),
    NOT_MEASURED: lambda: frame(curve("lmm", "stream_peak_bytes", lambda n: 1.1e8, ns=[16384, 65536], repeats=1,
                                      kind="stream")),  # the old bug: no train rows, streaming below 256K only
}


@pytest.mark.parametrize("verdict", list(C4_CASES))
def test_c4_reaches_each_verdict_and_judges_the_state_not_the_peak(verdict):
    j = judge(claims.c4, C4_CASES[verdict]())
    assert j.verdict == verdict, j.evidence
    if verdict == SUPPORTED:
        assert "stream_state_bytes" in j.evidence and "RSS" in j.evidence  # the RSS shown beside the state


# --- C5 -----------------------------------------------------------------------------------------------------

C5_CASES = {
    SUPPORTED: lambda: frame(curve("transformer", "time_forward_s", quad()), curve("lmm", "time_forward_s", lin())),
    CONTRADICTED: lambda: frame(curve("transformer", "time_forward_s", lin()), curve("lmm", "time_forward_s", lin())),
    INCONCLUSIVE: lambda: frame(curve("transformer", "time_forward_s", power(1.1), edge=0.1),
                                curve("lmm", "time_forward_s", lin(), edge=0.1)),
    NOT_MEASURED: lambda: frame(curve("transformer", "time_forward_s", quad())),
}


@pytest.mark.parametrize("verdict", list(C5_CASES))
def test_c5_reaches_each_verdict_from_the_ratio_slope_interval(verdict):
    j = judge(claims.c5, C5_CASES[verdict]())
    assert j.verdict == verdict, j.evidence


# --- C6, C7, C8: dynamics -------------------------------------------------------------------------------------

WINDOWS = [128 * (i + 1) for i in range(16)]


def dyn(variant, metric, per_seed, status="ok"):
    """Dynamics rows: per_seed maps a seed to the value at each window end."""
    return [row("lmm", metric, n, float(v), kind="dynamics", variant=variant, seed=seed, status=status,
                cell=f"dyn-{variant}-{seed}")
            for seed, values in per_seed.items() for n, v in zip(WINDOWS, values, strict=True)]


def decaying(rate_per_stream, start=0.0135):
    return [start * math.exp(-rate_per_stream * n / WINDOWS[-1]) for n in WINDOWS]


PLATEAU = [0.0135, 0.0067] + [0.0065 * (1 + 0.01 * ((i % 3) - 1)) for i in range(14)]  # issue 16's numbers
TRAINED = "stationary/titans/trained"

C6_CASES = {
    SUPPORTED: lambda: frame(dyn(TRAINED, "surprise_norm", {s: decaying(3 * math.log(2)) for s in range(3)})),
    CONTRADICTED: lambda: frame(dyn(TRAINED, "surprise_norm", {s: [v * (1 + 0.05 * s) for v in PLATEAU]
                                                             for s in range(3)})),
    INCONCLUSIVE: lambda: frame(dyn(TRAINED, "surprise_norm", {0: decaying(3 * math.log(2)), 1: [0.01] * 16,
                                                             2: decaying(3 * math.log(2))})),
    NOT_MEASURED: lambda: frame(dyn("stationary/titans", "surprise_norm", {0: decaying(3.0)})),  # untrained only
}


@pytest.mark.parametrize("verdict", list(C6_CASES))
def test_c6_reaches_each_verdict_from_the_decay_rate_over_seeds(verdict):
    j = judge(claims.c6, C6_CASES[verdict]())
    assert j.verdict == verdict, j.evidence
    if verdict != NOT_MEASURED:
        assert "3 seed(s)" in j.evidence and j.cells == tuple(f"dyn-{TRAINED}-{s}" for s in range(3))


def test_c6_calls_a_transient_then_a_plateau_contradicted_whatever_the_first_to_last_ratio():
    assert PLATEAU[-1] / PLATEAU[0] < 0.5  # the old rule's "supported"
    assert judge(claims.c6, frame(dyn(TRAINED, "surprise_norm", {0: PLATEAU}))).verdict == CONTRADICTED


def test_c6_a_diverged_seed_contradicts():
    rows = dyn(TRAINED, "surprise_norm", {0: decaying(3.0)}) + dyn(TRAINED, "surprise_norm", {1: [math.nan] * 16},
                                                                    status="diverged")
    assert judge(claims.c6, frame(rows)).verdict == CONTRADICTED


SEED = "stationary/seed"
C7_CASES = {
    SUPPORTED: lambda: frame(dyn(SEED, "inner_loss", {s: decaying(0.7, 2.0) for s in range(3)})),
    CONTRADICTED: lambda: frame(dyn(SEED, "inner_loss", {s: [2.0 + 0.01 * (i % 2) for i in range(16)]
                                                         for s in range(3)})),
    INCONCLUSIVE: lambda: frame(dyn(SEED, "inner_loss", {0: decaying(0.7, 2.0), 1: [2.0] * 16})),
    NOT_MEASURED: lambda: frame(dyn("stationary/titans", "inner_loss", {0: decaying(0.7, 2.0)})),
}


@pytest.mark.parametrize("verdict", list(C7_CASES))
def test_c7_reaches_each_verdict_from_the_fitted_fall_of_the_inner_loss(verdict):
    j = judge(claims.c7, C7_CASES[verdict]())
    assert j.verdict == verdict, j.evidence
    assert "wipes" not in j.evidence  # no mechanism asserted that the rows do not show


def test_c7_a_seed_rule_loss_that_ends_in_nan_is_contradicted_not_inconclusive():
    rows = dyn(SEED, "inner_loss", {0: decaying(0.7, 2.0)})
    rows[-1].update(value=math.nan, status="diverged")
    assert judge(claims.c7, frame(rows)).verdict == CONTRADICTED


def saturating(n):
    return 5.0 * (1 - math.exp(-n / 200)) + 0.1


C8_CASES = {
    SUPPORTED: lambda: frame(dyn("stationary/titans", "memory_norm", {s: [saturating(n) for n in WINDOWS]
                                                                      for s in range(2)})),
    CONTRADICTED: lambda: frame(dyn("stationary/titans", "memory_norm", {0: [n**0.5 for n in WINDOWS]})),
    INCONCLUSIVE: lambda: frame(dyn("stationary/titans", "memory_norm", {0: [n**0.2 for n in WINDOWS]})),
    NOT_MEASURED: lambda: frame(dyn("stationary/titans", "memory_norm", {0: [1.0] * 16})[:3]),
}


@pytest.mark.parametrize("verdict", list(C8_CASES))
def test_c8_reaches_each_verdict_from_the_growth_exponent(verdict):
    j = judge(claims.c8, C8_CASES[verdict]())
    assert j.verdict == verdict, j.evidence


# --- C9 (per-model seed ranges: tests/test_accuracy.py) --------------------------------------------------------

def test_c9_lists_failed_training_seeds_and_still_compares_the_rest():
    def acc(model, value, seed, status="ok"):
        return row(model, "exact_match", 64, value, kind="train", task="copy", seed=seed, status=status,
                   extra=json.dumps({"samples": 100}))
    rows = [acc("lmm", 0.95, 0), acc("lmm", 0.9, 1), acc("transformer", 0.5, 0), acc("transformer", 0.55, 1),
            row("mal", "train_loss", np.nan, math.nan, kind="train", task="copy", status="diverged")]
    j = judge(claims.c9, frame(rows))
    assert j.verdict == SUPPORTED and "mal: 1 of 1 seed(s) diverged" in j.evidence and j.cells


# --- C10 ----------------------------------------------------------------------------------------------------

C10_CASES = {
    SUPPORTED: lambda: frame(stream_rows()),
    CONTRADICTED: lambda: frame(stream_rows(state=lin(8.0))),
    INCONCLUSIVE: lambda: frame(stream_rows(state=power(0.1, 1e5), edge=0.1)),
    NOT_MEASURED: lambda: frame(stream_rows(ns=STREAM[:2])),  # bounded, but short of 2M tokens
}


@pytest.mark.parametrize("verdict", list(C10_CASES))
def test_c10_reaches_each_verdict_from_length_and_state(verdict):
    j = judge(claims.c10, C10_CASES[verdict]())
    assert j.verdict == verdict, j.evidence


def test_c10_an_oom_while_streaming_contradicts():
    rows = stream_rows(ns=STREAM[:2]) + failed("lmm", "stream_time_s", "oom", ns=STREAM[2:3], kind="stream")
    assert judge(claims.c10, frame(rows)).verdict == CONTRADICTED


# --- C11 ----------------------------------------------------------------------------------------------------

def test_c11_reports_the_parameters_the_run_recorded_not_a_default_build():
    rows = curve("lmm", "time_forward_s", lin())
    for r in rows:
        r["params"] = 905_504
        r["config"] = json.dumps({"model_config": {"d_model": 128}})
    j = judge(claims.c11, frame(rows))
    assert j.verdict == "reported" and "905,504 params" in j.evidence
    assert judge(claims.c11, frame([])).verdict == NOT_MEASURED


# --- the whole ledger ---------------------------------------------------------------------------------------

def test_a_run_of_failed_rows_crashes_no_rule_and_supports_nothing():
    statuses = ["oom", "diverged", "error", "timeout", "skipped"]
    rows = []
    for i, status in enumerate(statuses):
        for model in ("transformer", "transformer-naive", "lmm", "mac"):
            for metric in ("time_forward_s", "flops_forward", "memory_train_bytes", "memory_forward_bytes"):
                rows += failed(model, metric, status, ns=NS[i::5])
            rows.append(row(model, "status", NS[i], math.nan, status=status, error="boom",
                            config=json.dumps({"run_config": {"metric": "time", "n": NS[i]}})))
        rows += failed("lmm", "stream_time_s", status, ns=[STREAM[0]], kind="stream")
        rows += [row("lmm", "train_loss", np.nan, math.nan, kind="train", task="copy", seed=i, status=status)]
    rows += dyn("stationary/titans", "memory_norm", {0: [math.nan] * 16}, status="diverged")
    verdicts = claims.ledger(frame(rows))
    assert {v.id for v in verdicts} == {f"C{i}" for i in range(1, 12)}
    assert all(v.verdict in (*VERDICTS, "reported") for v in verdicts)
    assert not [v for v in verdicts if v.verdict == SUPPORTED]
    assert all(v.evidence for v in verdicts)


def test_every_verdict_lists_the_cells_it_read():
    df = frame(attention(quad()), curve("lmm", "time_forward_s", lin()))
    got = {v.id: v for v in claims.ledger(df)}
    assert set(got["C1"].cells) == {r["cell_id"] for r in attention(quad())}
    assert got["C5"].cells and all(("transformer" in c or "lmm" in c) for c in got["C5"].cells)
    assert json.loads(claims.ledger_json(df))[0]["cells"]
