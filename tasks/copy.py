"""Copy tasks. `copy`: BOS s SEP s EOS over a small alphabet ("Repeat After Me", Jelassi et al. 2024);
`selective`: the tokens of s scattered among noise over `spread * len(s)` positions, then SEP, then s in
order (MAD / zoology style). Train on short strings, evaluate on longer ones: that is where a fixed-size
memory and full attention differ, above all across the attention window of the hybrids.

Metrics are teacher-forced argmax over the answer (the copied tokens and EOS); see tasks.base.answer_hits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from models.config import at_least, check, each
from tasks.base import SPLITS, Batch, TaskNetwork, TokenTask, accuracy_rows, answer_hits, generator, pack

PAD, BOS, SEP, EOS, NOISE = 0, 1, 2, 3, 4
FIRST_SYMBOL = 5


@dataclass(frozen=True)
class CopyConfig:
    variant: str = "copy"  # "copy" or "selective"
    alphabet: int = 26
    train_min_len: int = 1
    train_max_len: int = 16
    eval_lengths: tuple[int, ...] = (8, 16, 24, 32, 48, 64)
    eval_samples: int = 200
    spread: int = 4  # selective: positions in the scatter region per copied token
    val_batches: int = 4  # validation: batches of 64 from the training distribution, the validation stream
    data_seed: int = 0

    def __post_init__(self):
        if self.variant not in ("copy", "selective"):
            raise ValueError(f"unknown copy variant {self.variant!r}; valid: copy, selective")
        if not 1 <= self.train_min_len <= self.train_max_len:
            raise ValueError(
                f"need 1 <= train_min_len <= train_max_len, got {self.train_min_len}, {self.train_max_len}"
            )
        check(self, eval_lengths=each(at_least(1)), alphabet=at_least(2), spread=at_least(1),
              eval_samples=at_least(1), data_seed=at_least(0))


class CopyTask(TokenTask):
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
        return pack([self._example(gen, n) for n in lengths], PAD)

    @property
    def variant(self) -> str:
        return self.config.variant

    def batch(self, split: str, index: int, batch_size: int) -> Batch:
        """A batch of the training distribution (string lengths drawn per example) from a split's stream."""
        c = self.config
        gen = generator(c.data_seed, SPLITS[split], index)
        lengths = torch.randint(c.train_min_len, c.train_max_len + 1, (batch_size,), generator=gen).tolist()
        return self._batch(gen, lengths)


    @torch.inference_mode()
    def evaluate(self, net: TaskNetwork, device: torch.device | str, chunk: int = 50) -> list[dict[str, Any]]:
        c = self.config
        rows = []
        for length in c.eval_lengths:
            exact, correct, total = 0, 0, 0
            for start in range(0, c.eval_samples, chunk):
                size = min(chunk, c.eval_samples - start)
                batch = self._batch(generator(c.data_seed, SPLITS["test"], length, start), [length] * size).to(device)
                hits = answer_hits(net(batch.inputs)[0], batch.targets)
                exact, correct, total = exact + hits[0], correct + hits[1], total + hits[2]
            rows += accuracy_rows(exact, correct, total, c.eval_samples, n=length, seq_len=int(batch.inputs.shape[1]),
                                  variant=c.variant, trained_length=c.train_max_len)
        return rows
