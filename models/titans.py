"""What the Titans architectures share: one config, the persistent-memory prefix, the memory gate, and a
stack model that threads streaming state through its blocks."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor, nn

from models.attention import BACKENDS
from models.base import Complexity, SequenceModel
from models.config import above, at_least, check, one_of, require
from models.layers import BlockStack, RMSNorm
from models.memory import MemoryConfig

MAC_PATHS = ("hoisted", "segment_loop")  # models/mac.py: the default, and the segment-by-segment reference


@dataclass(frozen=True)
class TitansConfig:
    """Width and depth match TransformerConfig. Every memory option is `memory` (MemoryConfig, given as
    `memory.chunk=8` or a `memory` table), whose defaults are those the paper leaves open: memory MLP depth 2
    and hidden width 2 x head_dim, chunk 16, conv kernel 4, inner step max_lr 0.5 with each token's inner
    gradient clipped to norm 1 (unclipped, a step above 0.01 diverged in training). The memory has as many
    heads as the attention unless `memory.n_heads` says otherwise. 4 persistent tokens, window 64 (MAG, MAL),
    segment 64 (MAC)."""

    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    mlp_ratio: float = 4.0
    memory: MemoryConfig = field(default_factory=MemoryConfig)  # n_heads unset: the attention's n_heads
    n_persistent: int = 4  # N_p learned input-independent tokens (MAC, MAG, MAL)
    window: int = 64  # sliding-window width (MAG, MAL)
    segment: int = 64  # segment length C (MAC)
    mac_path: str = "hoisted"  # MAC: input-only work once per call, or the "segment_loop" reference
    attention: str = "sdpa"
    rope_base: float = 10000.0

    def __post_init__(self):
        check(self, d_model=at_least(1), n_layers=at_least(1), n_heads=at_least(1), mlp_ratio=above(0),
              n_persistent=at_least(0), window=at_least(1), segment=at_least(1),
              mac_path=one_of(*MAC_PATHS), attention=one_of(*BACKENDS),
              rope_base=above(0))
        require(self.d_model % self.n_heads == 0,
                f"d_model={self.d_model} must be divisible by n_heads={self.n_heads}")
        if self.memory.n_heads is None:
            object.__setattr__(self, "memory", replace(self.memory, n_heads=self.n_heads))  # frozen: set once here
        require(self.d_model % self.memory.n_heads == 0,
                f"d_model={self.d_model} must be divisible by memory.n_heads={self.memory.n_heads}")


class MemoryGate(nn.Module):
    """Normalised gating of a branch by the memory: norm(y) * sigmoid(norm(m))."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm_y, self.norm_m = RMSNorm(dim), RMSNorm(dim)

    def forward(self, y: Tensor, m: Tensor) -> Tensor:
        return self.norm_y(y) * torch.sigmoid(self.norm_m(m))


class TitansStack(SequenceModel):
    """Blocks over the sequence, with `n_prefix` learned persistent tokens prepended at the start of the
    stream (seen by every later token, dropped from the output)."""

    def __init__(self, config: TitansConfig, blocks: list[nn.Module], n_prefix: int):
        super().__init__()
        self.config = config
        self.stack = BlockStack(config.d_model, blocks)
        self.persistent = nn.Parameter(torch.randn(n_prefix, config.d_model) * 0.02) if n_prefix else None

    def forward(self, x: Tensor, state: Any = None) -> tuple[Tensor, Any]:
        n_p = 0
        if state is None and self.persistent is not None:
            n_p = self.persistent.shape[0]
            x = torch.cat([self.persistent.to(x.dtype).expand(x.shape[0], -1, -1), x], dim=1)
        y, state = self.stack(x, state)
        return y[:, n_p:], state

    @property
    def complexity(self) -> Complexity:
        return Complexity(time="n", memory="n")

    def state_numel(self, n: int) -> int:
        return self.stack.state_numel(n)
