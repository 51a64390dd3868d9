"""Needle in a haystack, token level, for models trained from scratch (RULER's single needle, byte level).

A sequence of n tokens: a haystack with a needle `NEEDLE key SEP value END` inserted at depth d % of the
haystack, then the query `QUERY key SEP`, after which the model must emit `value EOS`. Loss and metrics
cover the value and EOS only. Optional distractor needles carry other keys, so that the key matters.

Haystacks: `noise` (one filler sentence repeated, RULER style), `text` (a real text file read as bytes,
tinyshakespeare by default, at a random offset), `random` (uniform printable bytes). Needle values:
`passkey` (5 digits), `number` (7 digits), `word` (from a fixed list), `uuid` (8-4 hex). Keys are 4
lowercase letters. Training samples depths uniformly and, per batch, a length between a quarter of the
training length and the training length (short batches teach the lookup sooner and cost less); evaluation
runs a depth x length grid.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.config import at_least, check, each
from tasks.base import (
    IGNORE,
    SPLITS,
    Batch,
    Task,
    TaskNetwork,
    accuracy_rows,
    answer_hits,
    generator,
    pack,
    token_loss,
)
from tasks.data import locate

PAD, BOS, EOS, NEEDLE, SEP, END, QUERY = 256, 257, 258, 259, 260, 261, 262
VOCAB = 263  # bytes 0..255 and the markers above
FILLER = b"The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
WORDS = ("apple", "river", "stone", "cloud", "tiger", "maple", "ocean", "ember", "frost", "lemon", "orbit", "piano",
         "quartz", "raven", "saddle", "tulip", "violet", "walnut", "yacht", "zebra", "canyon", "dragon", "falcon",
         "harbor", "island", "jungle", "kettle", "lantern", "meadow", "nectar", "oyster", "pepper")
HAYSTACKS = ("noise", "text", "random")
NEEDLES = ("passkey", "number", "word", "uuid")


@dataclass(frozen=True)
class NiahConfig:
    haystack: str = "noise"
    needle: str = "passkey"
    train_length: int = 512
    train_min_length: int | None = None  # each batch draws its length in [min, train_length]; default: a quarter
    eval_lengths: tuple[int, ...] = (256, 512, 1024, 2048)
    depths: tuple[float, ...] = (0.0, 25.0, 50.0, 75.0, 100.0)
    eval_samples: int = 50  # per (length, depth) cell
    val_batches: int = 4  # validation: batches of 32 from the training distribution, the validation stream
    distractors: int = 0
    lm_weight: float = 0.1  # weight of an auxiliary next-byte loss on the rest of the sequence (0: answer only)
    text_path: str | None = None  # haystack "text": any text file; default tinyshakespeare via the data finder
    data_dir: str | None = None
    data_seed: int = 0

    def __post_init__(self):
        if self.haystack not in HAYSTACKS:
            raise ValueError(f"unknown haystack {self.haystack!r}; valid: {', '.join(HAYSTACKS)}")
        if self.needle not in NEEDLES:
            raise ValueError(f"unknown needle {self.needle!r}; valid: {', '.join(NEEDLES)}")
        check(self, train_length=at_least(1), train_min_length=at_least(1), eval_lengths=each(at_least(1)),
              eval_samples=at_least(1), distractors=at_least(0), lm_weight=at_least(0), data_seed=at_least(0))
        if any(not 0 <= d <= 100 for d in self.depths):
            raise ValueError(f"depths are percentages in [0, 100], got {self.depths}")
        shortest = min(self.train_length, self.train_min_length or self.train_length // 4, *self.eval_lengths)
        if shortest < 64 * (1 + self.distractors):
            raise ValueError(f"length {shortest} too short for a needle, the query and {self.distractors} distractors: "
                             f"use >= {64 * (1 + self.distractors)}")


class NiahTask(Task):
    name = "niah"

    def __init__(self, config: NiahConfig):
        self.config = config
        self.vocab = VOCAB

    @cached_property
    def text(self) -> bytes:
        c = self.config
        path = c.text_path or locate("tinyshakespeare", data_dir=c.data_dir)
        return open(path, "rb").read()

    def prepare(self) -> None:
        if self.config.haystack == "text":
            self.text  # noqa: B018  (locate and verify the file before training)

    def _value(self, gen: torch.Generator) -> bytes:
        kind = self.config.needle
        if kind in ("passkey", "number"):
            digits = 5 if kind == "passkey" else 7
            return "".join(str(int(d)) for d in torch.randint(0, 10, (digits,), generator=gen)).encode()
        if kind == "word":
            return WORDS[int(torch.randint(0, len(WORDS), (1,), generator=gen))].encode()
        hexes = "".join("0123456789abcdef"[int(d)] for d in torch.randint(0, 16, (12,), generator=gen))
        return f"{hexes[:8]}-{hexes[8:]}".encode()

    def _key(self, gen: torch.Generator) -> bytes:
        return bytes(int(c) + 97 for c in torch.randint(0, 26, (4,), generator=gen))

    def _haystack(self, gen: torch.Generator, size: int) -> list[int]:
        kind = self.config.haystack
        if kind == "random":
            return (torch.randint(32, 127, (size,), generator=gen)).tolist()
        source = FILLER if kind == "noise" else self.text
        start = int(torch.randint(0, len(source), (1,), generator=gen))
        reps = (start + size) // len(source) + 1
        return list((source * reps)[start : start + size])

    def example(self, gen: torch.Generator, length: int, depth: float) -> tuple[list[int], list[bool]]:
        """Exactly `length` tokens; the target needle starts at `depth` % of the haystack."""
        key, value = self._key(gen), self._value(gen)
        needle = [NEEDLE, *key, SEP, *value, END]
        query = [QUERY, *key, SEP]
        answer = [*value, EOS]
        others = []
        for _ in range(self.config.distractors):
            other = self._key(gen)
            while other == key:
                other = self._key(gen)
            others.append([NEEDLE, *other, SEP, *self._value(gen), END])
        fill = length - 1 - len(needle) - sum(map(len, others)) - len(query) - len(answer)
        hay = self._haystack(gen, fill)
        inserts = [(round(depth / 100 * fill), 0, needle)]
        inserts += [(int(torch.randint(0, fill + 1, (1,), generator=gen)), 1, o) for o in others]
        body: list[int] = []
        last = 0
        for at, _, piece in sorted(inserts, key=lambda t: (t[0], t[1])):
            body += hay[last:at] + piece
            last = at
        body += hay[last:]
        tokens = [BOS, *body, *query, *answer]
        marks = [False] * (len(tokens) - len(answer)) + [True] * len(answer)
        return tokens, marks

    @property
    def variant(self) -> str:
        return f"{self.config.haystack}/{self.config.needle}"

    def batch(self, split: str, index: int, batch_size: int) -> Batch:
        """A batch of the training distribution from a split's stream: one length per batch, depths uniform."""
        c = self.config
        gen = generator(c.data_seed, SPLITS[split], index)
        length = int(torch.randint(c.train_min_length or c.train_length // 4, c.train_length + 1, (1,), generator=gen))
        depths = (torch.rand(batch_size, generator=gen) * 100).tolist()
        return pack([self.example(gen, length, d) for d in depths], PAD)

    def train_batch(self, step: int, batch_size: int) -> Batch:
        return self.batch("train", step, batch_size)

    def validation_batches(self) -> list[Batch]:
        return [self.batch("val", i, 32) for i in range(self.config.val_batches)]

    def build_network(self, backbone: nn.Module, d_model: int) -> TaskNetwork:
        return TaskNetwork(nn.Embedding(VOCAB, d_model), backbone, nn.Linear(d_model, VOCAB))

    def loss(self, outputs: Tensor, batch: Batch) -> Tensor:
        """Cross-entropy on the answer, plus lm_weight x next-byte loss elsewhere: predicting a repeated
        haystack is itself a copy-from-context problem, which grows the lookup circuits sooner."""
        answer = token_loss(outputs, batch)
        if not self.config.lm_weight:
            return answer
        nxt = batch.inputs[:, 1:].masked_fill(batch.inputs[:, 1:] == PAD, IGNORE)
        lm = F.cross_entropy(outputs[:, :-1].flatten(0, 1), nxt.flatten(), ignore_index=IGNORE)
        return answer + self.config.lm_weight * lm

    def tokens(self, batch: Batch) -> int:
        return batch.inputs.numel()

    @torch.inference_mode()
    def evaluate(self, net: TaskNetwork, device: torch.device | str, chunk: int = 25) -> list[dict[str, Any]]:
        c = self.config
        rows = []
        for length in c.eval_lengths:
            for depth in c.depths:
                exact = correct = total = 0
                for start in range(0, c.eval_samples, chunk):
                    size = min(chunk, c.eval_samples - start)
                    gen = generator(c.data_seed, SPLITS["test"], length, int(depth * 100), start)
                    batch = pack([self.example(gen, length, depth) for _ in range(size)], PAD).to(device)
                    hits = answer_hits(net(batch.inputs)[0], batch.targets)
                    exact, correct, total = exact + hits[0], correct + hits[1], total + hits[2]
                rows += accuracy_rows(exact, correct, total, c.eval_samples, n=length, depth=depth,
                                      variant=self.variant, trained_length=c.train_length)
        return rows
