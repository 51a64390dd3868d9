"""The memory layer: projections, gates and the output pipeline around the memory scan, which it runs by
calling the ops (`naive.reference_scan`, `chunked.chunked_scan`, the compiled pointwise operators of `native`,
the projection's as one node from `compiled`, or their torch versions here)."""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from models.memory import native
from models.memory.chunked import chunked_scan
from models.memory.compiled import CompiledProjection, compiled_write, gate_activations, plan
from models.memory.naive import mlp_forward, reference_scan
from models.memory.rule import NORM_EPS, STANDALONE_HEADS, MemoryConfig


class CausalDepthwiseConv(nn.Module):
    """Per-channel causal convolution on time-major input: y_t = bias + sum_j w_j * u_{t+j}, where u carries
    kernel - 1 earlier steps in front. Written as shifted products with a hand-written backward: at these
    widths it is several times faster than Conv1d's depthwise kernels, needs no transposes, and autograd
    through the shifted slices would zero-fill a full-size gradient per tap."""

    def __init__(self, channels: int, kernel: int):
        super().__init__()
        self.channels = channels
        bound = 1 / math.sqrt(kernel)  # Conv1d's default initialisation, fan-in = kernel
        self.weight = nn.Parameter(torch.empty(kernel, channels).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(channels).uniform_(-bound, bound))

    def forward(self, u: Tensor) -> Tensor:
        """u: [B, kernel - 1 + N, C] -> [B, N, C]."""
        return ShiftedProducts.apply(u, self.weight, self.bias)


class ShiftedProducts(torch.autograd.Function):
    """y = bias + sum_j w_j * u[:, j : j + n]; the gradient of u is the same sum taken the other way."""

    @staticmethod
    def forward(ctx, u: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        n = u.shape[1] - weight.shape[0] + 1
        y = torch.addcmul(bias, u[:, :n], weight[0])
        for j in range(1, weight.shape[0]):
            y.addcmul_(u[:, j : j + n], weight[j])
        ctx.save_for_backward(u, weight)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, g_y: Tensor):
        u, weight = ctx.saved_tensors
        n = g_y.shape[1]
        g_u = torch.zeros_like(u)
        for j in range(weight.shape[0]):
            g_u[:, j : j + n].addcmul_(g_y, weight[j])
        g_w = torch.stack([(g_y * u[:, j : j + n]).sum((0, 1)) for j in range(weight.shape[0])])
        return g_u, g_w, g_y.sum((0, 1))


def l2_normalise(x: Tensor) -> Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-6)


class NeuralMemory(nn.Module):
    """The memory layer: q/k/v projections -> causal depthwise conv -> SiLU (q, k L2-normalised), gates per
    token and head, the memory scan, then per-head RMS-norm, a sigmoid gate from x, and the output projection.

    forward(x [B, N, D], state) -> (y [B, N, D], state). State: current weights, momentum and gradient anchor
    per memory layer, the offset inside the current chunk, and the conv tail (last kernel-1 inputs).
    """

    def __init__(self, dim: int, config: MemoryConfig | None = None, retrieval: bool = False):
        super().__init__()
        config = config or MemoryConfig()
        if config.n_heads is None:
            config = replace(config, n_heads=STANDALONE_HEADS)
        if dim % config.n_heads:
            raise ValueError(f"d_model={dim} must be divisible by memory n_heads={config.n_heads}")
        self.config = c = config
        self.dh = dh = dim // c.n_heads
        hidden = max(1, round(c.expansion * dh))
        widths = [dh] + [hidden] * (c.depth - 1) + [dh]
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.conv = CausalDepthwiseConv(3 * dim, c.conv_kernel)
        self.gates = nn.Linear(dim, 3 * c.n_heads)  # theta, eta, alpha logits per head
        with torch.no_grad():
            self.gates.weight.mul_(0.1)
            self.gates.bias.copy_(torch.tensor([0.0, 1.0, -6.0]).repeat_interleave(c.n_heads))
        self.init_weights = nn.ParameterList(
            nn.Parameter(torch.randn(c.n_heads, a, b) / math.sqrt(a)) for a, b in zip(widths, widths[1:], strict=False)
        )
        self.out_norm = nn.Parameter(torch.ones(dh))
        self.out_gate = nn.Linear(dim, dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)
        self.retrieve_q = nn.Linear(dim, dim, bias=False) if retrieval else None  # MAC reads with its own queries

    def state_numel(self, n: int) -> int:
        """Constant in n: weights, momentum and anchor per memory layer, plus the conv tail."""
        mem = sum(w.numel() for w in self.init_weights)
        return 3 * mem + self.conv.channels * (self.config.conv_kernel - 1)

    def initial_state(self, batch: int, dtype: torch.dtype) -> dict[str, Any]:
        weights = [w.unsqueeze(0).expand(batch, *w.shape).to(dtype) for w in self.init_weights]
        tail = weights[0].new_zeros(batch, self.config.conv_kernel - 1, self.conv.channels)
        return {"weights": weights, "momentum": [torch.zeros_like(w) for w in weights], "anchor": weights,
                "offset": 0, "conv": tail}

    def read(self, x: Tensor, weights: list[Tensor]) -> Tensor:
        """Retrieval without update: M(q) for queries from x, through the output pipeline. [B, N, D]."""
        b, n, d = x.shape
        q = l2_normalise(self.retrieve_q(x).view(b, n, self.config.n_heads, self.dh).transpose(1, 2))
        return self.finish(mlp_forward(weights, q)[0][-1], x)

    def finish(self, y: Tensor, x: Tensor) -> Tensor:
        """Per-head RMS-norm, sigmoid gate from x, output projection: [B, H, N, dh] -> [B, N, D]."""
        b, n, d = x.shape
        logits = self.out_gate(x)
        if native.use_native(self.config.kernel, y, self.out_norm, logits):
            return self.out(native.norm_gate(y, self.out_norm, logits, NORM_EPS))
        y = F.rms_norm(y, (self.dh,), self.out_norm, eps=NORM_EPS)
        return self.out(y.transpose(1, 2).reshape(b, n, d) * torch.sigmoid(logits))

    def projections(self, x: Tensor, state: dict[str, Any]) -> tuple[Tensor, Tensor, Tensor]:
        """x's projections p [B, N, 3 D] with the conv tail before them [B, K - 1, 3 D], and the gate logits
        [B, N, 3 H] (theta, eta, alpha per head)."""
        return state["conv"], self.qkv(x), self.gates(x)

    def tail_after(self, tail: Tensor, p: Tensor) -> Tensor:
        """The conv tail after projections p: the last K - 1 of (tail; p)."""
        k = self.config.conv_kernel
        before = p if p.shape[1] >= k - 1 else torch.cat([tail, p], dim=1)
        return before[:, before.shape[1] - (k - 1):]

    def project(self, tail: Tensor, p: Tensor, logits: Tensor) -> tuple[Tensor, ...]:
        """The conv, SiLU and q/k norms, and the gates: q, k, v [B, H, N, dh] and log eta, log(1 - alpha),
        theta [B, H, N]."""
        b, n, _ = p.shape
        c, h = self.config, self.config.n_heads
        if native.use_native(c.kernel, tail, p, self.conv.weight, self.conv.bias, logits):
            return CompiledProjection.apply(tail, p, self.conv.weight, self.conv.bias, logits, h, c.max_lr,
                                            c.momentum, c.forgetting)
        u = F.silu(self.conv(torch.cat([tail, p], dim=1)))
        q, k, v = u.view(b, n, 3, h, self.dh).permute(2, 0, 3, 1, 4).contiguous()  # [B, H, N, dh] each
        q, k = l2_normalise(q), l2_normalise(k)
        return q, k, v, *gate_activations(logits, h, c.max_lr, c.momentum, c.forgetting)

    def forward(
        self, x: Tensor, state: dict[str, Any] | None = None, diagnostics: dict[str, list] | None = None
    ) -> tuple[Tensor, dict[str, Any]]:
        c = self.config
        state = state or self.initial_state(x.shape[0], x.dtype)
        if x.shape[1] > c.block and diagnostics is None:
            # stream long inputs through the state in blocks: equal to one call (tested), and the temporaries
            # stay small enough for the allocator to reuse instead of faulting in fresh pages each time
            ys = []
            for piece in x.split(c.block, dim=1):
                y, state = self(piece.contiguous(), state)  # once: each projection would copy the strided view
                ys.append(y)
            return torch.cat(ys, dim=1), state
        y, new_state = self.write(x, state, diagnostics)
        return self.finish(y, x), new_state

    def write(self, x: Tensor, state: dict[str, Any],
              diagnostics: dict[str, list] | None = None) -> tuple[Tensor, dict[str, Any]]:
        """forward without the output step and without blocks: the memory written with x [B, N, D], and its
        reads [B, H, N, dh] before `finish`. For MAC, which writes segment by segment in a chain and finishes
        the reads of all its segments in one call after it."""
        c = self.config
        tail, p, logits = self.projections(x, state)
        one_call = self.one_call(x.shape[1], state, diagnostics, tail, p, logits)
        if one_call:
            spec, anchor = one_call
            y, weights, momentum = compiled_write(spec, tail, p, self.conv.weight, self.conv.bias, logits,
                                                  state["weights"], state["momentum"], anchor)
        else:
            q, k, v, log_eta, log_keep, theta = self.project(tail, p, logits)
            args = (state["weights"], state["momentum"], state["anchor"], state["offset"], c.chunk,
                    q, k, v, log_eta, log_keep, theta)
            if c.path == "reference" or c.rule != "titans" or diagnostics is not None:
                y, weights, momentum, anchor = reference_scan(*args, rule=c.rule, seed_gamma=c.seed_gamma, clip=c.clip,
                                                              diagnostics=diagnostics)
            else:
                y, weights, momentum, anchor = chunked_scan(*args, read_chunk=c.read_chunk, kernel=c.kernel,
                                                            clip=c.clip)
        return y, self.advanced(state, x.shape[1], weights, momentum, anchor, self.tail_after(tail, p))

    def advanced(self, state: dict[str, Any], n: int, weights: list[Tensor], momentum: list[Tensor],
                 anchor: list[Tensor], tail: Tensor) -> dict[str, Any]:
        """The state after a write of n tokens that left these weights, momentum, anchor and conv tail."""
        return {"weights": weights, "momentum": momentum, "anchor": anchor,
                "offset": (state["offset"] + n) % self.config.chunk, "conv": tail}

    def one_call(self, n: int, state: dict[str, Any], diagnostics: dict[str, list] | None,
                 *tensors: Tensor) -> tuple[native.WriteSpec, list[Tensor]] | None:
        """For a write of n tokens after `state` that takes the one-call compiled path (compiled.CompiledWrite, or
        MAC's SegmentWrite), its spec and first anchor; else None. That path is the compiled dual form for a call
        that is one group of chunks (a MAC segment, a block of whole chunks), taken while no dispatch mode watches:
        FlopCounterMode counts the operators of the two-node path, which do the same arithmetic."""
        c = self.config
        groups = plan(n, state["offset"], c.chunk, c.read_chunk)
        if not (len(groups) == 1 and c.path == "chunked" and c.rule == "titans" and diagnostics is None
                and native.use_native(c.kernel, *tensors, *state["weights"], *state["momentum"])
                and not native.watched()):
            return None
        (group,) = groups
        spec = native.WriteSpec(group.count, group.size, group.subs, c.n_heads, c.max_lr, c.momentum, c.forgetting,
                                c.clip / 2)
        return spec, state["anchor"] if group.continued else state["weights"]
