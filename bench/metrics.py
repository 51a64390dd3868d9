"""Every metric name the harness writes to results.csv, declared once: producers (runners, tasks, probes) and
consumers (report, plots, compare, claims) import these names instead of spelling strings, so a renamed metric
breaks at import, not silently in a report that finds no rows.

Each metric has a unit, a direction (`higher_is_better`: True, False, or None for a measured cost or a diagnostic
that is neither good nor bad by itself), a `role` that says what the analysis does with it, and a line of
description. Three families are patterned and have a function that builds a name and one that recognises it:

- profile costs `<time|memory|flops|tokens_per_s>` by mode: `time_forward_s`, `memory_train_bytes`,
  `flops_forward`, `tokens_per_s_train` (`profiled`, `profile_family`);
- forecast errors `<val|test>_<mse|mae>[_<reference>]`: the model's, or a reference forecaster's on the same
  windows (`forecast_error`, `parse_forecast_error`);
- forecast examples `example_<input|target|forecast>[_<reference>]`: one test window as a series over offsets
  (`example`, `is_example`).

This module imports nothing from the project: tasks write metrics too, and depend on the harness only here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

ROLES = {
    "quality": "how well a model did on a test: the numbers models are compared by",
    "breakdown": "a quality metric split along another axis (no single number per length)",
    "cost": "time, memory, FLOPs or throughput of a step",
    "training": "what a training run cost and where it ended",
    "validation": "scored on the training distribution's held-out stream, for choosing recipes",
    "reference": "a reference forecaster scored on the model's windows",
    "stream": "a stream read piece by piece with the state carried",
    "dynamics": "a per-window diagnostic of one memory layer reading a stream",
    "example": "one test window as a series, for a picture",
    "status": "the one row of a cell that failed",
}


@dataclass(frozen=True)
class Metric:
    name: str
    unit: str
    higher_is_better: bool | None  # None: a cost or a diagnostic, neither better nor worse by itself
    role: str
    description: str

    def __post_init__(self):
        if self.role not in ROLES:
            raise ValueError(f"metric {self.name!r}: role {self.role!r} not in {sorted(ROLES)}")


METRICS: dict[str, Metric] = {}


def _declare(name: str, unit: str, higher_is_better: bool | None, role: str, description: str) -> str:
    METRICS[name] = Metric(name, unit, higher_is_better, role, description)
    return name


STATUS = _declare("status", "", None, "status", "a cell that raised, ran out of memory or time; value NaN")

# training cells (bench/running/execute.py, bench/measuring/train.py)
TRAIN_LOSS = _declare("train_loss", "loss", False, "training", "final training loss")
TRAIN_STEPS = _declare("train_steps", "steps", None, "training", "optimiser steps taken (early stopping: fewer)")
TRAIN_TOKENS_PER_S = _declare("train_tokens_per_s", "tokens/s", True, "cost", "training throughput")
TRAIN_WALL_S = _declare("train_wall_s", "s", None, "training", "training wall time")
BEST_VAL_LOSS = _declare("best_val_loss", "loss", False, "validation", "lowest validation loss seen")
VAL_LOSS = _declare("val_loss", "loss", False, "validation", "validation loss of the final weights")
VAL_ACCURACY = _declare("val_accuracy", "fraction", True, "validation",
                        "answer accuracy (the task's validation headline) of the final weights")
LEARNING_CURVE = _declare("learning_curve", "loss", False, "training",
                          "value: final training loss; extra `curve`: loss per step and validation points")

# accuracy tasks (tasks/)
EXACT_MATCH = _declare("exact_match", "fraction", True, "quality", "sequences answered entirely right")
TOKEN_ACCURACY = _declare("token_accuracy", "fraction", True, "quality", "answer tokens right")
QUERY_ACCURACY = _declare("query_accuracy", "fraction", True, "quality", "MQAR queries answered right")
QUERY_ACCURACY_BY_DISTANCE = _declare("query_accuracy_by_distance", "fraction", True, "breakdown",
                                      "query accuracy by key-to-query distance bin (`distance` column)")

# streaming (bench/measuring/streaming.py, bench/measuring/memprobe.py)
STREAM_TIME_S = _declare("stream_time_s", "s", None, "stream", "elapsed time at a checkpoint")
STREAM_TOKENS_PER_S = _declare("stream_tokens_per_s", "tokens/s", True, "stream", "tokens streamed per second")
STREAM_STATE_BYTES = _declare("stream_state_bytes", "bytes", None, "stream", "bytes the state's tensors own")
STREAM_PEAK_BYTES = _declare("stream_peak_bytes", "bytes", None, "stream", "peak memory above the baseline")
STREAM_RSS_BYTES = _declare("stream_rss_bytes", "bytes", None, "stream", "resident memory above the baseline")
STREAM_HEAP_USED_BYTES = _declare("stream_heap_used_bytes", "bytes", None, "stream",
                                  "bytes the allocator handed out, above the baseline")
STREAM_HEAP_FREE_BYTES = _declare("stream_heap_free_bytes", "bytes", None, "stream",
                                  "bytes the allocator holds but has not handed out, above the baseline")

# memory dynamics (bench/measuring/dynamics.py), per window of tokens
INNER_LOSS = _declare("inner_loss", "loss", None, "dynamics", "the memory's associative loss on its inputs")
GRAD_NORM = _declare("grad_norm", "norm", None, "dynamics", "norm of the inner gradient")
SURPRISE_NORM = _declare("surprise_norm", "norm", None, "dynamics", "norm of the surprise (momentum) S_t")
SURPRISE_ENTROPY = _declare("surprise_entropy", "nats", None, "dynamics", "entropy of the surprise's spread")
MEMORY_NORM = _declare("memory_norm", "norm", None, "dynamics", "Frobenius norm of the memory weights M_t")
DIAGNOSTICS = (INNER_LOSS, GRAD_NORM, SURPRISE_NORM, SURPRISE_ENTROPY, MEMORY_NORM)

# profile costs: a family per measurement, one name per mode
MODES = ("forward", "train")
PROFILE_UNITS = {"time": "s", "memory": "bytes", "flops": "FLOPs", "tokens_per_s": "tokens/s"}


def profiled(family: str, mode: str) -> str:
    """The metric of a profile measurement (`time`, `memory`, `flops`, `tokens_per_s`) in a mode."""
    if family not in PROFILE_UNITS or mode not in MODES:
        raise ValueError(f"no profile metric {family!r} / {mode!r}; families {list(PROFILE_UNITS)}, modes {MODES}")
    if family in ("time", "memory"):
        return f"{family}_{mode}_{'s' if family == 'time' else 'bytes'}"
    return f"{family}_{mode}"


def profile_family(name: str) -> str | None:
    """`time`, `memory`, `flops` or `tokens_per_s` for a profile metric, None for any other name."""
    return _FAMILY_OF.get(name)


_FAMILY_OF = {profiled(family, mode): family for family in PROFILE_UNITS for mode in MODES}
for _name, _family in _FAMILY_OF.items():
    _declare(_name, PROFILE_UNITS[_family], True if _family == "tokens_per_s" else None, "cost",
             f"{_family.replace('_', ' ')} of one step ({_name})")
TIME_FORWARD_S, TIME_TRAIN_S = profiled("time", "forward"), profiled("time", "train")
MEMORY_FORWARD_BYTES, MEMORY_TRAIN_BYTES = profiled("memory", "forward"), profiled("memory", "train")
FLOPS_FORWARD, FLOPS_TRAIN = profiled("flops", "forward"), profiled("flops", "train")

# forecasting (tasks/timeseries.py): errors of the model and of each reference on the same windows
SPLITS, MEASURES = ("val", "test"), ("mse", "mae")
_FORECAST = re.compile(r"^(val|test)_(mse|mae)(?:_(\w+))?$")


def forecast_error(split: str, measure: str, reference: str | None = None) -> str:
    """`test_mse` (the model's error) or `test_mse_dlinear` (a reference forecaster's on the same windows)."""
    if split not in SPLITS or measure not in MEASURES:
        raise ValueError(f"no forecast error {split!r} / {measure!r}; splits {SPLITS}, measures {MEASURES}")
    return f"{split}_{measure}" + (f"_{reference}" if reference else "")


def parse_forecast_error(name: str) -> tuple[str, str, str | None] | None:
    """(split, measure, reference or None) of a forecast error name, None for any other name."""
    m = _FORECAST.match(name)
    return None if m is None else (m[1], m[2], m[3])


TEST_MSE, TEST_MAE = forecast_error("test", "mse"), forecast_error("test", "mae")

EXAMPLE_SERIES = ("input", "target", "forecast")


def example(series: str, reference: str | None = None) -> str:
    """`example_input`, `example_target`, `example_forecast` or a reference's `example_forecast_<reference>`."""
    if series not in EXAMPLE_SERIES or (reference and series != "forecast"):
        raise ValueError(f"no example series {series!r} (reference {reference!r}); series {EXAMPLE_SERIES}, "
                         "a reference only for `forecast`")
    return f"example_{series}" + (f"_{reference}" if reference else "")


def is_example(name: str) -> bool:
    return re.fullmatch(r"example_(input|target|forecast(_\w+)?)", name) is not None


def lookup(name: str) -> Metric:
    """The declaration of a metric name, fixed or patterned; KeyError naming the valid ones otherwise."""
    if name in METRICS:
        return METRICS[name]
    if (error := parse_forecast_error(name)) is not None:
        split, measure, reference = error
        role = "reference" if reference else "quality" if split == "test" else "validation"
        who = f"reference forecaster {reference}" if reference else "the model"
        return Metric(name, "normalised", False, role, f"{measure.upper()} of {who} on the {split} windows")
    if is_example(name):
        return Metric(name, "normalised", None, "example", "one test window's series over offsets")
    raise KeyError(f"undeclared metric {name!r}; declared: {', '.join(METRICS)}, and the patterns "
                   "<val|test>_<mse|mae>[_<reference>] and example_<input|target|forecast>[_<reference>]")


def declared(name: str) -> bool:
    try:
        lookup(name)
    except KeyError:
        return False
    return True


def higher_is_better(name: str) -> bool:
    """Direction of a quality metric; a metric with no direction (a cost, a diagnostic) cannot be ranked."""
    direction = lookup(name).higher_is_better
    if direction is None:
        raise ValueError(f"metric {name!r} has no direction (it is a {lookup(name).role} metric)")
    return direction


def role(name: str) -> str | None:
    """The declared role of a metric name, None for an undeclared one (rows of an older run)."""
    return lookup(name).role if declared(name) else None
