"""A cell is one independent unit of a sweep (train + evaluate one model on one task with one seed, or one
profile point). Its id is a hash of its full config: reruns skip cells already in the store."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class Cell:
    kind: str  # "train" (more kinds join with the profilers)
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
        return f"{self.kind} {self.model} {self.task} seed={self.seed}".replace("  ", " ")
