"""Task registry: a new task is one file plus one line in TASKS.

Each spec declares what the analysis needs to know about the task's results, so the report, the plots and the
claims ledger iterate the registry instead of naming tasks: its `headline` metric (the test number a model is
judged by; its direction, higher or lower is better, is the metric's own, declared in bench/metrics.py), the
result axes besides the length n that its headline rows carry (`grid`: a heatmap of axis x n per model, e.g.
NIAH's needle depth), and how its length axis reads (`length_label`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from bench import metrics
from models.registry import make_config
from tasks import copy, mqar, niah, timeseries
from tasks.base import Task


@dataclass(frozen=True)
class TaskSpec:
    name: str
    task_cls: type[Task]
    config_cls: type
    summary: str
    headline: str  # a metric of bench/metrics.py with a direction
    grid: tuple[str, ...] = ()  # row columns besides n that the headline is measured over: one heatmap each
    length_label: str = "sequence length n"

    def __post_init__(self):
        metrics.higher_is_better(self.headline)  # a headline must be declared and rankable

    @property
    def higher_is_better(self) -> bool:
        return metrics.higher_is_better(self.headline)


TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in [
        TaskSpec("copy", copy.CopyTask, copy.CopyConfig, "copy / selective copy, train short, test long",
                 metrics.EXACT_MATCH, length_label="copied tokens n"),
        TaskSpec("mqar", mqar.MqarTask, mqar.MqarConfig,
                 "multi-query associative recall: pairs x length grid, accuracy by key-to-query distance",
                 metrics.QUERY_ACCURACY, grid=("pairs",)),
        TaskSpec("niah", niah.NiahTask, niah.NiahConfig, "needle in a haystack: depth x length grid, byte level",
                 metrics.EXACT_MATCH, grid=("depth",)),
        TaskSpec("timeseries", timeseries.TimeseriesTask, timeseries.TimeseriesConfig,
                 "multivariate forecasting: ETTh1/ETTh2 protocol or the embedded synthetic set", metrics.TEST_MSE),
    ]
}


def names() -> list[str]:
    return list(TASKS)


def spec(name: str) -> TaskSpec:
    if name not in TASKS:
        raise KeyError(f"unknown task {name!r}; valid tasks: {', '.join(TASKS)}")
    return TASKS[name]


def build(name: str, **overrides: Any) -> Task:
    s = spec(name)
    return s.task_cls(make_config(s.config_cls, overrides, f"task '{name}'"))
