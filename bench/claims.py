"""The claims ledger: each claim of DESIGN.md section 7 gets a verdict computed from one run's rows
(supported / contradicted / inconclusive / not measured, or `reported` for C11) and the numbers that
decided it. Thresholds are stated in each rule so a reader can disagree with them."""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pandas as pd

import models
from bench import accuracy
from bench.scaling import best_class, crossover, fit_power
from bench.store import COLUMNS

ATTENTION = ("transformer", "transformer-naive")
TITANS = ("lmm", "mac", "mag", "mal")
NOT_MEASURED = "not measured"
STREAM_REFERENCE = 256_000  # streaming memory is compared from here on (below, allocator warm-up dominates)


@dataclass(frozen=True)
class Verdict:
    id: str
    claim: str
    verdict: str
    evidence: str


def series(frame: pd.DataFrame, model: str, metric: str, kind: str | None = None) -> pd.Series:
    """Median value per n of the ok rows of one model and metric."""
    rows = frame[(frame["model"] == model) & (frame["metric"] == metric) & (frame["status"] == "ok")]
    if kind:
        rows = rows[rows["kind"] == kind]
    return rows.groupby("n")["value"].median().sort_index()


def fit(frame: pd.DataFrame, model: str, metric: str):
    s = series(frame, model, metric)
    return fit_power(s.index.to_numpy(), s.to_numpy()) if len(s) >= 2 else None


def fits(frame: pd.DataFrame, models, metric: str) -> dict:
    out = {m: fit(frame, m, metric) for m in models}
    return {m: f for m, f in out.items() if f is not None}


def describe(found: dict) -> str:
    return "; ".join(f"{m}: p = {f}" for m, f in found.items())


def time_metric(frame: pd.DataFrame) -> str:
    return "time_forward_s" if "time_forward_s" in set(frame["metric"]) else "time_train_s"


def c1(frame):
    metric = time_metric(frame)
    times, flops = fits(frame, ATTENTION, metric), fits(frame, ATTENTION, "flops_forward")
    if not times:
        return NOT_MEASURED, "no attention timing rows"
    exps = [f.exponent for f in times.values()]
    verdict = ("supported" if any(1.7 <= e <= 2.3 for e in exps)
               else "contradicted" if all(f.ci_high < 1.5 for f in times.values()) else "inconclusive")
    return verdict, f"{metric} exponent (rule: one in [1.7, 2.3]) — {describe(times)}. FLOPs: {describe(flops)}"


def c2_for(model: str):
    def rule(frame):
        found = {m: f for m, f in ((f"{model} {k}", fit(frame, model, k)) for k in
                                   ("memory_forward_bytes", "memory_train_bytes")) if f}  # the larger decides
        if not found:
            return NOT_MEASURED, f"no memory rows for {model}"
        top = max(f.exponent for f in found.values())
        verdict = "supported" if top >= 1.7 else "contradicted" if top <= 1.3 else "inconclusive"
        return verdict, f"peak-memory exponent (rule: >= 1.7 supports, <= 1.3 contradicts) — {describe(found)}"
    return rule


def c3(frame):
    metric = time_metric(frame)
    found = fits(frame, TITANS, metric)
    if not found:
        return NOT_MEASURED, "no Titans timing rows"
    classes = {}
    for m in found:
        s = series(frame, m, metric)
        classes[m] = best_class(s.index.to_numpy(), s.to_numpy())[0]
    worst = max(f.exponent for f in found.values())
    verdict = "supported" if worst <= 1.25 else "contradicted" if min(f.ci_low for f in found.values()) > 1.25 \
        else "inconclusive"
    best = ", ".join(f"{m}: {c}" for m, c in classes.items())
    return verdict, f"{metric} exponent (rule: all <= 1.25) — {describe(found)}. Best-fit class: {best}"


def c4(frame):
    found = fits(frame, TITANS, "memory_train_bytes")
    stream = series(frame, "lmm", "stream_peak_bytes")
    if not found and stream.empty:
        return NOT_MEASURED, "no Titans memory rows"
    worst = max((f.exponent for f in found.values()), default=0.0)
    ref = stream[stream.index >= STREAM_REFERENCE]
    flat = ref.iloc[-1] / ref.iloc[0] if len(ref) >= 2 else float("nan")
    ok = worst <= 1.25 and (np.isnan(flat) or flat <= 1.1)
    verdict = "supported" if ok else "contradicted" if worst > 1.5 else "inconclusive"
    text = f"training peak-memory exponent (rule: <= 1.25) — {describe(found)}"
    if len(ref) >= 2:
        text += (f"; streaming peak at n={int(ref.index[-1]):,} / at n={int(ref.index[0]):,} = {flat:.2f} "
                 "(rule: <= 1.1)")
    return verdict, text


def c5(frame):
    metric = time_metric(frame)
    base = series(frame, "transformer", metric)
    parts, growing = [], []
    for m in TITANS:
        t = series(frame, m, metric)
        common = base.index.intersection(t.index)
        if len(common) < 2:
            continue
        ratio = base[common] / t[common]
        f = fit_power(common.to_numpy(), ratio.to_numpy())
        cross = crossover(common.to_numpy(), t[common].to_numpy(), base[common].to_numpy())
        cross_text = f"crossover n ≈ {cross:,.0f}" if cross else "no crossover on the grid"
        parts.append(f"{m}: ratio {ratio.iloc[0]:.2g} -> {ratio.iloc[-1]:.2g}, slope {f}, {cross_text}")
        growing.append(f is not None and f.ci_low > 0)
    if not parts:
        return NOT_MEASURED, "needs transformer and Titans timings on common lengths"
    verdict = "supported" if all(growing) else "contradicted" if not any(growing) else "inconclusive"
    return verdict, f"T_transformer / T_titans (rule: log-log slope CI above 0) — {'; '.join(parts)}"


def dynamics(frame: pd.DataFrame, variant: str, metric: str) -> pd.Series:
    rows = frame[(frame["kind"] == "dynamics") & (frame["variant"] == variant) & (frame["metric"] == metric)]
    return rows.groupby("n")["value"].median().sort_index()


def c6(frame):
    still = dynamics(frame, "stationary/titans", "surprise_norm")
    shift = dynamics(frame, "shift/titans", "surprise_norm")
    if still.empty:
        return NOT_MEASURED, "no dynamics rows"
    decay = still.iloc[-1] / still.iloc[0]
    text = f"stationary stream: ||S|| {still.iloc[0]:.3g} -> {still.iloc[-1]:.3g} ({decay:.2g}x)"
    jump = float("nan")
    if not shift.empty:
        half = shift.index[len(shift) // 2 - 1]
        jump = shift[shift.index > half].max() / shift[half]
        text += f"; after the distribution shift ||S|| rises {jump:.2g}x over its pre-shift level"
    if decay < 0.5 and (np.isnan(jump) or jump < 2):
        return "supported", text + " (rule: decays below half and no 2x rebound)"
    if decay < 0.5:
        return "contradicted", text + " — decays on stationary data only; a shift breaks the exp(-gamma t) bound"
    return "contradicted" if decay > 1 else "inconclusive", text


def c7(frame):
    """The seed update must work as a memory rule: lower the inner loss by at least 10 % over the stream, as
    the paper's rule does."""
    parts, ratio = [], {}
    for rule in ("seed", "seed_corrected", "titans"):
        loss = dynamics(frame, f"stationary/{rule}", "inner_loss")
        if not loss.empty:
            ratio[rule] = loss.iloc[-1] / loss.iloc[0]
            parts.append(f"{rule}: inner loss {loss.iloc[0]:.3g} -> {loss.iloc[-1]:.3g} ({ratio[rule]:.2f}x)")
    if "seed" not in ratio:
        return NOT_MEASURED, "no seed-rule dynamics rows"
    verdict = "supported" if ratio["seed"] <= 0.9 else "contradicted" if ratio["seed"] > 0.95 else "inconclusive"
    return verdict, ("as written (+beta grad, alpha = sigmoid(<grad, k>) ~ 0.5 wipes half the memory each token) "
                     "(rule: the loss must fall by >= 10 %) — " + "; ".join(parts))


def c8(frame):
    norm = dynamics(frame, "stationary/titans", "memory_norm")
    if len(norm) < 4:
        return NOT_MEASURED, "no dynamics rows"
    tail = norm[norm.index >= norm.index[len(norm) // 2]]
    f = fit_power(tail.index.to_numpy(), tail.to_numpy(), fraction=1.0)
    slope = f.exponent if f else float("nan")
    verdict = "supported" if slope < 0.1 else "contradicted" if slope > 0.3 else "inconclusive"
    return verdict, (f"||M||_F max {norm.max():.3g}, final {norm.iloc[-1]:.3g}; growth exponent over the second half "
                     f"{slope:.3f} (rule: p < 0.1 bounded, > 0.3 growing)")


def c9(frame):
    """Per accuracy task variant and per Titans model against the Transformer, at the longest length both were
    evaluated at: the headline's mean over seeds, a difference called only where the seed ranges (or, with one
    seed, the Wilson intervals) separate. Supported if some model wins and none loses, contradicted if some
    loses and none wins."""
    parts, outcomes = [], []
    for task in sorted(frame["task"].dropna().unique()):
        metric = accuracy.headline(task)
        if metric is None:
            continue
        summary = accuracy.summary(frame, task)
        for variant, rows in summary.groupby("variant"):
            base = rows[rows["model"] == "transformer"].set_index("n")
            for model in TITANS:
                mine = rows[rows["model"] == model].set_index("n")
                common = base.index.intersection(mine.index)
                if base.empty or mine.empty or common.empty:
                    continue
                n = common.max()
                outcome = accuracy.compare(mine.loc[n], base.loc[n], accuracy.higher_is_better(metric))
                outcomes.append(outcome)
                parts.append(f"{variant} n={n:g}: {model} {mine.loc[n, 'value']:.3f} vs transformer "
                             f"{base.loc[n, 'value']:.3f} ({outcome}, {int(mine.loc[n, 'seeds'])} seed(s))")
    if not parts:
        return NOT_MEASURED, "no accuracy rows with both a Transformer and a Titans model at a common length"
    verdict = ("supported" if "win" in outcomes and "loss" not in outcomes else
               "contradicted" if "loss" in outcomes and "win" not in outcomes else "inconclusive")
    return verdict, (f"{outcomes.count('win')} wins, {outcomes.count('loss')} losses, {outcomes.count('tie')} ties — "
                     + "; ".join(parts) + " (rule: per model at the longest common length; seed ranges decide)")


def c10(frame):
    peak, time_s = series(frame, "lmm", "stream_peak_bytes"), series(frame, "lmm", "stream_time_s")
    if peak.empty:
        return NOT_MEASURED, "no streaming rows"
    longest = int(peak.index.max())
    ref = peak[peak.index >= STREAM_REFERENCE]
    seconds = time_s.get(longest, float("nan"))
    text = f"LMM streamed {longest:,} tokens in {seconds:.0f} s, peak {peak.iloc[-1] / 2**20:.0f} MiB"
    if len(ref) >= 2:
        ratio = peak.iloc[-1] / ref.iloc[0]
        text += f", {ratio:.2f}x the peak at {int(ref.index[0]):,}"
        verdict = "supported" if longest >= 2_000_000 and ratio <= 1.1 else "contradicted" if ratio > 1.5 else \
            "inconclusive"
    else:
        verdict = "inconclusive"
        text += " (no checkpoint at >= 256K to compare with)"
    return verdict, text + " (rule: >= 2M tokens with peak memory within 10 % of that at 256K)"


def c11(frame):
    names = [m for m in models.names() if m in set(frame["model"].dropna())]
    if not names:
        return NOT_MEASURED, "no models in this run"
    built = {m: models.build(m) for m in names}
    return "reported", "; ".join(f"{m}: {b.num_params():,} params, state {b.state_numel(1024):,} at n=1K, "
                                 f"{b.state_numel(1 << 20):,} at n=1M" for m, b in built.items())


CLAIMS = [
    ("C1", "Transformer time O(n^2 d)", c1),
    ("C2", "Transformer memory O(n^2), materialised scores (naive)", c2_for("transformer-naive")),
    ("C2", "Transformer memory O(n^2), fused kernel (sdpa)", c2_for("transformer")),
    ("C3", "Titans time O(n d log n)", c3),
    ("C4", "Titans memory O(n d + m d)", c4),
    ("C5", "T_transformer / T_titans -> infinity", c5),
    ("C6", "surprise converges: ||S_t|| <= C exp(-gamma t)", c6),
    ("C7", "seed update (1-alpha) M + beta grad l, beta = exp(-gamma ||grad||)", c7),
    ("C8", "memory norm bounded: ||M_t||_F <= C", c8),
    ("C9", "Titans beat Transformers in accuracy on long sequences", c9),
    ("C10", "context windows beyond 2M tokens", c10),
    ("C11", "dim(T) < dim(A): Titans more expressive", c11),
]


def ledger(frame: pd.DataFrame) -> list[Verdict]:
    frame = frame.reindex(columns=list(dict.fromkeys([*COLUMNS, *frame.columns])))
    out = []
    for cid, claim, rule in CLAIMS:
        verdict, evidence = rule(frame)
        out.append(Verdict(cid, claim, verdict, evidence))
    return out


def ledger_json(frame: pd.DataFrame) -> str:
    return json.dumps([v.__dict__ for v in ledger(frame)], indent=2)
