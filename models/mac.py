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
dispatches and few autograd nodes (at n = 16K a block runs 256 steps of small kernels, so per-kernel, per-node
and per-thread-fork overhead was most of MAC's time): the read at the segment-start weights and h's keys and
values from it (MemoryRead), the attention (sdpa), and the write from the attention's heads: output projection,
write norm, the memory's projections and the memory write (SegmentWrite). Where the compiled code runs (CPU,
float32/64, a segment that is one group of the memory's chunks, no dispatch mode watching), the read and the
write are one C call each way (native.mac_read, native.mac_write_forward: their small products in the C code's
register-blocked loops instead of threaded BLAS calls), and a training step records 10 nodes per segment and
block (27 with the write as torch ops around the compiled memory, 106 with most ops nodes of their own).
Otherwise the read runs MemoryRead's torch ops and the write the output projection, F.rms_norm and
NeuralMemory.write (its compiled operators, where usable, as FlopCounterMode counts them). The
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
from models.memory import NORM_EPS, NeuralMemory, l2_normalise, mlp_backprop, mlp_forward, mlp_output, native
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
        are [B, H, ., dh] each. Returns the heads joined, [B, c, D], before the output projection."""
        b, _, n_q, _ = q.shape
        keys, values = torch.cat(kv[0::2], dim=-2), torch.cat(kv[1::2], dim=-2)
        y = masked_attention(q, keys, values, mask, self.c.attention)  # [B, H, c, dh]
        return y.transpose(1, 2).reshape(b, n_q, self.c.d_model)

    def forward(self, x: Tensor, state: dict[str, Any] | None = None) -> tuple[Tensor, dict[str, Any]]:
        state = state or {"memory": None, "start_weights": None, "offset": 0, "cache": None}
        if self.c.mac_path == "segment_loop":
            return self.segment_loop(x, state)
        c, (b, n, _), o = self.c, x.shape, state["offset"]
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
        read_weights, cos, sin = self.read_weights(x.dtype, x.device)
        write_weights = self.write_weights(x.dtype)
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
            kh, vh = self.read(start_weights, retrieval_s, read_gate_s, read_weights, cos[so : so + size],
                               sin[so : so + size])
            kv = (kh, vh, kx_s, vx_s)
            if so:
                kv = tuple(torch.cat([cached, new], dim=-2) for cached, new in zip(cache, kv, strict=True))
            shape = (size, kv[0].shape[-2])
            if shape not in masks:
                masks[shape] = self.mask(*shape, x.device)
            y, normed, read, memory_state = self.write(self.attend(q_s, kv_persistent + kv, masks[shape]),
                                                       memory_state, write_weights)  # write with y, read after write
            ys.append(y)
            written.append(normed)
            reads.append(read)
            cache, so = kv, (so + size) % c.segment
        new_state = {"memory": memory_state, "start_weights": start_weights, "offset": so,
                     "cache": cache if so else None}
        m = memory.finish(torch.cat(reads, dim=-2), torch.cat(written, dim=1))  # the write's output step, at once
        return self.gate(torch.cat(ys, dim=1), m), new_state

    def read_weights(self, dtype: torch.dtype, device: torch.device) -> tuple[tuple[Tensor, ...], Tensor, Tensor]:
        """The weights of h's path to its keys and values, transposed for the read's products (W_out^T of the
        memory's output projection, then W_k^T and W_v^T of the attention's, [D, D] each), and the rotary tables
        cos, sin [C, dh // 2] of a segment's positions 0..C-1, built once per call. The read goes through the
        output projection and then the key and value weights: the FLOPs of the reference. (Folding the weights into
        one costs 2 D^3 per call: more work than the parts at the shortest training shapes, which the CI gate
        on hybrids against their parts rejects.)"""
        c, d = self.c, self.c.d_model
        cos, sin = rotary_tables(0, c.segment, d // c.n_heads, c.rope_base, dtype, device)
        w_k, w_v = self.qkv.weight[d:].to(dtype).chunk(2)
        return tuple(w.t().contiguous() for w in (self.memory.out.weight.to(dtype), w_k, w_v)), cos, sin

    def read(self, weights: list[Tensor], queries: Tensor, gate: Tensor, read_weights: tuple[Tensor, ...],
             cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
        """Step 1 and h's keys and values (MemoryRead): the memory read at the segment-start `weights` with the
        retrieval queries [B, H, c, dh], finished as NeuralMemory.finish does with the gate sigmoid(out_gate(x))
        [B, c, D] computed beforehand, projected to h's keys and values by `read_weights` and the keys rotated
        from the segment start with the tables' rows cos, sin [c, dh // 2]. Returns kh, vh [B, H, c, dh]."""
        memory = self.memory
        compiled = native.use_native(memory.config.kernel, queries, gate, *weights) and not native.watched()
        if compiled:  # the C code indexes contiguous tensors
            queries, gate, weights = queries.contiguous(), gate.contiguous(), [w.contiguous() for w in weights]
        return MemoryRead.apply(self.c.n_heads, compiled, queries, gate, memory.out_norm, *read_weights, cos, sin,
                                *weights)

    def write_weights(self, dtype: torch.dtype) -> tuple[Tensor, ...]:
        """The write's weights transposed for the compiled write's products, once per call: the output
        projection's W_o^T, the memory's W_qkv^T as q, k, v blocks, and its gate weights W_g^T."""
        memory = self.memory
        w_qkv = memory.qkv.weight.to(dtype).chunk(3)
        return tuple(w.t().contiguous() for w in (self.out.weight.to(dtype), *w_qkv, memory.gates.weight.to(dtype)))

    def write(self, a: Tensor, state: dict[str, Any], weights_t: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        """Steps 2 (its output projection) and 3: y = out(a) for the attention's heads a [B, c, D], its write norm,
        and the memory written with it (NeuralMemory.write, without the output step). Returns y, the normed y,
        the reads [B, H, c, dh] and the memory state. One node (SegmentWrite, one C call each way) where the
        memory's write takes its one-call path; `weights_t`: write_weights."""
        memory, n = self.memory, a.shape[1]
        one_call = memory.one_call(n, state, None, a, state["conv"])
        if not one_call:
            y = self.out(a)
            normed = F.rms_norm(y, (self.c.d_model,), self.write_norm.weight, self.write_norm.eps)
            read, state = memory.write(normed, state)
            return y, normed, read, state
        spec, anchor = one_call
        conv, (w_o_t, *w_qkv_t, w_gates_t) = memory.conv, weights_t
        a, w_norm, tail, b_gates, conv_w, conv_b = (t.contiguous() for t in (  # the C code indexes contiguous tensors
            a, self.write_norm.weight, state["conv"], memory.gates.bias, conv.weight, conv.bias))
        states = [[t.contiguous() for t in ts] for ts in (state["weights"], state["momentum"], anchor)]
        inputs = (a, w_o_t, w_norm, *w_qkv_t, w_gates_t, b_gates, tail, conv_w, conv_b, *sum(states, []))
        if torch.is_grad_enabled() and any(t.requires_grad for t in inputs):
            y, normed, p, read, *ends = SegmentWrite.apply(spec, self.write_norm.eps, *inputs)
            weights, momentum = list(ends[: len(anchor)]), list(ends[len(anchor) :])
        else:
            y, normed, p, _, read, weights, momentum, _ = native.mac_write_forward(
                spec, a, w_o_t, w_norm, self.write_norm.eps, w_qkv_t, w_gates_t, b_gates, tail, conv_w, conv_b,
                *states, recording=False)
        return y, normed, read, memory.advanced(state, n, weights, momentum, anchor,
                                                memory.tail_after(state["conv"], p))

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
        y = self.out(self.attend(q, kv, self.mask(x.shape[1], kx.shape[-2], x.device)))
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
        u = (n w_norm) laid out [B, c, D] times the gate, h = u W_out^T, k_h = heads(h W_k^T) rotated,
        v_h = heads(h W_v^T).
    Inputs: the attention's heads A; whether it runs compiled (native.mac_read, one C call each way) or as torch
    ops (which a dispatch mode sees, so FlopCounterMode counts them); the memory's queries q [B, H, c, dh] (H
    memory heads), gate [B, c, D], w_norm [dh], W_out^T, W_k^T, W_v^T [D, D], cos, sin [c, D / A // 2], then the
    memory weights [B, H, d_l, d_{l+1}]. Returns k_h, v_h [B, A, c, D / A]. tests/test_mac.py checks both paths by
    gradcheck and the segment loop (plain autograd) against them."""

    @staticmethod
    def forward(ctx, attention_heads: int, compiled: bool, q: Tensor, gate: Tensor, w_norm: Tensor,
                w_out_t: Tensor, w_k_t: Tensor, w_v_t: Tensor, cos: Tensor, sin: Tensor, *weights: Tensor):
        if compiled:
            u, h, kh, vh = native.mac_read(attention_heads, q, list(weights), w_norm, gate, w_out_t, w_k_t, w_v_t,
                                           cos, sin, NORM_EPS)
        else:
            b, heads, c, dh = q.shape
            normed = F.rms_norm(mlp_output(weights, q), (dh,), w_norm, eps=NORM_EPS)
            u = normed.transpose(1, 2).reshape(b, c, heads * dh) * gate
            h = u @ w_out_t
            kh, vh = ((h @ w).view(b, c, attention_heads, -1).transpose(1, 2) for w in (w_k_t, w_v_t))
            kh = rotate(kh, cos, sin)
        ctx.attention_heads, ctx.compiled = attention_heads, compiled
        ctx.save_for_backward(q, gate, w_norm, w_out_t, w_k_t, w_v_t, cos, sin, u, h, *weights)
        return kh, vh

    @staticmethod
    @once_differentiable
    def backward(ctx, g_kh: Tensor, g_vh: Tensor):
        q, gate, w_norm, w_out_t, w_k_t, w_v_t, cos, sin, u, h, *weights = ctx.saved_tensors
        if ctx.compiled:
            g_q, g_gate, g_w_norm, *g_w = native.mac_read_backward(ctx.attention_heads, q, weights, w_norm, gate,
                                                                   w_out_t, w_k_t, w_v_t, cos, sin, NORM_EPS, u, h,
                                                                   g_kh, g_vh)
            g_w, g_weights = g_w[:3], g_w[3:]
        else:
            b, c, d = u.shape
            g_k = rotate(g_kh, cos, -sin).transpose(1, 2).reshape(b, c, d)  # a rotation's inverse is its transpose
            g_v = g_vh.transpose(1, 2).reshape(b, c, d)
            g_h = g_k @ w_k_t.T + g_v @ w_v_t.T
            g_w = [x.flatten(0, 1).T @ g.flatten(0, 1) for x, g in ((u, g_h), (h, g_k), (h, g_v))]
            g_q, g_gate, g_w_norm, g_weights = read_backward(q, weights, w_norm, gate, g_h @ w_out_t.T)
        return None, None, g_q, g_gate, g_w_norm, *g_w, None, None, *g_weights


def read_backward(q: Tensor, weights: list[Tensor], w_norm: Tensor, gate: Tensor,
                  g_u: Tensor) -> tuple[Tensor, Tensor, Tensor, list[Tensor]]:
    """MemoryRead's memory part backward in torch ops, from g_u [B, c, D] (u = the gated, normed read): the
    gradients of q, the gate, w_norm and the weights. The MLP is recomputed (the inference forward stays lean)."""
    b, heads, c, dh = q.shape
    hs, slopes = mlp_forward(weights, q)  # the layers' inputs, the read hs[-1] and the slopes
    r = torch.rsqrt(hs[-1].pow(2).mean(-1, keepdim=True) + NORM_EPS)
    normed = hs[-1] * r
    g_gate = g_u * (normed * w_norm).transpose(1, 2).reshape(b, c, heads * dh)
    g_scaled = (g_u * gate).view(b, c, heads, dh).transpose(1, 2)  # of the normed read times w_norm
    g_w_norm = (g_scaled * normed).sum((0, 1, 2))
    g_normed = g_scaled * w_norm
    g_z = r * (g_normed - normed * (g_normed * normed).mean(-1, keepdim=True))
    ds = mlp_backprop(weights, slopes, g_z)
    g_weights = [x.transpose(-1, -2) @ d for x, d in zip(hs, ds, strict=False)]  # hs: inputs, then output
    return ds[0] @ weights[0].transpose(-1, -2), g_gate, g_w_norm, g_weights


class SegmentWrite(torch.autograd.Function):
    """MAC's write of a segment (MemoryAsContext.write) as one node, one C call each way
    (native.mac_write_forward): from the attention's heads a through the output projection y = a W_o^T, the write
    norm n, the memory's projections and gate logits, to the memory written with n (the work of CompiledWrite).
    The torch ops (the output projection, F.rms_norm, NeuralMemory.write) are the reference: tests/test_mac.py
    holds the two equal. Inputs: the spec, the norm's eps, then a [B, c, D], W_o^T, w_norm, the memory's W_qkv^T
    blocks (three [D, D]), W_g^T, b_g, the conv tail, weight and bias, and the weights, momentum and anchor per
    layer; outputs: y, n, the projections p [B, c, 3 D] (for the next conv tail), the reads, then the end
    weights and momentum per layer."""

    @staticmethod
    def forward(ctx, spec: native.WriteSpec, eps: float, a: Tensor, w_o_t: Tensor, w_norm: Tensor, *rest: Tensor):
        w_qkv_t, (w_gates_t, b_gates, tail, conv_w, conv_b) = list(rest[:3]), rest[3:8]
        states = rest[8:]
        depth = len(states) // 3
        weights, momentum, anchor = (list(states[i * depth : (i + 1) * depth]) for i in range(3))
        y, normed, p, logits, reads, end_weights, end_momentum, record = native.mac_write_forward(
            spec, a, w_o_t, w_norm, eps, w_qkv_t, w_gates_t, b_gates, tail, conv_w, conv_b, weights, momentum,
            anchor, recording=True)
        ctx.spec, ctx.eps = spec, eps
        ctx.save_for_backward(a, w_o_t, w_norm, w_gates_t, tail, conv_w, conv_b, y, normed, p, logits, *w_qkv_t,
                              *anchor, record.main, *record.parts)
        ctx.set_materialize_grads(False)
        return y, normed, p, reads, *end_weights, *end_momentum

    @staticmethod
    @once_differentiable
    def backward(ctx, g_y: Tensor | None, g_normed: Tensor | None, g_p: Tensor | None, g_reads: Tensor | None,
                 *g_end: Tensor | None):
        a, w_o_t, w_norm, w_gates_t, tail, conv_w, conv_b, y, normed, p, logits, *rest = ctx.saved_tensors
        depth, spec = (len(rest) - 3) // 4, ctx.spec  # W_qkv^T blocks, anchor, the record: main and 3 depth - 1 parts
        w_qkv_t, anchor, record = rest[:3], rest[3 : 3 + depth], native.Record(rest[3 + depth], rest[4 + depth :])
        if g_reads is None:
            g_reads = a.new_zeros(a.shape[0], spec.heads, a.shape[1], anchor[-1].shape[-1])
        g_y, g_normed, g_p, *g_end = (g if g is None else g.contiguous() for g in (g_y, g_normed, g_p, *g_end))
        *grads, g_weights, g_momentum, g_anchor = native.mac_write_backward(
            spec, a, w_o_t, w_norm, ctx.eps, w_qkv_t, w_gates_t, tail, conv_w, conv_b, anchor, record, y, normed, p,
            logits, g_reads, g_end[:depth], g_end[depth:], g_y, g_normed, g_p)
        return None, None, *grads, *g_weights, *g_momentum, *g_anchor


class MAC(TitansStack):
    def __init__(self, config: TitansConfig):
        c = config
        blocks = [ResidualBlock(c.d_model, MemoryAsContext(c), c.mlp_ratio) for _ in range(c.n_layers)]
        super().__init__(config, blocks, n_prefix=0)
