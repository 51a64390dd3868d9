"""The task contract. A task owns its data (deterministic from a seed), the input embedding, the output
head and the loss, so any backbone runs on any task. Tasks never import the harness, except bench.metrics (the
names of the metrics they write, a module that imports nothing of the project)."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from bench.metrics import EXACT_MATCH, TOKEN_ACCURACY, VAL_ACCURACY, VAL_LOSS


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


SPLITS = {"train": 0, "test": 1, "val": 2}  # data streams: generator(data_seed, SPLITS[split], ...)


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
    return (min(p, max(0.0, centre - half)), max(p, min(1.0, centre + half)))


IGNORE = -100  # target of positions that carry no loss


def pack(examples: list[tuple[list[int], list[bool]]], pad: int) -> Batch:
    """Token sequences with, per token, whether the model must predict it -> next-token batch, right-padded.
    Right padding is safe for causal models: nothing before the padding can see it."""
    width = max(len(tokens) for tokens, _ in examples) - 1
    inputs = torch.full((len(examples), width), pad, dtype=torch.long)
    targets = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    for row, (tokens, answer) in enumerate(examples):
        t = torch.tensor(tokens)
        inputs[row, : len(t) - 1] = t[:-1]
        targets[row, : len(t) - 1] = torch.where(torch.tensor(answer[1:]), t[1:], IGNORE)
    return Batch(inputs, targets)


def answer_hits(logits: Tensor, targets: Tensor) -> tuple[int, int, int]:
    """Teacher-forced argmax over the answer positions: (exact rows, correct tokens, answer tokens).
    Exact match this way equals greedy decoding's: both fail at the first wrong token."""
    scored = targets != IGNORE
    hit = (logits.argmax(-1) == targets) & scored
    exact = int((hit.sum(1) == scored.sum(1)).sum())
    return exact, int(hit.sum()), int(scored.sum())


def token_loss(outputs: Tensor, batch: Batch) -> Tensor:
    return torch.nn.functional.cross_entropy(outputs.flatten(0, 1), batch.targets.flatten(), ignore_index=IGNORE)


def accuracy_rows(exact: int, correct: int, total: int, samples: int, **columns: Any) -> list[dict[str, Any]]:
    low, high = wilson_interval(exact, samples)
    return [{**columns, "samples": samples, "metric": EXACT_MATCH, "value": exact / samples, "ci_low": low,
             "ci_high": high},
            {**columns, "samples": samples, "metric": TOKEN_ACCURACY, "value": correct / max(total, 1)}]


class Task(ABC):
    name: str
    config: Any
    validation_headline: str = EXACT_MATCH  # which answer accuracy validate() reports as val_accuracy

    def prepare(self) -> None:  # noqa: B027 (a no-op by default: most tasks have no files)
        """Load and verify any data files now, so that a missing one fails before training starts."""

    @abstractmethod
    def build_network(self, backbone: nn.Module, d_model: int) -> nn.Module:
        """embed -> backbone -> head; forward(inputs, state) -> (outputs, state)."""

    @abstractmethod
    def train_batch(self, step: int, batch_size: int) -> Batch:
        """The training batch of a given step: the same for the same (data seed, step)."""

    @abstractmethod
    def loss(self, outputs: Tensor, batch: Batch) -> Tensor: ...

    @abstractmethod
    def evaluate(self, net: nn.Module, device: torch.device | str) -> list[dict[str, Any]]:
        """Metric rows: dicts with at least metric, value and n (the swept length), plus extra columns."""

    @property
    def variant(self) -> str:
        """Which form of the task this is (copy or selective copy, a haystack and needle, a dataset): results of
        different variants are never pooled. Every row of a training cell carries it."""
        return self.name

    def validation_batches(self) -> list[Batch]:
        """Fixed batches of the training distribution from the validation stream; none by default."""
        return []

    @torch.inference_mode()
    def validate(self, net: nn.Module, device: torch.device | str) -> dict[str, float]:
        """Held-out loss (`val_loss`, for checkpoint selection) and answer accuracy (`val_accuracy`, for choosing
        recipes) on the validation batches: the training distribution, never the test grid. Empty without them."""
        batches = self.validation_batches()
        if not batches:
            return {}
        was_training = net.training
        net.eval()
        loss = exact = correct = answers = rows = 0
        for batch in batches:
            batch = batch.to(device)
            outputs = net(batch.inputs)[0]
            loss += float(self.loss(outputs, batch)) * batch.inputs.shape[0]
            hits = answer_hits(outputs, batch.targets)
            exact, correct, answers = exact + hits[0], correct + hits[1], answers + hits[2]
            rows += batch.inputs.shape[0]
        net.train(was_training)
        accuracy = exact / rows if self.validation_headline == EXACT_MATCH else correct / max(answers, 1)
        return {VAL_LOSS: loss / rows, VAL_ACCURACY: accuracy}

    def tokens(self, batch: Batch) -> int:
        return batch.inputs.shape[0] * batch.inputs.shape[1]


class TokenTask(Task):
    """A task over token sequences with answers marked: batches drawn from a split's own stream
    (`batch(split, index, size)`), validation batches of 64 from the validation stream, an embedding and a
    linear head over `self.vocab`, cross-entropy on the answers only."""

    vocab: int
    validation_batch_size = 64

    @abstractmethod
    def batch(self, split: str, index: int, batch_size: int) -> Batch:
        """A batch of the training distribution from a split's stream: the same for the same (seed, split, index)."""

    def train_batch(self, step: int, batch_size: int) -> Batch:
        return self.batch("train", step, batch_size)

    def validation_batches(self) -> list[Batch]:
        return [self.batch("val", i, self.validation_batch_size) for i in range(self.config.val_batches)]

    def build_network(self, backbone: nn.Module, d_model: int) -> TaskNetwork:
        return TaskNetwork(nn.Embedding(self.vocab, d_model), backbone, nn.Linear(d_model, self.vocab))

    def loss(self, outputs: Tensor, batch: Batch) -> Tensor:
        return token_loss(outputs, batch)
