"""The model contract every backbone follows.

forward(x: [B, N, D], state=None) -> (y: [B, N, D], state). Output at position t depends only on inputs
at positions <= t (tested for every registered model). Passing the returned state to the next call
continues the stream: one call over a sequence equals the same sequence cut into pieces.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

COMPLEXITY_CLASSES = ("1", "log n", "n", "n log n", "n^2")


@dataclass(frozen=True)
class Complexity:
    """Expected growth in sequence length n, as declared (the claims ledger tests these)."""

    time: str
    memory: str

    def __post_init__(self):
        for value in (self.time, self.memory):
            if value not in COMPLEXITY_CLASSES:
                raise ValueError(f"complexity {value!r} not in {COMPLEXITY_CLASSES}")


class SequenceModel(nn.Module, ABC):
    config: Any

    @abstractmethod
    def forward(self, x: Tensor, state: Any = None) -> tuple[Tensor, Any]: ...

    @property
    @abstractmethod
    def complexity(self) -> Complexity: ...

    @property
    def streams(self) -> bool:
        """True when the carried state stays bounded as the stream grows (a KV cache does not)."""
        return self.state_numel(1 << 20) == self.state_numel(1 << 10)

    @abstractmethod
    def state_numel(self, n: int) -> int:
        """Numbers held in the recurrent state (per sequence) after n tokens."""

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
