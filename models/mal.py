"""MAL, memory as layer: persistent tokens prepended; per block the neural memory layer, then
sliding-window attention over its output (persistent tokens kept visible as the attention prefix)."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from models.attention import AttentionMixer
from models.layers import ResidualBlock, RMSNorm
from models.memory import NeuralMemory
from models.titans import TitansConfig, TitansStack


class MemoryThenAttention(nn.Module):
    def __init__(self, c: TitansConfig):
        super().__init__()
        self.memory = NeuralMemory(c.d_model, c.memory)
        self.norm = RMSNorm(c.d_model)
        self.attn = AttentionMixer(c.d_model, c.n_heads, c.attention, c.window, c.n_persistent, c.rope_base)

    def state_numel(self, n: int) -> int:
        return self.attn.state_numel(n) + self.memory.state_numel(n)

    def forward(self, x: Tensor, state: dict[str, Any] | None = None) -> tuple[Tensor, dict[str, Any]]:
        state = state or {"attn": None, "memory": None}
        m, memory_state = self.memory(x, state["memory"])
        y, attn_state = self.attn(self.norm(x + m), state["attn"])
        return y, {"attn": attn_state, "memory": memory_state}


class MAL(TitansStack):
    def __init__(self, config: TitansConfig):
        c = config
        blocks = [ResidualBlock(c.d_model, MemoryThenAttention(c), c.mlp_ratio) for _ in range(c.n_layers)]
        super().__init__(config, blocks, n_prefix=c.n_persistent)
