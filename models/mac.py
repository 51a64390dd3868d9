"""MAC, memory as context. The sequence is cut into segments of C tokens (aligned to stream positions).
For segment s, in every block:
  1. retrieve h = M_{s-1}(q) with the memory as it was before the segment (no update);
  2. attend from the segment's tokens over [persistent tokens | h | segment], causal over h and over the
     segment (token i sees h_j and x_j for j <= i only: h_j carries token j's query, so later reads would leak);
  3. write the memory with the (normalised) attention output y, token by token: the read at t follows
     the write of t;
  4. output y gated by that read: norm(y) * sigmoid(norm(M_t(y_t))).
Attention cost O(C (C + N_p)) per segment: O(n C) overall. Streaming state: the memory scan state, the
memory weights at the segment start, and the keys/values of the segment's tokens so far.

Segments chain only through the memory: segment s reads the weights that the writes of segments < s left.
So the default path (`mac_path="hoisted"`) does everything that depends on the input alone once per call,
for all segments together: the projections of x and their rotary positions, the persistent keys, the
retrieval queries and the read's output gate, the masks, the rotary tables; and after the last segment,
step 4 and the memory's own output step (norm, gate, projection of its reads: nothing in the chain consumes
them). What is left per segment is the chain itself, each step batched over batch and heads and kept to few
dispatches and few autograd nodes (at n = 16K a block runs 256 steps of dozens of small kernels, so per-kernel
and per-node overhead is most of MAC's time): the read at the segment-start weights and h's keys and values
from it (MemoryRead, one node with a hand-written backward), the attention, the write (NeuralMemory.write: the
projections, then the compiled conv and gates and the compiled scan, one node each; models/memory/compiled.py).
A training step records some 33 nodes per segment and block (106 before these nodes). The
`mac_path="segment_loop"` reference runs the four steps segment by segment as written above, its read through
the memory layer's own read with plain autograd; the tests hold the two equal."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from models.attention import causal_mask, check_backend, masked_attention
from models.layers import ResidualBlock, RMSNorm, rotary, rotary_tables, rotate
from models.memory import NORM_EPS, NeuralMemory, l2_normalise, mlp_backprop, mlp_forward, mlp_output
from models.titans import MemoryGate, TitansConfig, TitansStack


class MemoryAsContext(nn.Module):
    def __init__(self, c: TitansConfig):
        super().__init__()
        check_backend(c.attention)
        if c.segment < 1:
            raise ValueError(f"segment must be >= 1, got {c.segment}")
        self.c = c
        self.memory = NeuralMemory(c.d_model, c.memory, retrieval=True)
        self.persistent = nn.Parameter(torch.randn(c.n_persistent, c.d_model) * 0.02)
        self.qkv = nn.Linear(c.d_model, 3 * c.d_model, bias=False)
        self.out = nn.Linear(c.d_model, c.d_model, bias=False)
        self.gate = MemoryGate(c.d_model)
        self.write_norm = RMSNorm(c.d_model)

    def state_numel(self, n: int) -> int:
        weights = sum(w[0].numel() for w in self.memory.init_weights) * self.c.memory.n_heads
        return self.memory.state_numel(n) + weights + 4 * min(n, self.c.segment) * self.c.d_model

    def heads(self, t: Tensor) -> tuple[Tensor, ...]:
        """[B, n, k D] -> k tensors [B, H, n, dh]."""
        (b, n, width), c = t.shape, self.c
        return t.view(b, n, width // c.d_model, c.n_heads, c.d_model // c.n_heads).permute(2, 0, 3, 1, 4).unbind(0)

    def persistent_kv(self, batch: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """Keys and values of the persistent tokens, [B, H, N_p, dh] each (no rotary: they have no position)."""
        kv = F.linear(self.persistent.to(dtype)[None], self.qkv.weight[self.c.d_model :])
        return tuple(t.expand(batch, -1, -1, -1) for t in self.heads(kv))

    def mask(self, n_q: int, n_k: int, device: torch.device) -> Tensor:
        """[n_q, N_p + 2 n_k]: the persistent tokens, then causal over the retrievals and over the segment."""
        visible = causal_mask(n_q, n_k, device)
        return torch.cat([visible.new_ones(n_q, self.c.n_persistent), visible, visible], dim=-1)

    def attend(self, q: Tensor, kv: tuple[Tensor, ...], mask: Tensor) -> Tensor:
        """q [B, H, c, dh] over [persistent | h | segment], whose keys and values kv = (kp, vp, kh, vh, kx, vx)
        are [B, H, ., dh] each. Returns [B, c, D]."""
        b, _, n_q, _ = q.shape
        keys, values = torch.cat(kv[0::2], dim=-2), torch.cat(kv[1::2], dim=-2)
        y = masked_attention(q, keys, values, mask, self.c.attention)  # [B, H, c, dh]
        return self.out(y.transpose(1, 2).reshape(b, n_q, self.c.d_model))

    def forward(self, x: Tensor, state: dict[str, Any] | None = None) -> tuple[Tensor, dict[str, Any]]:
        state = state or {"memory": None, "start_weights": None, "offset": 0, "cache": None}
        if self.c.mac_path == "segment_loop":
            return self.segment_loop(x, state)
        c, (b, n, d), o = self.c, x.shape, state["offset"]
        memory_state = state["memory"] or self.memory.initial_state(b, x.dtype)
        # input-only work, once for the call. Rotary positions restart at each segment: x's queries and keys
        # are laid out in whole segments (padded before the call's offset o and after its end) and rotated at once
        q, kx, vx = self.heads(self.qkv(x))  # [B, H, n, dh]
        segments = -(-(o + n) // c.segment)
        aligned = F.pad(torch.stack([q, kx]), (0, 0, o, segments * c.segment - o - n)).unflatten(-2, (segments, -1))
        q, kx = rotary(aligned, 0, c.rope_base).flatten(-3, -2)[..., o : o + n, :].unbind(0)
        memory = self.memory  # NeuralMemory.read, split: its queries and output gate for the whole call here
        retrieval = l2_normalise(memory.retrieve_q(x).view(b, n, c.memory.n_heads, -1).transpose(1, 2))  # [B, H, n, dh]
        read_gate = torch.sigmoid(memory.out_gate(x))  # [B, n, D]
        kv_persistent = self.persistent_kv(b, x.dtype)
        read_kv, cos, sin = self.read_kv_weight(x.dtype, x.device)
        # the rest of the current segment, then whole segments, then the beginning of one; split rather than
        # sliced per segment, since each slice's backward would write into a zero tensor the size of the call
        first = min(n, c.segment - o)
        sizes = [s for s in [first] + [c.segment] * ((n - first) // c.segment) + [(n - first) % c.segment] if s]
        pieces = zip(*(t.split(sizes, dim=-2) for t in (q, kx, vx, retrieval, read_gate)), strict=True)
        masks: dict[tuple[int, int], Tensor] = {}
        ys, written, reads, cache, start_weights, so = [], [], [], state["cache"], state["start_weights"], o
        for q_s, kx_s, vx_s, retrieval_s, read_gate_s in pieces:  # the chain; so: the offset inside the segment
            if so == 0:
                start_weights = memory_state["weights"]
            size = q_s.shape[-2]
            kh, vh = self.read(start_weights, retrieval_s, read_gate_s, read_kv, cos[so : so + size],
                               sin[so : so + size])
            kv = (kh, vh, kx_s, vx_s)
            if so:
                kv = tuple(torch.cat([cached, new], dim=-2) for cached, new in zip(cache, kv, strict=True))
            shape = (size, kv[0].shape[-2])
            if shape not in masks:
                masks[shape] = self.mask(*shape, x.device)
            y = self.attend(q_s, kv_persistent + kv, masks[shape])
            normed = F.rms_norm(y, (d,), self.write_norm.weight, self.write_norm.eps)
            read, memory_state = memory.write(normed, memory_state)  # write with y, read after write
            ys.append(y)
            written.append(normed)
            reads.append(read)
            cache, so = kv, (so + size) % c.segment
        new_state = {"memory": memory_state, "start_weights": start_weights, "offset": so,
                     "cache": cache if so else None}
        m = memory.finish(torch.cat(reads, dim=-2), torch.cat(written, dim=1))  # the write's output step, at once
        return self.gate(torch.cat(ys, dim=1), m), new_state

    def read_kv_weight(self, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
        """h's key and value weights as one [2 D, D] matrix, and the rotary tables cos, sin [C, dh // 2] of a
        segment's positions 0..C-1, built once per call. The read goes through the memory's output projection and
        then this matrix: two products per segment, the FLOPs of the reference. (Folding the two weights into
        one costs 2 D^3 per call: more work than the parts at the shortest training shapes, which the CI gate
        on hybrids against their parts rejects.)"""
        c, d = self.c, self.c.d_model
        cos, sin = rotary_tables(0, c.segment, d // c.n_heads, c.rope_base, dtype, device)
        return self.qkv.weight[d:], cos, sin

    def read(self, weights: list[Tensor], queries: Tensor, gate: Tensor, read_kv: Tensor, cos: Tensor,
             sin: Tensor) -> tuple[Tensor, Tensor]:
        """Step 1 and h's keys and values (MemoryRead): the memory read at the segment-start `weights` with the
        retrieval queries [B, H, c, dh], finished as NeuralMemory.finish does with the gate sigmoid(out_gate(x))
        [B, c, D] computed beforehand, projected to h's keys and values by `read_kv` [2 D, D] and the keys
        rotated from the segment start with the tables' rows cos, sin [c, dh // 2]. Returns kh, vh [B, H, c, dh]."""
        return MemoryRead.apply(self.c.n_heads, queries, gate, self.memory.out_norm, self.memory.out.weight, read_kv,
                                cos, sin, *weights)

    # ------------------------------------------------------------------------------------------------------
    # the reference: the four steps of the module docstring, one segment at a time

    def segment_step(self, x: Tensor, state: dict[str, Any]) -> tuple[Tensor, dict[str, Any]]:
        """Tokens x [B, c, D] at offsets o..o+c-1 of one segment."""
        c, o = self.c, state["offset"]
        memory_state = state["memory"] or self.memory.initial_state(x.shape[0], x.dtype)
        start_weights = memory_state["weights"] if o == 0 else state["start_weights"]
        h = self.memory.read(x, start_weights)  # [B, c, D]: retrieval with the memory before the segment
        q, kx, vx = self.heads(self.qkv(x))
        _, kh, vh = self.heads(self.qkv(h))
        q, kx, kh = (rotary(t, o, c.rope_base) for t in (q, kx, kh))
        if o:
            kh, vh, kx, vx = (torch.cat([cached, new], dim=-2) for cached, new in zip(state["cache"], (kh, vh, kx, vx),
                                                                                       strict=True))
        kv = (*self.persistent_kv(x.shape[0], x.dtype), kh, vh, kx, vx)
        y = self.attend(q, kv, self.mask(x.shape[1], kx.shape[-2], x.device))
        m, memory_state = self.memory(self.write_norm(y), memory_state)  # write with y, read after write
        done = (o + x.shape[1]) % c.segment == 0
        new_state = {"memory": memory_state, "start_weights": start_weights, "offset": (o + x.shape[1]) % c.segment,
                     "cache": None if done else (kh, vh, kx, vx)}
        return self.gate(y, m), new_state

    def segment_loop(self, x: Tensor, state: dict[str, Any]) -> tuple[Tensor, dict[str, Any]]:
        outputs, start, n = [], 0, x.shape[1]
        while start < n:
            end = min(n, start + self.c.segment - state["offset"])
            y, state = self.segment_step(x[:, start:end], state)
            outputs.append(y)
            start = end
        return torch.cat(outputs, dim=1), state


class MemoryRead(torch.autograd.Function):
    """MAC's read in the chain, one node with a hand-written backward (autograd would record some forty per
    segment, and at a segment's size their bookkeeping costs more than the arithmetic):
        z = M(q) at the segment-start weights (mlp_forward), n = z rsqrt(mean(z^2) + eps) (per head),
        u = (n w_norm) laid out [B, c, D] times the gate, h = u W_out^T, (k_h, v_h) = heads(h W_kv^T),
        k_h rotated.
    Inputs: the attention's heads A, the memory's queries q [B, H, c, dh] (H memory heads), gate [B, c, D],
    w_norm [dh], W_out [D, D], W_kv [2 D, D], cos, sin [c, D / A // 2], then the memory weights
    [B, H, d_l, d_{l+1}]. Returns k_h, v_h [B, A, c, D / A]. tests/test_mac.py checks it by gradcheck and the segment
    loop (plain autograd) against it."""

    @staticmethod
    def forward(ctx, attention_heads: int, q: Tensor, gate: Tensor, w_norm: Tensor, w_out: Tensor, w_kv: Tensor,
                cos: Tensor, sin: Tensor, *weights: Tensor):
        b, heads, c, dh = q.shape
        u = F.rms_norm(mlp_output(weights, q), (dh,), w_norm, eps=NORM_EPS).transpose(1, 2).reshape(b, c, heads * dh)
        h = F.linear(u * gate, w_out)
        kh, vh = F.linear(h, w_kv).view(b, c, 2, attention_heads, -1).permute(2, 0, 3, 1, 4)
        ctx.save_for_backward(q, gate, w_norm, w_out, w_kv, cos, sin, u, h, *weights)
        return rotate(kh, cos, sin), vh

    @staticmethod
    @once_differentiable
    def backward(ctx, g_kh: Tensor, g_vh: Tensor):
        q, gate, w_norm, w_out, w_kv, cos, sin, u, h, *weights = ctx.saved_tensors
        b, heads, c, dh = q.shape
        g_kv = torch.stack([rotate(g_kh, cos, -sin), g_vh]).permute(1, 3, 0, 2, 4).reshape(b, c, -1)
        g_w_kv = g_kv.flatten(0, 1).T @ h.flatten(0, 1)
        g_h = g_kv @ w_kv
        g_w_out = g_h.flatten(0, 1).T @ (u * gate).flatten(0, 1)
        g_gated = g_h @ w_out
        g_gate = g_gated * u
        g_scaled = (g_gated * gate).view(b, c, heads, dh).transpose(1, 2)  # of the normed read times w_norm
        hs, slopes = mlp_forward(weights, q)  # recomputed: the layers' inputs, the read hs[-1] and the slopes
        r = torch.rsqrt(hs[-1].pow(2).mean(-1, keepdim=True) + NORM_EPS)
        normed = hs[-1] * r
        g_w_norm = (g_scaled * normed).sum((0, 1, 2))
        g_normed = g_scaled * w_norm
        g_z = r * (g_normed - normed * (g_normed * normed).mean(-1, keepdim=True))
        ds = mlp_backprop(weights, slopes, g_z)
        g_weights = [x.transpose(-1, -2) @ d for x, d in zip(hs, ds, strict=False)]  # hs: inputs, then output
        g_q = ds[0] @ weights[0].transpose(-1, -2)
        return None, g_q, g_gate, g_w_norm, g_w_out, g_w_kv, None, None, *g_weights


class MAC(TitansStack):
    def __init__(self, config: TitansConfig):
        c = config
        blocks = [ResidualBlock(c.d_model, MemoryAsContext(c), c.mlp_ratio) for _ in range(c.n_layers)]
        super().__init__(config, blocks, n_prefix=0)
