"""A cell is one independent unit of a sweep (train + evaluate one model on one task with one seed, or one
profile point). Its id is a hash of its full config: reruns skip cells already in the store."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class Cell:
    kind: str  # "train", "profile", "stream" or "dynamics" (see RUNNERS in bench/running/execute.py)
    model: str
    task: str = ""
    seed: int = 0
    model_config: dict[str, Any] = field(default_factory=dict)
    task_config: dict[str, Any] = field(default_factory=dict)
    run_config: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def id(self) -> str:
        canonical = json.dumps(self.as_dict(), sort_keys=True, default=list)
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    @property
    def label(self) -> str:
        extra = " ".join(f"{k}={self.run_config[k]}" for k in ("metric", "n", "stream", "rule") if k in self.run_config)
        return " ".join(part for part in (self.kind, self.model, self.task, extra) if part)

    @property
    def series(self) -> str | None:
        """Profile cells of one (model, metric, settings) series, ignoring n: a budget failure at some n
        skips the larger n of the same series."""
        if self.kind != "profile":
            return None
        rest = {k: v for k, v in self.run_config.items() if k != "n"}
        return json.dumps([self.model, self.model_config, rest], sort_keys=True, default=list)
