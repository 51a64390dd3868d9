"""MAC, memory as context. The sequence is cut into segments of C tokens (aligned to stream positions).
For segment s, in every block:
  1. retrieve h = M_{s-1}(q) with the memory as it was before the segment (no update);
  2. attend from the segment's tokens over [persistent tokens | h | segment], causal over h and over the
     segment (token i sees h_j and x_j for j <= i only: h_j carries token j's query, so later reads would leak);
  3. write the memory with the (normalised) attention output y, token by token: the read at t follows
     the write of t;
  4. output y gated by that read: norm(y) * sigmoid(norm(M_t(y_t))).
Attention cost O(C (C + N_p)) per segment: O(n C) overall. Streaming state: the memory scan state, the
memory weights at the segment start, and the keys/values of the segment's tokens so far."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from models.attention import causal_mask, check_backend, masked_attention
from models.layers import ResidualBlock, RMSNorm, rotary
from models.neural_memory import NeuralMemory
from models.titans import MemoryGate, TitansConfig, TitansStack


class MemoryAsContext(nn.Module):
    def __init__(self, c: TitansConfig):
        super().__init__()
        check_backend(c.attention)
        if c.segment < 1:
            raise ValueError(f"segment must be >= 1, got {c.segment}")
        self.c = c
        self.memory = NeuralMemory(c.d_model, c.memory(), retrieval=True)
        self.persistent = nn.Parameter(torch.randn(c.n_persistent, c.d_model) * 0.02)
        self.qkv = nn.Linear(c.d_model, 3 * c.d_model, bias=False)
        self.out = nn.Linear(c.d_model, c.d_model, bias=False)
        self.gate = MemoryGate(c.d_model)
        self.write_norm = RMSNorm(c.d_model)

    def state_numel(self, n: int) -> int:
        weights = sum(w[0].numel() for w in self.memory.init_weights) * self.c.n_heads
        return self.memory.state_numel(n) + weights + 4 * min(n, self.c.segment) * self.c.d_model

    def heads(self, t: Tensor) -> Tensor:
        b, n, _ = t.shape
        return t.view(b, n, self.c.n_heads, -1).transpose(1, 2)  # [B, H, n, dh]

    def segment_step(self, x: Tensor, state: dict[str, Any]) -> tuple[Tensor, dict[str, Any]]:
        """Tokens x [B, c, D] at offsets o..o+c-1 of one segment."""
        c, o = self.c, state["offset"]
        memory_state = state["memory"] or self.memory.initial_state(x.shape[0], x.dtype)
        start_weights = memory_state["weights"] if o == 0 else state["start_weights"]
        h = self.memory.read(x, start_weights)  # [B, c, D]: retrieval with the memory before the segment
        q, kx, vx = (self.heads(t) for t in self.qkv(x).chunk(3, dim=-1))
        _, kh, vh = (self.heads(t) for t in self.qkv(h).chunk(3, dim=-1))
        _, kp, vp = (self.heads(t) for t in self.qkv(self.persistent.to(x.dtype)[None]).chunk(3, dim=-1))
        q, kx, kh = (rotary(t, o, c.rope_base) for t in (q, kx, kh))
        if o:
            kh, vh, kx, vx = (torch.cat([cached, new], dim=-2) for cached, new in zip(state["cache"], (kh, vh, kx, vx),
                                                                                       strict=True))
        n_q, n_k = x.shape[1], kx.shape[-2]
        visible = causal_mask(n_q, n_k, x.device)
        mask = torch.cat([visible.new_ones(n_q, c.n_persistent), visible, visible], dim=-1)
        keys = torch.cat([kp.expand(x.shape[0], -1, -1, -1), kh, kx], dim=-2)
        values = torch.cat([vp.expand(x.shape[0], -1, -1, -1), vh, vx], dim=-2)
        y = masked_attention(q, keys, values, mask, c.attention)  # [B, H, c, dh]
        y = self.out(y.transpose(1, 2).reshape(x.shape))
        m, memory_state = self.memory(self.write_norm(y), memory_state)  # write with y, read after write
        done = (o + n_q) % c.segment == 0
        new_state = {"memory": memory_state, "start_weights": start_weights, "offset": (o + n_q) % c.segment,
                     "cache": None if done else (kh, vh, kx, vx)}
        return self.gate(y, m), new_state

    def forward(self, x: Tensor, state: dict[str, Any] | None = None) -> tuple[Tensor, dict[str, Any]]:
        state = state or {"memory": None, "start_weights": None, "offset": 0, "cache": None}
        outputs, start, n = [], 0, x.shape[1]
        while start < n:
            end = min(n, start + self.c.segment - state["offset"])
            y, state = self.segment_step(x[:, start:end], state)
            outputs.append(y)
            start = end
        return torch.cat(outputs, dim=1), state


class MAC(TitansStack):
    def __init__(self, config: TitansConfig):
        c = config
        blocks = [ResidualBlock(c.d_model, MemoryAsContext(c), c.mlp_ratio) for _ in range(c.n_layers)]
        super().__init__(config, blocks, n_prefix=0)
