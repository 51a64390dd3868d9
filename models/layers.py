"""Layers every architecture shares: norm, rotary positions, MLP, the pre-norm residual block and the
stack that threads streaming state through it. Written once, reused by every model file."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rotary_tables(start: int, n: int, dh: int, base: float, dtype: torch.dtype,
                  device: torch.device) -> tuple[Tensor, Tensor]:
    """cos and sin of the rotary angles at positions start..start+n-1, [n, dh // 2] each."""
    half = dh // 2
    inv_freq = base ** (-torch.arange(half, device=device, dtype=torch.float64) / half)
    pos = torch.arange(start, start + n, device=device, dtype=torch.float64)
    angles = torch.outer(pos, inv_freq)  # [N, dh/2]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rotary(x: Tensor, start: int, base: float = 10000.0) -> Tensor:
    """Rotate pairs of channels by position-dependent angles. x: [B, H, N, dh], positions start..start+N."""
    return rotate(x, *rotary_tables(start, x.shape[-2], x.shape[-1], base, x.dtype, x.device))


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """`rotary` with its tables given (cos, sin [N, dh // 2] from `rotary_tables`): x [B, H, N, dh]; an odd
    last channel stays as it is."""
    dh = x.shape[-1]
    half = dh // 2
    x1, x2 = x[..., :half], x[..., half : 2 * half]
    rotated = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return torch.cat([rotated, x[..., 2 * half :]], dim=-1) if dh % 2 else rotated


class MLP(nn.Module):
    """SwiGLU feed-forward; hidden width chosen so its parameter count matches a 4x GELU MLP."""

    def __init__(self, dim: int, ratio: float = 4.0):
        super().__init__()
        hidden = int(2 * ratio * dim / 3)
        self.gate_up = nn.Linear(dim, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class ResidualBlock(nn.Module):
    """Pre-norm block: x + mixer(norm(x)), then x + mlp(norm(x)). The mixer is any module with the
    sequence contract `mixer(x, state) -> (y, state)`."""

    def __init__(self, dim: int, mixer: nn.Module, mlp_ratio: float):
        super().__init__()
        self.norm1, self.mixer = RMSNorm(dim), mixer
        self.norm2, self.mlp = RMSNorm(dim), MLP(dim, mlp_ratio)

    def forward(self, x: Tensor, state: Any = None) -> tuple[Tensor, Any]:
        h, state = self.mixer(self.norm1(x), state)
        x = x + h
        return x + self.mlp(self.norm2(x)), state


class BlockStack(nn.Module):
    """A stack of residual blocks with a final norm; the streaming state is one entry per block."""

    def __init__(self, dim: int, blocks: list[nn.Module]):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.norm = RMSNorm(dim)

    def forward(self, x: Tensor, state: list | None = None) -> tuple[Tensor, list]:
        state = state if state is not None else [None] * len(self.blocks)
        new_state = []
        for block, block_state in zip(self.blocks, state, strict=True):
            x, block_state = block(x, block_state)
            new_state.append(block_state)
        return self.norm(x), new_state

    def state_numel(self, n: int) -> int:
        return sum(block.mixer.state_numel(n) for block in self.blocks)
