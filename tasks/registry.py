"""Task registry: a new task is one file plus one line in TASKS."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from models.registry import make_config
from tasks import copy, mqar, niah, timeseries
from tasks.base import Task


@dataclass(frozen=True)
class TaskSpec:
    name: str
    task_cls: type[Task]
    config_cls: type
    summary: str


TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in [
        TaskSpec("copy", copy.CopyTask, copy.CopyConfig, "copy / selective copy, train short, test long"),
        TaskSpec("mqar", mqar.MqarTask, mqar.MqarConfig,
                 "multi-query associative recall: pairs x length grid, accuracy by key-to-query distance"),
        TaskSpec("niah", niah.NiahTask, niah.NiahConfig, "needle in a haystack: depth x length grid, byte level"),
        TaskSpec("timeseries", timeseries.TimeseriesTask, timeseries.TimeseriesConfig,
                 "multivariate forecasting: ETTh1/ETTh2 protocol or the embedded synthetic set"),
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
