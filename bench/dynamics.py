"""Memory dynamics for claims C6-C8: one memory layer (default Titans config, untrained) reads a stream
with per-token diagnostics. Streams: `stationary` (tokens drawn from a fixed set of 32 patterns plus small
noise) and `shift` (the pattern set is replaced half-way). Rules: the paper's, and the seed paper's update as
written and sign-corrected. Rows are averages over batch, heads and windows of `window` tokens."""

from __future__ import annotations

from typing import Any

import torch

from models.neural_memory import MemoryConfig, NeuralMemory

DIAGNOSTICS = ("inner_loss", "grad_norm", "surprise_norm", "surprise_entropy", "memory_norm")


def make_stream(kind: str, n: int, dim: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    sets = [torch.randn(32, dim, generator=gen) for _ in range(2)]
    which = torch.randint(0, 32, (2, n), generator=gen)
    x = sets[0][which[0]]
    if kind == "shift":
        x[n // 2 :] = sets[1][which[1, n // 2 :]]
    elif kind != "stationary":
        raise ValueError(f"unknown stream {kind!r}; valid: stationary, shift")
    return (x + 0.05 * torch.randn(n, dim, generator=gen)).unsqueeze(0)


@torch.no_grad()
def run_dynamics(stream_kind: str, rule: str, n: int, window: int, dim: int = 64, seed: int = 0,
                 memory: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    torch.manual_seed(seed)
    layer = NeuralMemory(dim, MemoryConfig(rule=rule, **(memory or {})))
    diag: dict[str, list] = {key: [] for key in DIAGNOSTICS}
    layer(make_stream(stream_kind, n, dim, seed), diagnostics=diag)
    rows = []
    for key, values in diag.items():
        series = torch.stack(values).mean(dim=(1, 2))  # [n]
        for start in range(0, n, window):
            chunk = series[start : start + window]
            status = "ok" if torch.isfinite(chunk).all() else "diverged"
            rows.append({"n": start + len(chunk), "metric": key, "value": float(chunk.mean()),
                         "variant": f"{stream_kind}/{rule}", "status": status})
    return rows
