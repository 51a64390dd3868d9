"""Copy tasks. `copy`: BOS s SEP s EOS over a small alphabet ("Repeat After Me", Jelassi et al. 2024);
`selective`: the tokens of s scattered among noise over `spread * len(s)` positions, then SEP, then s in
order (MAD / zoology style). Train on short strings, evaluate on longer ones: that is where a fixed-size
memory and full attention differ, above all across the attention window of the hybrids.

Metrics are teacher-forced argmax over the answer (the copied tokens and EOS). Exact match under teacher
forcing equals exact match of greedy decoding: both fail at the first wrong token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tasks.base import Batch, Task, TaskNetwork, generator, wilson_interval

PAD, BOS, SEP, EOS, NOISE = 0, 1, 2, 3, 4
FIRST_SYMBOL = 5
IGNORE = -100


@dataclass(frozen=True)
class CopyConfig:
    variant: str = "copy"  # "copy" or "selective"
    alphabet: int = 26
    train_min_len: int = 1
    train_max_len: int = 16
    eval_lengths: tuple[int, ...] = (8, 16, 24, 32, 48, 64)
    eval_samples: int = 200
    spread: int = 4  # selective: positions in the scatter region per copied token
    data_seed: int = 0

    def __post_init__(self):
        if self.variant not in ("copy", "selective"):
            raise ValueError(f"unknown copy variant {self.variant!r}; valid: copy, selective")
        if not 1 <= self.train_min_len <= self.train_max_len:
            raise ValueError(
                f"need 1 <= train_min_len <= train_max_len, got {self.train_min_len}, {self.train_max_len}"
            )
        if min(self.eval_lengths, default=1) < 1 or self.alphabet < 2 or self.spread < 1:
            raise ValueError("eval lengths must be >= 1, alphabet >= 2, spread >= 1")


class CopyTask(Task):
    name = "copy"

    def __init__(self, config: CopyConfig):
        self.config = config
        self.vocab = FIRST_SYMBOL + config.alphabet

    def _example(self, gen: torch.Generator, length: int) -> tuple[list[int], list[bool]]:
        """Token list and, per token, whether it is an answer token the model must predict."""
        c = self.config
        s = (torch.randint(0, c.alphabet, (length,), generator=gen) + FIRST_SYMBOL).tolist()
        if c.variant == "copy":
            source = s
        else:
            region = length * c.spread
            slots = torch.randperm(region, generator=gen)[:length].sort().values.tolist()
            source = [NOISE] * region
            for slot, tok in zip(slots, s, strict=True):
                source[slot] = tok
        tokens = [BOS, *source, SEP, *s, EOS]
        answer = [False] * (len(source) + 2) + [True] * (length + 1)
        return tokens, answer

    def _batch(self, gen: torch.Generator, lengths: list[int]) -> Batch:
        examples = [self._example(gen, n) for n in lengths]
        width = max(len(t) for t, _ in examples) - 1
        inputs = torch.full((len(examples), width), PAD, dtype=torch.long)
        targets = torch.full((len(examples), width), IGNORE, dtype=torch.long)
        for row, (tokens, answer) in enumerate(examples):
            t = torch.tensor(tokens)
            inputs[row, : len(t) - 1] = t[:-1]
            targets[row, : len(t) - 1] = torch.where(torch.tensor(answer[1:]), t[1:], IGNORE)
        return Batch(inputs, targets)

    def train_batch(self, step: int, batch_size: int) -> Batch:
        c = self.config
        gen = generator(c.data_seed, 0, step)
        lengths = torch.randint(c.train_min_len, c.train_max_len + 1, (batch_size,), generator=gen).tolist()
        return self._batch(gen, lengths)

    def build_network(self, backbone: nn.Module, d_model: int) -> TaskNetwork:
        return TaskNetwork(nn.Embedding(self.vocab, d_model), backbone, nn.Linear(d_model, self.vocab))

    def loss(self, outputs: Tensor, batch: Batch) -> Tensor:
        return F.cross_entropy(outputs.flatten(0, 1), batch.targets.flatten(), ignore_index=IGNORE)

    @torch.inference_mode()
    def evaluate(self, net: TaskNetwork, device: torch.device | str, chunk: int = 50) -> list[dict[str, Any]]:
        c = self.config
        rows = []
        for length in c.eval_lengths:
            exact, correct, total = 0, 0, 0
            for start in range(0, c.eval_samples, chunk):
                size = min(chunk, c.eval_samples - start)
                batch = self._batch(generator(c.data_seed, 1, length, start), [length] * size).to(device)
                pred = net(batch.inputs)[0].argmax(-1)
                scored = batch.targets != IGNORE
                hit = (pred == batch.targets) & scored
                exact += int((hit.sum(1) == scored.sum(1)).sum())
                correct, total = correct + int(hit.sum()), total + int(scored.sum())
            low, high = wilson_interval(exact, c.eval_samples)
            seq_len = int(batch.inputs.shape[1])
            base = {"n": length, "seq_len": seq_len, "samples": c.eval_samples, "variant": c.variant}
            rows.append({**base, "metric": "exact_match", "value": exact / c.eval_samples,
                         "ci_low": low, "ci_high": high})
            rows.append({**base, "metric": "token_accuracy", "value": correct / total})
        return rows
