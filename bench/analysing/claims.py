"""The claims ledger: each claim of DESIGN.md section 7 gets a verdict computed from one run's rows
(supported / contradicted / inconclusive / not measured, or `reported` for C11), the numbers that decided it,
and the cells (ids) whose rows were read. Thresholds are stated in each rule so a reader can disagree with them.

How the rules decide (bench/analysing/evidence.py has the shared parts):
- Models and tasks come from the registries, metric names from bench/metrics.py: the Transformer side is family
  `attention` (and, for time claims, a declared time of n^2 under the run's config); the Titans side is families
  `memory` and `hybrid`; accuracy is each registered task's headline, in the direction its metric declares.
- An exponent is judged by its bootstrap interval (bench/analysing/scaling.py) against a band of exponents:
  inside the band supports, wholly outside contradicts, across an edge is inconclusive.
- A claim about several models or measurements needs each of them (`evidence.combine`): one contradicted part
  contradicts, one part not measured keeps it from being supported. Rows that failed are never numbers: a part
  whose rows all failed is "not measured", with the statuses as the reason.
- Decay and growth over a stream are fitted over the whole series per seed, with a 95 % interval over seeds.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd

import models
import tasks
from bench import metrics
from bench.analysing import accuracy
from bench.analysing.evidence import (
    CONTRADICTED,
    INCONCLUSIVE,
    NOT_MEASURED,
    SUPPORTED,
    Judgement,
    Trend,
    band,
    cell_ids,
    combine,
    declared,
    exponent_part,
    fitted,
    merged,
    model_config,
    present,
    select,
    series,
    trend,
)
from bench.analysing.scaling import best_class, crossover, fit_ratio
from bench.running.store import COLUMNS

TIME_METRICS = (metrics.TIME_FORWARD_S, metrics.TIME_TRAIN_S)
QUADRATIC = (1.7, 2.3)  # a measured exponent in this band is n^2 at the lengths measured
AT_MOST_N_LOG_N = (-math.inf, 1.25)  # n log n over 4K..16K has a local exponent of 1.11; 1.25 leaves the noise
BOUNDED = (-math.inf, 0.1)  # a state that grows slower than n^0.1 over the whole stream is called bounded
GROWING_RATIO = (0.1, math.inf)  # a cost ratio that grows at least as n^0.1 goes to infinity on this evidence
LONG_CONTEXT = 2_000_000
SUB_QUADRATIC_CLASSES = ("1", "log n", "n", "n log n")


@dataclass(frozen=True)
class Verdict:
    id: str
    claim: str
    verdict: str
    evidence: str
    cells: tuple[str, ...] = ()


def quadratic_attention(frame: pd.DataFrame) -> list[str]:
    """The run's attention models that declare n^2 time under the run's config (not a windowed one)."""
    return [m for m in present(frame, "attention") if declared(frame, m).time == "n^2"]


def titans(frame: pd.DataFrame) -> list[str]:
    return present(frame, *models.TITANS_FAMILIES)


def c1(frame: pd.DataFrame) -> Judgement:
    """Every quadratic attention model's forward/train time and forward FLOP exponents lie in [1.7, 2.3]."""
    parts = {f"{m} {metric}": part for m in quadratic_attention(frame)
             for metric in (*TIME_METRICS, metrics.FLOPS_FORWARD, metrics.FLOPS_TRAIN)
             if (part := exponent_part(frame, m, metric, *QUADRATIC))}
    return combine(parts, "time and FLOP exponents of each attention model declaring n^2 (rule: bootstrap interval "
                          "inside [1.7, 2.3]; time alone or FLOPs alone cannot support)",
                   "no attention timing or FLOP rows")


def c2(frame: pd.DataFrame) -> list[tuple[str, Judgement]]:
    """Per attention model: the peak-memory exponents (forward and train) lie in [1.7, 2.3]. The claim holds only
    where the scores are materialised, so a fused kernel is expected to contradict it: one row per model."""
    out = []
    for m in present(frame, "attention"):
        parts = {metric: part for metric in (metrics.MEMORY_FORWARD_BYTES, metrics.MEMORY_TRAIN_BYTES)
                 if (part := exponent_part(frame, m, metric, *QUADRATIC))}
        out.append((f"Transformer memory O(n^2): {m} (declares {declared(frame, m).memory})",
                    combine(parts, "peak-memory exponent (rule: bootstrap interval inside [1.7, 2.3])",
                            f"no memory rows for {m}")))
    return out or [("Transformer memory O(n^2)", Judgement(NOT_MEASURED, "no attention model in this run"))]


def c3_part(frame: pd.DataFrame, model: str, metric: str) -> Judgement | None:
    """Exponent interval at most 1.25, and the best-fit class over all lengths no worse than n log n: a low
    exponent on a curve best described as n^2 (an upturn at the top of the grid) is not enough to support."""
    part = exponent_part(frame, model, metric, *AT_MOST_N_LOG_N)
    if part is None or part.verdict == NOT_MEASURED:
        return part
    s = series(frame, model, metric)
    ns = np.array(sorted(s.samples))
    cls = best_class(ns, np.array([np.median(s.samples[n]) for n in ns]))[0]
    verdict = INCONCLUSIVE if part.verdict == SUPPORTED and cls not in SUB_QUADRATIC_CLASSES else part.verdict
    return Judgement(verdict, f"{part.evidence}, best class {cls}", part.cells)


def c3(frame: pd.DataFrame) -> Judgement:
    parts = {f"{m} {metric}": part for m in titans(frame) for metric in TIME_METRICS
             if (part := c3_part(frame, m, metric))}
    return combine(parts, "time exponent of each Titans model (rule: bootstrap interval <= 1.25 and best class among "
                          "1, log n, n, n log n; a quadratic best class with an interval above 1.25 contradicts)",
                   "no Titans timing rows")


def state_part(frame: pd.DataFrame, model: str) -> Judgement | None:
    """The bytes the stream's state owns, fitted over every checkpoint: bounded if the exponent is below 0.1.
    The process's RSS over the same checkpoints is shown beside it (allocator and library growth, not state)."""
    part = exponent_part(frame, model, metrics.STREAM_STATE_BYTES, *BOUNDED, kind="stream", fraction=1.0)
    if part is None or part.verdict == NOT_MEASURED:
        return part
    rss = fitted(series(frame, model, metrics.STREAM_RSS_BYTES, kind="stream"), fraction=1.0)
    shown = f"; RSS p = {rss}" if rss else ""
    return Judgement(part.verdict, part.evidence + shown, part.cells)


def c4(frame: pd.DataFrame) -> Judgement:
    parts = {}
    for m in titans(frame):
        train = exponent_part(frame, m, metrics.MEMORY_TRAIN_BYTES, *AT_MOST_N_LOG_N)
        state = state_part(frame, m)
        parts.update({k: v for k, v in ((f"{m} train", train), (f"{m} stream", state)) if v})
    return combine(parts, "training peak-memory exponent (rule: bootstrap interval <= 1.25) and streaming state "
                          "bytes over the whole stream (rule: exponent interval < 0.1)",
                   "no Titans training-memory or streaming-state rows")


def c5_part(frame: pd.DataFrame, base: str, model: str, metric: str) -> Judgement | None:
    a, b = series(frame, base, metric), series(frame, model, metric)
    if not (a.attempted and b.attempted):
        return None
    cells = tuple(sorted(a.cells | b.cells))
    common = sorted(set(a.samples) & set(b.samples))
    f = fit_ratio(a.samples, b.samples) if len(common) >= 2 else None
    if f is None:
        return Judgement(NOT_MEASURED, f"{base} / {model} {metric}: fewer than 2 common ok lengths", cells)
    ns = np.array(common)
    med = {k: np.array([np.median(s.samples[n]) for n in common]) for k, s in (("a", a), ("b", b))}
    cross = crossover(ns, med["b"], med["a"])
    where = f"crossover n ≈ {cross:,.0f}" if cross else "no crossover on the grid"
    return Judgement(band(f, *GROWING_RATIO), f"{base} / {model} {metric}: ratio {med['a'][0] / med['b'][0]:.2g} -> "
                                              f"{med['a'][-1] / med['b'][-1]:.2g}, slope {f}, {where}", cells)


def c5(frame: pd.DataFrame) -> Judgement:
    parts = {f"{b}/{m} {metric}": part for b in quadratic_attention(frame) for m in titans(frame)
             for metric in TIME_METRICS if (part := c5_part(frame, b, m, metric))}
    return combine(parts, "T_attention / T_titans per pair (rule: log-log slope's bootstrap interval above 0.1)",
                   "needs timings of an attention model declaring n^2 and of a Titans model")


def dynamics_claim(frame: pd.DataFrame, variant: str, metric: str, judge: Callable[[Trend], Judgement],
                   log_x: bool = False, empty: str = "") -> Judgement:
    found = trend(frame, variant, metric, log_x)
    if found is None:
        return Judgement(NOT_MEASURED, empty or f"no {variant} {metric} dynamics rows")
    return found if isinstance(found, Judgement) else judge(found)


def rate_text(name: str, interval: tuple[float, float, float]) -> str:
    mean, low, high = interval
    return f"{name} {mean:.3g} [{low:.3g}, {high:.3g}]"


def c6_judge(t: Trend) -> Judgement:
    """||S_t|| <= C exp(-gamma t): log ||S|| falls linearly in t. gamma = -slope per token, over the whole series
    and over its second half (an exponential keeps its rate; a transient then a plateau does not). The least rate
    that counts is ln 2 / n, halving ||S|| over the stream."""
    least = math.log(2) / t.n
    whole, tail = ((-mean, -high, -low) for mean, low, high in (t.whole, t.tail))  # decay rate = -slope
    if whole[1] >= least and tail[1] >= least:
        verdict = SUPPORTED
    elif tail[2] < least or whole[2] < least:
        verdict = CONTRADICTED  # a plateau: the decay rate's interval lies below ln 2 / n
    else:
        verdict = INCONCLUSIVE
    return Judgement(verdict, f"trained memory, stationary stream, {t.seeds} seed(s): ||S|| {t.first:.3g} -> "
                              f"{t.last:.3g}; {rate_text('gamma (whole series)', whole)}, "
                              f"{rate_text('gamma (second half)', tail)} per token (rule: both intervals above "
                              f"ln 2 / n = {least:.3g}; either below it is a plateau, contradicted)", t.cells)


def c6(frame: pd.DataFrame) -> Judgement:
    judged = dynamics_claim(frame, "stationary/titans/trained", metrics.SURPRISE_NORM, c6_judge,
                            empty="no dynamics rows of a trained memory (a [[dynamics]] entry with train_steps > 0)")
    shift = trend(frame, "shift/titans/trained", metrics.SURPRISE_NORM)
    if isinstance(shift, Trend):  # shown, not judged: the bound is stated for a stationary stream
        judged = Judgement(judged.verdict, judged.evidence + f"; across a distribution shift ||S|| {shift.first:.3g}"
                                                             f" -> {shift.last:.3g} (shown, not judged)",
                           merged([judged, Judgement("", "", shift.cells)]))
    return judged


def c7_judge(t: Trend) -> Judgement:
    """The seed update must work as a memory rule: the inner loss fitted over the whole stream must fall by at
    least 10 % (exp(slope n) <= 0.9 across the seeds' interval); a loss that does not fall by 5 % contradicts."""
    factor = tuple(math.exp(v * t.n) for v in t.whole)
    verdict = SUPPORTED if factor[2] <= 0.9 else CONTRADICTED if factor[1] > 0.95 else INCONCLUSIVE
    return Judgement(verdict, f"seed rule as written, {t.seeds} seed(s): inner loss {t.first:.3g} -> {t.last:.3g}; "
                              f"fitted change over the stream x{factor[0]:.2f} [{factor[1]:.2f}, {factor[2]:.2f}] "
                              "(rule: upper end <= 0.9 supports, lower end > 0.95 contradicts; NaN contradicts)",
                     t.cells)


def c7(frame: pd.DataFrame) -> Judgement:
    judged = dynamics_claim(frame, "stationary/seed", metrics.INNER_LOSS, c7_judge)
    others = [f"{rule}: {t.first:.3g} -> {t.last:.3g}" for rule in ("seed_corrected", "titans")
              if isinstance(t := trend(frame, f"stationary/{rule}", metrics.INNER_LOSS), Trend)]
    return Judgement(judged.verdict, judged.evidence + ("; for comparison " + ", ".join(others) if others else ""),
                     judged.cells)


def c8_judge(t: Trend) -> Judgement:
    """||M_t||_F <= C: the growth exponent of ||M|| in t (log-log), fitted over the whole series and over its
    second half; bounded means the second half no longer grows as a power."""
    verdict = SUPPORTED if t.tail[2] < 0.1 else CONTRADICTED if t.tail[1] > 0.3 else INCONCLUSIVE
    return Judgement(verdict, f"{t.seeds} seed(s): ||M||_F {t.first:.3g} -> {t.last:.3g}; "
                              f"{rate_text('growth exponent (whole series)', t.whole)}, "
                              f"{rate_text('(second half)', t.tail)} (rule: second half's interval < 0.1 bounded, "
                              "> 0.3 growing)", t.cells)


def c8(frame: pd.DataFrame) -> Judgement:
    return dynamics_claim(frame, "stationary/titans", metrics.MEMORY_NORM, c8_judge, log_x=True)


def train_failures(frame: pd.DataFrame, task: str, model: str) -> str:
    """'k of s seeds diverged/oom/error' for a model's training cells on a task ('' when all ended ok)."""
    rows = select(frame, task=task, model=model, kind="train")
    status = rows.groupby(rows["seed"].fillna(0))["status"].agg(lambda s: next((v for v in s if v != "ok"), "ok"))
    bad = status[status != "ok"]
    return f"{model}: {len(bad)} of {len(status)} seed(s) {'/'.join(sorted(set(bad)))}" if len(bad) else ""


def c9(frame: pd.DataFrame) -> Judgement:
    """Per accuracy task variant and per (Titans model, attention model) pair, at the longest length both were
    evaluated at: the headline's mean over seeds, a difference called only where the seed ranges (or, with one
    seed, the Wilson intervals) separate. Supported if some model wins and none loses, contradicted if some
    loses and none wins. Seeds that failed (diverged, oom, error) have no accuracy: they are listed."""
    parts, outcomes, cells, failed = [], [], set(), []
    bases, mine_models = present(frame, "attention"), titans(frame)
    for task in (t for t in tasks.names() if t in set(frame["task"].dropna())):
        metric = accuracy.headline(task)
        failed += [f for m in (*bases, *mine_models) if (f := train_failures(frame, task, m))]
        summary = accuracy.summary(frame, task)
        for variant, rows in summary.groupby("variant"):
            for base_model in bases:
                base = rows[rows["model"] == base_model].set_index("n")
                for model in mine_models:
                    mine = rows[rows["model"] == model].set_index("n")
                    common = base.index.intersection(mine.index)
                    if common.empty:
                        continue
                    n = common.max()
                    outcome = accuracy.compare(mine.loc[n], base.loc[n], metrics.higher_is_better(metric))
                    outcomes.append(outcome)
                    cells |= cell_ids(select(frame, task=task, model=model)) | \
                        cell_ids(select(frame, task=task, model=base_model))
                    parts.append(f"{variant} n={n:g}: {model} {mine.loc[n, 'value']:.3f} vs {base_model} "
                                 f"{base.loc[n, 'value']:.3f} ({outcome}, {int(mine.loc[n, 'seeds'])} seed(s))")
    failures = f" Failed training: {'; '.join(failed)}." if failed else ""
    if not parts:
        return Judgement(NOT_MEASURED, "no accuracy rows with both an attention and a Titans model at a common "
                                       "length" + failures, tuple(sorted(cells)))
    verdict = (SUPPORTED if "win" in outcomes and "loss" not in outcomes else
               CONTRADICTED if "loss" in outcomes and "win" not in outcomes else INCONCLUSIVE)
    return Judgement(verdict, f"{outcomes.count('win')} wins, {outcomes.count('loss')} losses, "
                              f"{outcomes.count('tie')} ties — " + "; ".join(parts) +
                     " (rule: per model at the longest common length; seed ranges decide)." + failures,
                     tuple(sorted(cells)))


def c10_part(frame: pd.DataFrame, model: str) -> Judgement | None:
    """A Titans model streamed >= 2M tokens with a bounded state; an oom while streaming contradicts, a stream
    that stopped at its time budget or a grid that ends earlier leaves it unmeasured."""
    time_s = series(frame, model, metrics.STREAM_TIME_S, kind="stream")
    if not time_s.attempted:
        return None
    state = state_part(frame, model)
    longest = max(time_s.samples, default=0)
    text = f"{model} streamed {int(longest):,} tokens" + (f" in {time_s.samples[longest][0]:.0f} s" if longest else "")
    cells = tuple(sorted(time_s.cells | set(state.cells if state else ())))
    if "oom" in time_s.failed:
        return Judgement(CONTRADICTED, f"{text}, then ran out of memory", cells)
    if state is None or state.verdict == NOT_MEASURED:
        return Judgement(NOT_MEASURED, f"{text}; no state measurement", cells)
    if state.verdict != SUPPORTED:
        return Judgement(state.verdict, f"{text}; {state.evidence}", cells)
    if longest < LONG_CONTEXT:
        stop = f" ({time_s.failures()})" if time_s.failed else ""
        return Judgement(NOT_MEASURED, f"{text}{stop}, short of {LONG_CONTEXT:,}; {state.evidence}", cells)
    return Judgement(SUPPORTED, f"{text}; {state.evidence}", cells)


def c10(frame: pd.DataFrame) -> Judgement:
    """Existential: one Titans model streaming >= 2M tokens in a bounded state demonstrates the window."""
    parts = {m: p for m in titans(frame) if (p := c10_part(frame, m))}
    if not parts:
        return Judgement(NOT_MEASURED, "no streaming rows of a Titans model")
    verdicts = [p.verdict for p in parts.values()]
    verdict = next((v for v in (SUPPORTED, CONTRADICTED, INCONCLUSIVE) if v in verdicts), NOT_MEASURED)
    return Judgement(verdict, "rule: some Titans model streams >= 2M tokens with its state's exponent interval "
                              "< 0.1 — " + "; ".join(f"[{p.verdict}] {p.evidence}" for p in parts.values()),
                     merged(parts.values()))


def c11(frame: pd.DataFrame) -> Judgement:
    """Reported, not judged: each model's parameters as the run's rows recorded them (the run's config) and its
    recurrent state size, built with the same config, at n = 1K and 1M."""
    names = [m for m in models.names() if m in set(frame["model"].dropna())]
    if not names:
        return Judgement(NOT_MEASURED, "no registered models in this run")
    parts, cells = [], set()
    for m in names:
        rows = select(frame, model=m).dropna(subset=["params"])
        built = models.build(m, **model_config(frame, m))
        params = int(rows["params"].iloc[0]) if len(rows) else built.num_params()
        cells |= cell_ids(rows.head(1))
        parts.append(f"{m}: {params:,} params, state {built.state_numel(1024):,} at n=1K, "
                     f"{built.state_numel(1 << 20):,} at n=1M")
    return Judgement("reported", "; ".join(parts), tuple(sorted(cells)))


Rule = Callable[[pd.DataFrame], "Judgement | list[tuple[str, Judgement]]"]
CLAIMS: list[tuple[str, str, Rule]] = [
    ("C1", "Transformer time O(n^2 d)", c1),
    ("C2", "Transformer memory O(n^2)", c2),
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
        judged = rule(frame)
        for text, j in judged if isinstance(judged, list) else [(claim, judged)]:
            out.append(Verdict(cid, text, j.verdict, j.evidence, j.cells))
    return out


def ledger_json(frame: pd.DataFrame) -> str:
    return json.dumps([asdict(v) for v in ledger(frame)], indent=2)
