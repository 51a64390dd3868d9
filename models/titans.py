"""What the Titans architectures share: one config, the persistent-memory prefix, the memory gate, and a
stack model that threads streaming state through its blocks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from models.attention import BACKENDS
from models.base import Complexity, SequenceModel
from models.config import above, at_least, check, one_of, require
from models.layers import BlockStack, RMSNorm
from models.neural_memory import PATHS, RULES, MemoryConfig

MAC_PATHS = ("hoisted", "segment_loop")  # models/mac.py: the default, and the segment-by-segment reference


@dataclass(frozen=True)
class TitansConfig:
    """Width and depth match TransformerConfig. Defaults for what the paper leaves open: memory MLP depth 2 and
    hidden width 2 x head_dim, chunk 16, conv kernel 4, inner step max_lr 0.5 with each token's inner gradient
    clipped to norm 1 (MemoryConfig: unclipped, a step above 0.01 diverged in training), 4 persistent tokens,
    window 64 (MAG, MAL), segment 64 (MAC)."""

    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    mlp_ratio: float = 4.0
    mem_depth: int = 2
    mem_expansion: float = 2.0
    chunk: int = 16
    conv_kernel: int = 4
    max_lr: float = 0.5
    momentum: bool = True
    forgetting: bool = True
    rule: str = "titans"  # "titans", "seed", "seed_corrected" (see models/neural_memory.py)
    memory_path: str = "chunked"  # "chunked" (dual form) or "reference" (token loop)
    mem_clip: float = 1.0  # inner gradient norm bound per token (MemoryConfig.clip); 0: off
    n_persistent: int = 4  # N_p learned input-independent tokens (MAC, MAG, MAL)
    window: int = 64  # sliding-window width (MAG, MAL)
    segment: int = 64  # segment length C (MAC)
    mac_path: str = "hoisted"  # MAC: input-only work once per call, or the "segment_loop" reference
    attention: str = "sdpa"
    rope_base: float = 10000.0

    def __post_init__(self):
        check(self, d_model=at_least(1), n_layers=at_least(1), n_heads=at_least(1), mlp_ratio=above(0),
              mem_depth=at_least(1), mem_expansion=above(0), chunk=at_least(1), conv_kernel=at_least(1),
              max_lr=at_least(0), mem_clip=at_least(0), rule=one_of(*RULES), memory_path=one_of(*PATHS),
              n_persistent=at_least(0), window=at_least(1), segment=at_least(1),
              mac_path=one_of(*MAC_PATHS), attention=one_of(*BACKENDS),
              rope_base=above(0))
        require(self.d_model % self.n_heads == 0,
                f"d_model={self.d_model} must be divisible by n_heads={self.n_heads}")

    def memory(self) -> MemoryConfig:
        return MemoryConfig(n_heads=self.n_heads, depth=self.mem_depth, expansion=self.mem_expansion,
                            chunk=self.chunk, conv_kernel=self.conv_kernel, max_lr=self.max_lr,
                            momentum=self.momentum, forgetting=self.forgetting, rule=self.rule,
                            path=self.memory_path, clip=self.mem_clip)


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
