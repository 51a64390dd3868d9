"""A cell is one independent unit of a sweep (train + evaluate one model on one task with one seed, or one
profile point). Its id is a hash of its full config: reruns skip cells already in the store.

What a cell runs is typed: one frozen, validated run config per kind (TrainRun, ProfileRun, StreamRun,
DynamicsRun; the kind is the run config's), read by the runner of that kind as attributes. `as_dict` writes a cell
in the shape the store's `config` column holds, and `Cell.from_dict` reads it back (bench.measuring.memprobe's
request is a cell so written). A nested option table (a training or profile config) keeps the options as the suite
gave them, which is what is stored and hashed (defaults spelt out and integers stay as written, so the id of a
cell is the one it had when run configs were plain dicts), and is built into its typed config once, at
construction: the runners read the typed config."""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

from bench.measuring.dynamics import STREAMS
from bench.measuring.profile import METRICS, ProfileConfig
from bench.measuring.train import TrainConfig
from bench.metrics import MODES
from models.config import above, at_least, check, each, make_config, one_of, require
from models.memory import RULES, MemoryConfig


class RunConfig(ABC):
    """What a cell of one kind runs; subclasses are frozen dataclasses that check their values."""

    kind: ClassVar[str]

    @abstractmethod
    def as_dict(self) -> dict[str, Any]:
        """The JSON-ready form stored in the `config` column (and hashed into the cell id)."""

    @classmethod
    @abstractmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig: ...

    def length(self) -> int | None:
        """The sequence length the cell measures at (a profile point, a dynamics stream), None for other kinds."""
        return None

    @property
    def label(self) -> str:
        return ""


@dataclass(frozen=True)
class TrainRun(RunConfig):
    kind: ClassVar[str] = "train"
    options: dict[str, Any] = field(default_factory=dict)  # TrainConfig options, as given
    train: TrainConfig = field(init=False)

    def __post_init__(self):
        object.__setattr__(self, "train", make_config(TrainConfig, self.options, "train"))

    def as_dict(self) -> dict[str, Any]:
        return dict(self.options)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainRun:
        return cls(dict(data))


@dataclass(frozen=True)
class ProfileRun(RunConfig):
    """One point of a profile series: a metric family (time, memory, flops) of a model at length n."""

    kind: ClassVar[str] = "profile"
    n: int
    metric: str
    modes: tuple[str, ...] = MODES
    options: dict[str, Any] = field(default_factory=dict)  # ProfileConfig options, as given
    profile: ProfileConfig = field(init=False)

    def __post_init__(self):
        check(self, n=at_least(1), metric=one_of(*METRICS), modes=each(one_of(*MODES)))
        object.__setattr__(self, "profile", make_config(ProfileConfig, self.options, "profile"))

    def as_dict(self) -> dict[str, Any]:
        return {"n": self.n, "metric": self.metric, "modes": list(self.modes), "profile": dict(self.options)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ProfileRun:
        return cls(data["n"], data["metric"], tuple(data.get("modes", MODES)), dict(data.get("profile", {})))

    def length(self) -> int:
        return self.n

    @property
    def label(self) -> str:
        return f"metric={self.metric} n={self.n}"


@dataclass(frozen=True)
class StreamRun(RunConfig):
    """A stream of checkpoints[-1] tokens read in pieces with the state carried, measured at each checkpoint."""

    kind: ClassVar[str] = "stream"
    checkpoints: tuple[int, ...]
    piece: int = 8192
    budget_s: float = 300.0

    def __post_init__(self):
        check(self, checkpoints=each(at_least(1)), piece=at_least(1), budget_s=above(0))
        require(list(self.checkpoints) == sorted(self.checkpoints), f"checkpoints {self.checkpoints} must ascend")

    @property
    def total(self) -> int:
        return self.checkpoints[-1]

    def as_dict(self) -> dict[str, Any]:
        return {"total": self.total, "piece": self.piece, "checkpoints": list(self.checkpoints),
                "budget_s": self.budget_s}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StreamRun:
        return cls(tuple(data["checkpoints"]), data["piece"], data["budget_s"])


@dataclass(frozen=True)
class DynamicsRun(RunConfig):
    """One memory layer reading a stream of n tokens under an update rule (bench/measuring/dynamics.py); `memory`
    holds the layer's MemoryConfig options besides the rule, `train_steps` > 0 trains its outer parameters first."""

    kind: ClassVar[str] = "dynamics"
    stream: str
    rule: str
    n: int = 2048
    window: int = 64
    memory: dict[str, Any] = field(default_factory=dict)
    train_steps: int = 0

    def __post_init__(self):
        check(self, stream=one_of(*STREAMS), rule=one_of(*RULES), n=at_least(1), window=at_least(1),
              train_steps=at_least(0))
        require("rule" not in self.memory, "memory sets `rule`; list the rules in `rules` instead")
        make_config(MemoryConfig, self.memory, "dynamics memory")

    def as_dict(self) -> dict[str, Any]:
        return {"stream": self.stream, "rule": self.rule, "n": self.n, "window": self.window,
                "memory": dict(self.memory), **({"train_steps": self.train_steps} if self.train_steps else {})}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DynamicsRun:
        return cls(data["stream"], data["rule"], data["n"], data["window"], data.get("memory", {}),
                   data.get("train_steps", 0))

    def length(self) -> int:
        return self.n

    @property
    def label(self) -> str:
        return f"n={self.n} stream={self.stream} rule={self.rule}"


RUNS: dict[str, type[RunConfig]] = {cls.kind: cls for cls in (TrainRun, ProfileRun, StreamRun, DynamicsRun)}


@dataclass(frozen=True)
class Cell:
    model: str
    run_config: RunConfig
    task: str = ""
    seed: int = 0
    model_config: dict[str, Any] = field(default_factory=dict)
    task_config: dict[str, Any] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        """"train", "profile", "stream" or "dynamics" (see RUNNERS in bench/running/execute.py)."""
        return self.run_config.kind

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "model": self.model, "task": self.task, "seed": self.seed,
                "model_config": self.model_config, "task_config": self.task_config,
                "run_config": self.run_config.as_dict()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Cell:
        if data.get("kind") not in RUNS:
            raise ValueError(f"unknown cell kind {data.get('kind')!r}; valid: {', '.join(RUNS)}")
        return cls(data["model"], RUNS[data["kind"]].from_dict(data["run_config"]), data.get("task", ""),
                   data.get("seed", 0), data.get("model_config", {}), data.get("task_config", {}))

    @property
    def id(self) -> str:
        canonical = json.dumps(self.as_dict(), sort_keys=True, default=list)
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    @property
    def label(self) -> str:
        return " ".join(part for part in (self.kind, self.model, self.task, self.run_config.label) if part)

    @property
    def series(self) -> str | None:
        """Profile cells of one (model, metric, settings) series, ignoring n: a budget failure at some n
        skips the larger n of the same series."""
        if self.kind != "profile":
            return None
        rest = {k: v for k, v in self.run_config.as_dict().items() if k != "n"}
        return json.dumps([self.model, self.model_config, rest], sort_keys=True, default=list)
