"""Memory dynamics for claims C6-C8: one memory layer (default Titans config) reads a stream with per-token
diagnostics. Rows are averages over batch, heads and windows of `window` tokens.

Streams: `stationary` walks a fixed set of 32 patterns (plus small noise) by a Markov chain drawn with the stream
(each pattern is followed by its own successor with probability 0.75, by a uniform draw otherwise); `shift`
replaces the pattern set and the chain half-way. Rules: the paper's, and the seed paper's update as written and
sign-corrected.

Untrained or trained. An untrained layer (random projections and gates) shows what the update rule does by
itself (C7, C8). A claim about the memory inside a model (C6: surprise converges) needs the outer parameters
trained: with `train_steps` > 0 the layer and a linear head first learn to predict the next vector of fresh
streams of the same kind (their patterns and chain differ from the measured stream's, so the successor map can
only be learned in context, by the memory). Such rows carry the variant suffix `/trained`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from bench.metrics import DIAGNOSTICS
from models.memory import MemoryConfig, NeuralMemory

STREAMS = ("stationary", "shift")
PATTERNS, FOLLOW = 32, 0.75
TRAIN_LENGTH, TRAIN_BATCH, TRAIN_LR = 256, 8, 3e-3


def _walk(n: int, perm: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Pattern ids of a Markov chain: the successor perm[i] with probability FOLLOW, else uniform."""
    jumps = torch.randint(0, PATTERNS, (n,), generator=gen)
    follow = torch.rand(n, generator=gen) < FOLLOW
    ids = [int(jumps[0])]
    for t in range(1, n):
        ids.append(int(perm[ids[-1]]) if follow[t] else int(jumps[t]))
    return torch.tensor(ids)


def make_stream(kind: str, n: int, dim: int, seed: int) -> torch.Tensor:
    """[1, n, dim] stream of one seed (patterns, chain and noise all drawn from it)."""
    if kind not in STREAMS:
        raise ValueError(f"unknown stream {kind!r}; valid: {', '.join(STREAMS)}")
    gen = torch.Generator().manual_seed(seed)
    sets = [torch.randn(PATTERNS, dim, generator=gen) for _ in range(2)]
    walks = [_walk(n, torch.randperm(PATTERNS, generator=gen), gen) for _ in range(2)]
    x = sets[0][walks[0]]
    if kind == "shift":
        x[n // 2 :] = sets[1][walks[1][n // 2 :]]
    return (x + 0.05 * torch.randn(n, dim, generator=gen)).unsqueeze(0)


def train_memory(layer: NeuralMemory, kind: str, steps: int, dim: int, seed: int) -> float:
    """Trains the layer's outer parameters (projections, gates, output) with a linear head to predict the next
    vector; returns the final training loss. Training streams use seeds disjoint from the measured ones."""
    head = nn.Linear(dim, dim)
    opt = torch.optim.AdamW([*layer.parameters(), *head.parameters()], lr=TRAIN_LR)
    loss = torch.tensor(float("nan"))
    for step in range(steps):
        first = 1_000_000 * (seed + 1) + step * TRAIN_BATCH
        x = torch.cat([make_stream(kind, TRAIN_LENGTH + 1, dim, first + b) for b in range(TRAIN_BATCH)])
        y, _ = layer(x[:, :-1])
        loss = (head(y) - x[:, 1:]).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return float(loss.detach())


def run_dynamics(stream_kind: str, rule: str, n: int, window: int, dim: int = 64, seed: int = 0,
                 memory: dict[str, Any] | None = None, train_steps: int = 0) -> list[dict[str, Any]]:
    torch.manual_seed(seed)
    layer = NeuralMemory(dim, MemoryConfig(rule=rule, **(memory or {})))
    trained = {"trained_steps": train_steps}
    if train_steps:
        trained["train_loss"] = train_memory(layer, stream_kind, train_steps, dim, seed)
    variant = f"{stream_kind}/{rule}" + ("/trained" if train_steps else "")
    diag: dict[str, list] = {key: [] for key in DIAGNOSTICS}
    with torch.no_grad():
        layer(make_stream(stream_kind, n, dim, seed), diagnostics=diag)
    rows = []
    for key, values in diag.items():
        series = torch.stack(values).mean(dim=(1, 2))  # [n]
        for start in range(0, n, window):
            chunk = series[start : start + window]
            status = "ok" if torch.isfinite(chunk).all() else "diverged"
            rows.append({"n": start + len(chunk), "metric": key, "value": float(chunk.mean()),
                         "variant": variant, "status": status, **trained})
    return rows
