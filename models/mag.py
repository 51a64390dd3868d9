"""MAG, memory as gate: persistent tokens prepended; per block, a sliding-window attention branch (the
persistent tokens stay visible as its prefix) and a neural-memory branch over the same input, combined by
normalised gating norm(attn) * sigmoid(norm(memory))."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from models.attention import AttentionMixer
from models.layers import ResidualBlock
from models.memory import NeuralMemory
from models.titans import MemoryGate, TitansConfig, TitansStack


class GatedMixer(nn.Module):
    def __init__(self, c: TitansConfig):
        super().__init__()
        self.attn = AttentionMixer(c.d_model, c.n_heads, c.attention, c.window, c.n_persistent, c.rope_base)
        self.memory = NeuralMemory(c.d_model, c.memory)
        self.gate = MemoryGate(c.d_model)

    def state_numel(self, n: int) -> int:
        return self.attn.state_numel(n) + self.memory.state_numel(n)

    def forward(self, x: Tensor, state: dict[str, Any] | None = None) -> tuple[Tensor, dict[str, Any]]:
        state = state or {"attn": None, "memory": None}
        y, attn_state = self.attn(x, state["attn"])  # [B, N, D]
        m, memory_state = self.memory(x, state["memory"])  # [B, N, D]
        return self.gate(y, m), {"attn": attn_state, "memory": memory_state}


class MAG(TitansStack):
    def __init__(self, config: TitansConfig):
        c = config
        blocks = [ResidualBlock(c.d_model, GatedMixer(c), c.mlp_ratio) for _ in range(c.n_layers)]
        super().__init__(config, blocks, n_prefix=c.n_persistent)
