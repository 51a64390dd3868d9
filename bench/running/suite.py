"""Suites are TOML files in bench/suites/. A suite expands into cells.

    description = "..."
    sweep = false             # true: a recipe sweep (each model under several settings), which compares no models
    [model_config]            # applied to every model; a sub-table [model_config.NAME] to one model
    d_model = 64
    [[train]]                 # one entry: these models x these seeds on one task
    task = "copy"
    models = ["transformer", "swa"]
    seeds = [0]
    task_config = { train_max_len = 16 }
    train_config = { steps = 400 }

Every entry is a typed dataclass (TrainEntry, ProfileEntry, StreamEntry, DynamicsEntry) and every model, task,
training and profile config in it is built once at expansion, so a wrong key, type or range stops the suite
before any cell runs, with a message naming the entry, the key, the value and what is valid. A cell listed
twice (`seeds = [0, 0]`, or two entries that overlap) is kept once: its rows would otherwise be stored twice.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import models
import tasks
from bench.cells import Cell, DynamicsRun, ProfileRun, StreamRun, TrainRun
from bench.measuring.dynamics import STREAMS
from bench.measuring.profile import METRICS
from bench.metrics import MODES
from models.config import ConfigError, Rule, above, at_least, check, each, make_config, one_of
from models.memory import RULES

SUITES_DIR = Path(__file__).parent.parent / "suites"
SECTIONS = ("train", "profile", "stream", "dynamics")
SEED = Rule(lambda s: 0 <= s < 2**63, "in [0, 2^63)")
DYNAMICS_MODEL = models.in_family("memory")[0]  # dynamics cells run one memory layer: rows name the memory model


class SuiteError(ValueError):
    pass


@dataclass(frozen=True)
class Suite:
    name: str
    description: str
    cells: list[Cell]
    duplicates: int = 0  # cells listed more than once, kept once
    sweep: bool = False  # a recipe sweep: models are not compared, so their parameter counts need not match


@dataclass(frozen=True)
class TrainEntry:
    task: str
    models: tuple[str, ...]
    seeds: tuple[int, ...] = (0,)
    task_config: dict[str, Any] = field(default_factory=dict)
    train_config: dict[str, Any] = field(default_factory=dict)
    model_config: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        check(self, task=one_of(*tasks.names()), seeds=each(SEED))


@dataclass(frozen=True)
class ProfileEntry:
    models: tuple[str, ...]
    lengths: tuple[int, ...]
    metrics: tuple[str, ...] = METRICS
    modes: tuple[str, ...] = MODES
    profile: dict[str, Any] = field(default_factory=dict)
    model_config: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        check(self, lengths=each(at_least(1)), metrics=each(one_of(*METRICS)), modes=each(one_of(*MODES)))


@dataclass(frozen=True)
class StreamEntry:
    models: tuple[str, ...]
    checkpoints: tuple[int, ...]
    piece: int = 8192
    budget_s: float = 300.0
    model_config: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        check(self, checkpoints=each(at_least(1)), piece=at_least(1), budget_s=above(0))


@dataclass(frozen=True)
class DynamicsEntry:
    streams: tuple[str, ...] = STREAMS
    rules: tuple[str, ...] = RULES
    n: int = 2048
    window: int = 64
    seeds: tuple[int, ...] = (0,)
    memory: dict[str, Any] = field(default_factory=dict)  # MemoryConfig options besides `rule`
    train_steps: int = 0  # > 0: the layer's outer parameters are trained first (bench/measuring/dynamics.py)

    def __post_init__(self):
        check(self, streams=each(one_of(*STREAMS)), rules=each(one_of(*RULES)), n=at_least(1),
              window=at_least(1), seeds=each(SEED), train_steps=at_least(0))


def available() -> list[str]:
    return sorted(p.stem for p in SUITES_DIR.glob("*.toml"))


def _model_config(shared: dict[str, Any], entry: dict[str, Any], model: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for table in (shared, entry):
        out.update({k: v for k, v in table.items() if not isinstance(v, dict)})
        out.update(table.get(model, {}))
    return out


def _per_model_tables(where: str, table: dict[str, Any]) -> None:
    """Sub-tables of a model_config are per-model options: their names must be models."""
    bad = sorted(k for k, v in table.items() if isinstance(v, dict) and k not in models.MODELS)
    if bad:
        raise SuiteError(f"{where}: model_config sub-table(s) {bad} are not models; valid: {', '.join(models.names())}")


def _models(where: str, shared: dict[str, Any], entry: Any) -> list[tuple[str, dict[str, Any]]]:
    """(model, its merged config) for each model of an entry, each config built once to check it."""
    _per_model_tables(where, entry.model_config)
    out = []
    for model in entry.models:
        if model not in models.MODELS:
            raise SuiteError(f"{where}: unknown model {model!r}; valid models: {', '.join(models.names())}")
        cfg = _model_config(shared, entry.model_config, model)
        make_config(models.spec(model).config_cls, cfg, f"model '{model}'")
        out.append((model, cfg))
    return out


def train_cells(where: str, shared: dict[str, Any], entry: TrainEntry) -> list[Cell]:
    tasks.build(entry.task, **entry.task_config)
    run = TrainRun.from_dict(entry.train_config)
    return [Cell(model=model, run_config=run, task=entry.task, seed=seed, model_config=cfg,
                 task_config=dict(entry.task_config))
            for model, cfg in _models(where, shared, entry) for seed in entry.seeds]


def profile_cells(where: str, shared: dict[str, Any], entry: ProfileEntry) -> list[Cell]:
    return [Cell(model=model, model_config=cfg, run_config=ProfileRun(n, metric, entry.modes, entry.profile))
            for model, cfg in _models(where, shared, entry) for metric in entry.metrics
            for n in sorted(entry.lengths)]


def stream_cells(where: str, shared: dict[str, Any], entry: StreamEntry) -> list[Cell]:
    run = StreamRun(tuple(sorted(entry.checkpoints)), entry.piece, entry.budget_s)
    return [Cell(model=m, model_config=cfg, run_config=run) for m, cfg in _models(where, shared, entry)]


def dynamics_cells(where: str, shared: dict[str, Any], entry: DynamicsEntry) -> list[Cell]:
    return [Cell(model=DYNAMICS_MODEL, seed=seed, run_config=DynamicsRun(stream, rule, entry.n, entry.window,
                                                                           entry.memory, entry.train_steps))
            for stream in entry.streams for rule in entry.rules for seed in entry.seeds]


ENTRIES = {"train": (TrainEntry, train_cells), "profile": (ProfileEntry, profile_cells),
           "stream": (StreamEntry, stream_cells), "dynamics": (DynamicsEntry, dynamics_cells)}


def expand(name: str, data: dict[str, Any], where: str | None = None) -> Suite:
    """The cells of a suite, each once. `where` replaces "suite NAME, [[section]] #i" in error messages (the
    train and profile commands build a one-entry suite from their flags)."""
    valid = {"description", "sweep", "model_config", *SECTIONS}
    unknown = set(data) - valid
    if unknown:
        raise SuiteError(f"suite {name!r}: unknown keys {sorted(unknown)}; valid: {sorted(valid)}")
    description, shared, sweep = data.get("description", ""), data.get("model_config", {}), data.get("sweep", False)
    if not isinstance(description, str) or not isinstance(shared, dict) or not isinstance(sweep, bool):
        raise SuiteError(f"suite {name!r}: description must be a string, sweep true or false and model_config a "
                         f"table, got {description!r}, {sweep!r} and {shared!r}")
    _per_model_tables(f"suite {name!r}", shared)
    cells: list[Cell] = []
    for section in SECTIONS:
        entries = data.get(section, [])
        if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
            raise SuiteError(f"suite {name!r}: {section} must be a list of tables ([[{section}]] entries), "
                             f"got {entries!r}")
        entry_cls, make_cells = ENTRIES[section]
        for i, raw in enumerate(entries):
            at = where if where is not None else f"suite {name!r}, [[{section}]] #{i + 1}"
            try:
                cells += make_cells(at, shared, make_config(entry_cls, raw, at, noun="key"))
            except (ConfigError, KeyError) as err:
                message = err.args[0] if isinstance(err, KeyError) else str(err)
                named = message.startswith((at, f"unknown {at} "))  # make_config named the entry already
                raise SuiteError(message if named else f"{at}: {message}") from err
    if not cells:
        raise SuiteError(f"suite {name!r} has no cells: add a [[train]], [[profile]], [[stream]] or [[dynamics]] "
                         "entry")
    unique: dict[str, Cell] = {}
    for cell in cells:
        unique.setdefault(cell.id, cell)
    return Suite(name, description, list(unique.values()), duplicates=len(cells) - len(unique), sweep=sweep)


def load(name_or_path: str) -> Suite:
    path = Path(name_or_path)
    if not path.suffix:
        path = SUITES_DIR / f"{name_or_path}.toml"
    if not path.is_file():
        raise SuiteError(f"unknown suite {name_or_path!r}; valid suites: {', '.join(available())} (or a .toml path)")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise SuiteError(f"suite file {path} is not valid TOML: {err}") from err
    except (OSError, UnicodeDecodeError) as err:
        raise SuiteError(f"cannot read suite file {path}: {err}") from err
    return expand(path.stem, data)
