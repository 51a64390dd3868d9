"""Suites are TOML files in bench/suites/. A suite expands into cells.

    description = "..."
    [model_config]            # applied to every model; a sub-table [model_config.NAME] to one model
    d_model = 64
    [[train]]                 # one entry: these models x these seeds on one task
    task = "copy"
    models = ["transformer", "swa"]
    seeds = [0]
    task_config = { train_max_len = 16 }
    train_config = { steps = 400 }
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import models
import tasks
from bench.cells import Cell
from bench.train import TrainConfig
from models.registry import make_config

SUITES_DIR = Path(__file__).parent / "suites"
TRAIN_KEYS = {"task", "models", "seeds", "task_config", "train_config", "model_config"}
TOP_KEYS = {"description", "model_config", "train"}


class SuiteError(ValueError):
    pass


@dataclass(frozen=True)
class Suite:
    name: str
    description: str
    cells: list[Cell]


def available() -> list[str]:
    return sorted(p.stem for p in SUITES_DIR.glob("*.toml"))


def _model_config(shared: dict[str, Any], entry: dict[str, Any], model: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for table in (shared, entry):
        out.update({k: v for k, v in table.items() if not isinstance(v, dict)})
        out.update(table.get(model, {}))
    return out


def expand(name: str, data: dict[str, Any]) -> Suite:
    unknown = set(data) - TOP_KEYS
    if unknown:
        raise SuiteError(f"suite {name!r}: unknown keys {sorted(unknown)}; valid: {sorted(TOP_KEYS)}")
    shared = data.get("model_config", {})
    cells = []
    for i, entry in enumerate(data.get("train", [])):
        where = f"suite {name!r}, [[train]] #{i + 1}"
        bad = set(entry) - TRAIN_KEYS
        if bad or "task" not in entry or "models" not in entry:
            raise SuiteError(f"{where}: needs task and models; unknown keys {sorted(bad)}; valid {sorted(TRAIN_KEYS)}")
        try:
            tasks.build(entry["task"], **entry.get("task_config", {}))
            make_config(TrainConfig, entry.get("train_config", {}), "train")
            for model in entry["models"]:
                models.build(model, **_model_config(shared, entry.get("model_config", {}), model))
        except (KeyError, ValueError, TypeError) as err:
            raise SuiteError(f"{where}: {err}") from err
        for model in entry["models"]:
            for seed in entry.get("seeds", [0]):
                cells.append(Cell(
                    kind="train", model=model, task=entry["task"], seed=int(seed),
                    model_config=_model_config(shared, entry.get("model_config", {}), model),
                    task_config=dict(entry.get("task_config", {})),
                    run_config=dict(entry.get("train_config", {})),
                ))
    return Suite(name, data.get("description", ""), cells)


def load(name_or_path: str) -> Suite:
    path = Path(name_or_path)
    if not path.suffix:
        path = SUITES_DIR / f"{name_or_path}.toml"
    if not path.exists():
        raise SuiteError(f"unknown suite {name_or_path!r}; valid suites: {', '.join(available())} (or a .toml path)")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise SuiteError(f"suite file {path} is not valid TOML: {err}") from err
    return expand(path.stem, data)
