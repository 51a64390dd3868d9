"""Multi-query associative recall (MQAR; Arora et al. 2023, "Zoology"), with a gap that moves the queries away
from their pairs.

One sequence of n tokens:

    BOS  k_1 v_1 ... k_K v_K  FILL x gap  q_1 a_1 ... q_Q a_Q

Keys are K distinct tokens from the first half of the symbol vocabulary, values tokens (repeats allowed) from the
second half, so a token's role is never ambiguous. The queries are Q of the K keys in random order and each
answer a_j is the value that followed q_j among the pairs. Loss and metrics cover the answers only: the model
must predict a_j at the position of q_j. The gap of FILL tokens grows the distance between a pair and its query
without adding pairs, so the evaluation grid separates capacity (pairs) from distance (length).

Training draws K and the gap per batch from ranges; validation draws from the same ranges with its own data
stream (recipes are chosen there); the test grid runs (pairs x total length) well past the training range.
Metrics: per-query accuracy with a 95 % Wilson interval over queries (queries of one sequence share a context,
so the interval is optimistic when errors cluster), the whole-sequence exact match, and accuracy by the distance
from a key to its query in power-of-two bins.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from bench.metrics import EXACT_MATCH, QUERY_ACCURACY, QUERY_ACCURACY_BY_DISTANCE
from tasks.base import (
    IGNORE,
    SPLITS,
    Batch,
    TaskNetwork,
    TokenTask,
    answer_hits,
    generator,
    pack,
    wilson_interval,
)

PAD, BOS, FILL = 0, 1, 2
FIRST_SYMBOL = 3


@dataclass(frozen=True)
class MqarConfig:
    vocab: int = 256  # every token id, the three markers included; keys and values split the rest in halves
    pairs: tuple[int, int] = (4, 16)  # training: K drawn per batch from [low, high]
    gap: tuple[int, int] = (0, 64)  # training: FILL tokens between the pairs and the queries, drawn from [low, high]
    queries: int = 0  # Q queries per sequence; 0: every key once
    eval_pairs: tuple[int, ...] = (4, 8, 16, 32)
    eval_lengths: tuple[int, ...] = (64, 128, 256, 512, 1024)  # total sequence length n of the test grid
    eval_samples: int = 100  # sequences per (pairs, length) cell
    val_batches: int = 4  # validation: batches of the training distribution from the validation stream
    data_seed: int = 0

    def __post_init__(self):
        half = (self.vocab - FIRST_SYMBOL) // 2
        if half < 2:
            raise ValueError(f"mqar vocab must be >= {FIRST_SYMBOL + 4} (three markers, then keys and values), "
                             f"got {self.vocab}")
        for name in ("pairs", "gap"):
            low, high = getattr(self, name)
            if not 0 <= low <= high or (name == "pairs" and low < 1):
                raise ValueError(f"mqar {name} must be a range [low, high] with {1 if name == 'pairs' else 0} <= low "
                                 f"<= high, got {getattr(self, name)}")
        most = max(self.pairs[1], *self.eval_pairs)
        if most > half:
            raise ValueError(f"mqar: {most} pairs need {most} distinct keys but vocab {self.vocab} has {half}")
        if self.queries < 0 or self.queries > min(self.pairs[0], *self.eval_pairs):
            raise ValueError(f"mqar queries must be 0 (every key) or at most the fewest pairs "
                             f"({min(self.pairs[0], *self.eval_pairs)}), got {self.queries}")
        if min(self.eval_pairs) < 1 or min(self.eval_lengths) < 1 or self.eval_samples < 1 or self.val_batches < 1:
            raise ValueError("mqar eval_pairs, eval_lengths, eval_samples and val_batches must be >= 1")

    def length(self, pairs: int, gap: int) -> int:
        """Total tokens of a sequence with this many pairs and this gap."""
        return 1 + 2 * pairs + gap + 2 * (self.queries or pairs)


def distance_bin(distance: int) -> int:
    """Lower edge of the power-of-two bin [2^j, 2^(j+1)) holding a key-to-query distance."""
    return 1 << int(math.log2(max(distance, 1)))


class MqarTask(TokenTask):
    name = "mqar"
    validation_headline = QUERY_ACCURACY  # every answer is one token: answer-token accuracy

    def __init__(self, config: MqarConfig):
        self.config = config
        self.vocab = config.vocab
        self.half = (config.vocab - FIRST_SYMBOL) // 2

    def example(self, gen: torch.Generator, pairs: int, gap: int) -> tuple[list[int], list[bool], list[int]]:
        """Tokens, per token whether it is an answer, and per answer the distance from its key to its query."""
        keys = (torch.randperm(self.half, generator=gen)[:pairs] + FIRST_SYMBOL).tolist()
        values = (torch.randint(0, self.half, (pairs,), generator=gen) + FIRST_SYMBOL + self.half).tolist()
        asked = torch.randperm(pairs, generator=gen)[: self.config.queries or pairs].tolist()
        tokens = [BOS]
        for k, v in zip(keys, values, strict=True):
            tokens += [k, v]
        tokens += [FILL] * gap
        answer = [False] * len(tokens)
        distances = []
        for i in asked:
            distances.append(len(tokens) - (1 + 2 * i))  # the query's position minus its key's
            tokens += [keys[i], values[i]]
            answer += [False, True]
        return tokens, answer, distances

    def batch(self, split: str, index: int, batch_size: int) -> Batch:
        """A batch of the training distribution: K and the gap drawn once per batch."""
        c = self.config
        gen = generator(c.data_seed, SPLITS[split], index)
        pairs = int(torch.randint(c.pairs[0], c.pairs[1] + 1, (1,), generator=gen))
        gap = int(torch.randint(c.gap[0], c.gap[1] + 1, (1,), generator=gen))
        return pack([self.example(gen, pairs, gap)[:2] for _ in range(batch_size)], PAD)


    def grid(self) -> list[tuple[int, int]]:
        """(pairs, length) cells of the test grid that can hold their pairs and queries."""
        c = self.config
        return [(k, n) for k in c.eval_pairs for n in c.eval_lengths if n >= c.length(k, 0)]

    @torch.inference_mode()
    def evaluate(self, net: TaskNetwork, device: torch.device | str, chunk: int = 50) -> list[dict[str, Any]]:
        c = self.config
        rows: list[dict[str, Any]] = []
        by_distance: dict[tuple[int, int], list[int]] = {}  # (length, bin) -> [hits, queries]
        for pairs, length in self.grid():
            hits = queries = exact = 0
            for start in range(0, c.eval_samples, chunk):
                size = min(chunk, c.eval_samples - start)
                gen = generator(c.data_seed, SPLITS["test"], pairs, length, start)
                examples = [self.example(gen, pairs, length - c.length(pairs, 0)) for _ in range(size)]
                batch = pack([e[:2] for e in examples], PAD).to(device)
                logits = net(batch.inputs)[0]
                scored = batch.targets != IGNORE
                right = (logits.argmax(-1) == batch.targets) & scored
                exact += answer_hits(logits, batch.targets)[0]
                for row, (_, _, distances) in enumerate(examples):
                    correct = right[row][scored[row]].tolist()  # answers in query order
                    for d, ok in zip(distances, correct, strict=True):
                        tally = by_distance.setdefault((length, distance_bin(d)), [0, 0])
                        tally[0] += ok
                        tally[1] += 1
                hits += int(right.sum())
                queries += int(scored.sum())
            low, high = wilson_interval(hits, queries)
            common = {"n": length, "pairs": pairs, "trained_length": c.length(c.pairs[1], c.gap[1]),
                      "trained_pairs": c.pairs[1]}
            rows.append({**common, "metric": QUERY_ACCURACY, "value": hits / queries, "ci_low": low,
                         "ci_high": high, "samples": queries})
            low, high = wilson_interval(exact, c.eval_samples)
            rows.append({**common, "metric": EXACT_MATCH, "value": exact / c.eval_samples, "ci_low": low,
                         "ci_high": high, "samples": c.eval_samples})
        for (length, distance), (hit, total) in sorted(by_distance.items()):
            low, high = wilson_interval(hit, total)
            rows.append({"n": length, "distance": distance, "metric": QUERY_ACCURACY_BY_DISTANCE,
                         "value": hit / total, "ci_low": low, "ci_high": high, "samples": total})
        return rows
