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
from bench.profile import METRICS, MODES, ProfileConfig
from bench.train import TrainConfig
from models.registry import make_config

SUITES_DIR = Path(__file__).parent / "suites"
TRAIN_KEYS = {"task", "models", "seeds", "task_config", "train_config", "model_config"}
PROFILE_KEYS = {"models", "lengths", "metrics", "modes", "profile", "model_config"}
STREAM_KEYS = {"models", "total", "piece", "checkpoints", "budget_s", "model_config"}
DYNAMICS_KEYS = {"streams", "rules", "n", "window", "seeds", "memory"}
TOP_KEYS = {"description", "model_config", "train", "profile", "stream", "dynamics"}


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
    cells = train_cells(name, shared, data.get("train", []))
    cells += profile_cells(name, shared, data.get("profile", []))
    cells += stream_cells(name, shared, data.get("stream", []))
    cells += dynamics_cells(name, data.get("dynamics", []))
    return Suite(name, data.get("description", ""), cells)


def _check(where: str, entry: dict[str, Any], valid: set[str], required: set[str]) -> None:
    bad, missing = set(entry) - valid, required - set(entry)
    if bad or missing:
        raise SuiteError(f"{where}: missing {sorted(missing)}, unknown {sorted(bad)}; valid keys {sorted(valid)}")


def _models(where: str, shared: dict[str, Any], entry: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for model in entry["models"]:
        cfg = _model_config(shared, entry.get("model_config", {}), model)
        try:
            models.build(model, **cfg)
        except (KeyError, ValueError, TypeError) as err:
            raise SuiteError(f"{where}: {err}") from err
        out.append((model, cfg))
    return out


def train_cells(name: str, shared: dict[str, Any], entries: list[dict[str, Any]]) -> list[Cell]:
    cells = []
    for i, entry in enumerate(entries):
        where = f"suite {name!r}, [[train]] #{i + 1}"
        _check(where, entry, TRAIN_KEYS, {"task", "models"})
        try:
            tasks.build(entry["task"], **entry.get("task_config", {}))
            make_config(TrainConfig, entry.get("train_config", {}), "train")
        except (KeyError, ValueError, TypeError) as err:
            raise SuiteError(f"{where}: {err}") from err
        for model, cfg in _models(where, shared, entry):
            for seed in entry.get("seeds", [0]):
                cells.append(Cell(kind="train", model=model, task=entry["task"], seed=int(seed), model_config=cfg,
                                  task_config=dict(entry.get("task_config", {})),
                                  run_config=dict(entry.get("train_config", {}))))
    return cells


def profile_cells(name: str, shared: dict[str, Any], entries: list[dict[str, Any]]) -> list[Cell]:
    cells = []
    for i, entry in enumerate(entries):
        where = f"suite {name!r}, [[profile]] #{i + 1}"
        _check(where, entry, PROFILE_KEYS, {"models", "lengths"})
        metrics, modes = entry.get("metrics", list(METRICS)), entry.get("modes", list(MODES))
        if set(metrics) - set(METRICS) or set(modes) - set(MODES) or min(entry["lengths"]) < 1:
            raise SuiteError(f"{where}: metrics from {METRICS}, modes from {MODES}, lengths >= 1")
        make_config(ProfileConfig, entry.get("profile", {}), "profile")
        for model, cfg in _models(where, shared, entry):
            for metric in metrics:
                for n in sorted(entry["lengths"]):
                    cells.append(Cell(kind="profile", model=model, model_config=cfg, run_config={
                        "n": int(n), "metric": metric, "modes": list(modes), "profile": entry.get("profile", {})}))
    return cells


def stream_cells(name: str, shared: dict[str, Any], entries: list[dict[str, Any]]) -> list[Cell]:
    cells = []
    for i, entry in enumerate(entries):
        where = f"suite {name!r}, [[stream]] #{i + 1}"
        _check(where, entry, STREAM_KEYS, {"models", "checkpoints"})
        checkpoints = sorted(int(c) for c in entry["checkpoints"])
        run = {"total": checkpoints[-1], "piece": int(entry.get("piece", 8192)), "checkpoints": checkpoints,
               "budget_s": float(entry.get("budget_s", 300))}
        pairs = _models(where, shared, entry)
        cells += [Cell(kind="stream", model=m, model_config=cfg, run_config=run) for m, cfg in pairs]
    return cells


def dynamics_cells(name: str, entries: list[dict[str, Any]]) -> list[Cell]:
    cells = []
    for i, entry in enumerate(entries):
        _check(f"suite {name!r}, [[dynamics]] #{i + 1}", entry, DYNAMICS_KEYS, set())
        for stream in entry.get("streams", ["stationary", "shift"]):
            for rule in entry.get("rules", ["titans", "seed", "seed_corrected"]):
                for seed in entry.get("seeds", [0]):
                    cells.append(Cell(kind="dynamics", model="lmm", seed=int(seed), run_config={
                        "stream": stream, "rule": rule, "n": int(entry.get("n", 2048)),
                        "window": int(entry.get("window", 64)), "memory": entry.get("memory", {})}))
    return cells


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
