"""Transformer (Vaswani et al. 2017) as pre-norm causal blocks with rotary positions, and the same
network with sliding-window attention only (`swa`), the linear-cost attention baseline."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor

from models.attention import BACKENDS, AttentionMixer
from models.base import Complexity, SequenceModel
from models.config import above, at_least, check, one_of, require
from models.layers import BlockStack, ResidualBlock


@dataclass(frozen=True)
class TransformerConfig:
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    mlp_ratio: float = 4.0
    attention: str = "sdpa"  # "naive" (materialised n x n scores) or "sdpa" (fused kernel)
    window: int | None = None  # None: full causal attention; w: each token sees the last w tokens
    rope_base: float = 10000.0

    def __post_init__(self):
        check(self, d_model=at_least(1), n_layers=at_least(1), n_heads=at_least(1), mlp_ratio=above(0),
              attention=one_of(*BACKENDS), window=at_least(1), rope_base=above(0))
        require(self.d_model % self.n_heads == 0,
                f"d_model={self.d_model} must be divisible by n_heads={self.n_heads}")


@dataclass(frozen=True)
class SWAConfig(TransformerConfig):
    window: int | None = 64


@dataclass(frozen=True)
class NaiveTransformerConfig(TransformerConfig):
    attention: str = "naive"


class Transformer(SequenceModel):
    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.config = c = config
        blocks = [
            ResidualBlock(
                c.d_model, AttentionMixer(c.d_model, c.n_heads, c.attention, c.window, 0, c.rope_base), c.mlp_ratio
            )
            for _ in range(c.n_layers)
        ]
        self.stack = BlockStack(c.d_model, blocks)

    def forward(self, x: Tensor, state: Any = None) -> tuple[Tensor, Any]:
        return self.stack(x, state)

    @property
    def complexity(self) -> Complexity:
        if self.config.window is not None:
            return Complexity(time="n", memory="n")
        return Complexity(time="n^2", memory="n^2" if self.config.attention == "naive" else "n")

    def state_numel(self, n: int) -> int:
        return self.stack.state_numel(n)  # the KV cache: all keys/values, or the last w
