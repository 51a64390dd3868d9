"""The task contract. A task owns its data (deterministic from a seed), the input embedding, the output
head and the loss, so any backbone runs on any task. Tasks never import the harness."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn


@dataclass
class Batch:
    inputs: Tensor
    targets: Tensor

    def to(self, device: torch.device | str) -> Batch:
        return Batch(self.inputs.to(device), self.targets.to(device))


class TaskNetwork(nn.Module):
    """embed -> backbone (the model under test) -> head."""

    def __init__(self, embed: nn.Module, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.embed, self.backbone, self.head = embed, backbone, head

    def forward(self, inputs: Tensor, state: Any = None) -> tuple[Tensor, Any]:
        y, state = self.backbone(self.embed(inputs), state)
        return self.head(y), state


def generator(*seeds: int) -> torch.Generator:
    """A CPU generator keyed by several integers (data seed, split, step), independent of call order."""
    key = 0
    for s in seeds:
        key = (key * 1_000_003 + int(s)) % (2**63 - 1)
    return torch.Generator().manual_seed(key)


def wilson_interval(successes: int, trials: int, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson score interval for a binomial proportion (sound at 0 % and 100 %)."""
    if trials == 0:
        return (float("nan"), float("nan"))
    p = successes / trials
    denom = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denom
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


class Task(ABC):
    name: str
    config: Any

    @abstractmethod
    def build_network(self, backbone: nn.Module, d_model: int) -> TaskNetwork: ...

    @abstractmethod
    def train_batch(self, step: int, batch_size: int) -> Batch:
        """The training batch of a given step: the same for the same (data seed, step)."""

    @abstractmethod
    def loss(self, outputs: Tensor, batch: Batch) -> Tensor: ...

    @abstractmethod
    def evaluate(self, net: TaskNetwork, device: torch.device | str) -> list[dict[str, Any]]:
        """Metric rows: dicts with at least metric, value and n (the swept length), plus extra columns."""

    def tokens(self, batch: Batch) -> int:
        return batch.inputs.shape[0] * batch.inputs.shape[1]
