"""Titans neural long-term memory (Behrouz et al. 2025), per head a small MLP whose weights are the state.

For every token t (DESIGN.md section 3):
    inner loss      l_t(M) = || M(k_t) - v_t ||^2
    surprise        S_t = eta_t * S_{t-1} - theta_t * grad l_t(M_anchor)
    forgetting      M_t = (1 - alpha_t) * M_{t-1} + S_t
    read            y_t = M_t(q_t)                        (after the write of token t)
The gradient anchor is the memory at the start of the token's chunk of `chunk` tokens (chunk = 1 is the
exact online rule). Chunks are aligned to stream positions, so streaming cuts do not change the result.

Two paths compute the same thing:
- `reference_scan`: a plain loop over tokens, the obviously-right reference (and the only path for the
  seed paper's formulation and for per-token diagnostics);
- `chunked_scan`: the dual form. Inside a chunk the recurrences are linear with scalar coefficients:
      F[t, j] = prod_{j<s<=t} (1 - alpha_s)       P[j, i] = prod_{i<s<=j} eta_s        (both in [0, 1])
      G = (F @ P) * theta^T,   BC_t = sum_{j<=t} F[t, j] * prod_{s<=j} eta_s
  and, with H_l / D_l the layer inputs and back-propagated signals of all keys at the anchor,
      layer-l pre-activation of the query at t = B_t x W_l + BC_t x S_l - sum_i G[t, i] (x . H_l[i]) D_l[i].
  G is formed as a product of two decay matrices rather than from differences of cumulative sums, so it
  has no cancellation however strong the gates (the log-space cumsum form loses all precision when the
  momentum decays fast within a chunk). No per-token weight tensor is ever built: cost O(b^2 d + b d h)
  per chunk, linear in n.

Choices the paper leaves open (config values, defaults in MemoryConfig): memory MLP depth and hidden
width, SiLU activation, chunk size, conv kernel, gate parameterisation theta = max_lr * sigmoid,
eta = sigmoid, alpha = sigmoid (biases start at eta ~ 0.73, alpha ~ 0.0025), learned initial memory shared
across the batch, zero initial momentum, output RMS-norm gated by sigmoid(linear(x)).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

RULES = ("titans", "seed", "seed_corrected")
PATHS = ("chunked", "reference")
NO_MOMENTUM_LOG = -1.0e4  # log eta when momentum is off: exp() of any sum of it is exactly 0


@dataclass(frozen=True)
class MemoryConfig:
    n_heads: int = 4
    depth: int = 2  # L_M: layers of the memory MLP (1 = a linear map)
    expansion: float = 2.0  # hidden width of the memory MLP, in head dims
    chunk: int = 16  # b: tokens sharing one gradient anchor
    conv_kernel: int = 4
    max_lr: float = 0.01
    momentum: bool = True
    forgetting: bool = True
    rule: str = "titans"  # "titans", or the seed paper's update as written ("seed") or sign-corrected
    seed_gamma: float = 1.0  # seed rule: beta_t = exp(-gamma ||grad l_t||)
    path: str = "chunked"  # "chunked" (dual form) or "reference" (token loop)

    def __post_init__(self):
        if self.rule not in RULES:
            raise ValueError(f"unknown memory rule {self.rule!r}; valid: {', '.join(RULES)}")
        if self.path not in PATHS:
            raise ValueError(f"unknown memory path {self.path!r}; valid: {', '.join(PATHS)}")
        if self.depth < 1 or self.chunk < 1 or self.conv_kernel < 1 or self.n_heads < 1:
            raise ValueError("memory depth, chunk, conv_kernel and n_heads must be >= 1")


# ----------------------------------------------------------------------------------------------------------
# the memory MLP, its explicit back-propagation, and the two scans


def silu_grad(z: Tensor) -> Tensor:
    s = torch.sigmoid(z)
    return s * (1 + z * (1 - s))


def mlp_forward(weights: list[Tensor], x: Tensor) -> tuple[list[Tensor], list[Tensor]]:
    """x: [..., n, d_in], weights[l]: [..., d_l, d_{l+1}]. Returns the layer inputs h_0..h_L (h_L = output)
    and the pre-activations z_1..z_L."""
    hs, zs = [x], []
    for layer, w in enumerate(weights):
        z = hs[-1] @ w
        zs.append(z)
        hs.append(F.silu(z) if layer < len(weights) - 1 else z)
    return hs, zs


def mlp_backprop(weights: list[Tensor], hs: list[Tensor], zs: list[Tensor], v: Tensor) -> list[Tensor]:
    """d_l = d l / d z_l for l = ||out - v||^2, per token. The weight gradient of layer l is h_l^T d_l."""
    d = 2 * (hs[-1] - v)
    ds = [d]
    for layer in range(len(weights) - 1, 0, -1):
        d = (d @ weights[layer].transpose(-1, -2)) * silu_grad(zs[layer - 1])
        ds.append(d)
    return ds[::-1]


def reference_scan(
    weights: list[Tensor], momentum: list[Tensor], anchor: list[Tensor], offset: int, chunk: int,
    q: Tensor, k: Tensor, v: Tensor, log_eta: Tensor, log_keep: Tensor, theta: Tensor,
    rule: str = "titans", seed_gamma: float = 1.0, diagnostics: dict[str, list] | None = None,
) -> tuple[Tensor, list[Tensor], list[Tensor], list[Tensor]]:
    """Token-by-token loop. q, k, v: [B, H, N, dh]; gates [B, H, N]; weights [B, H, d_l, d_{l+1}].
    `offset` tokens of the current chunk were seen before this call (anchored at `anchor`)."""
    ys = []
    for t in range(q.shape[-2]):
        if (offset + t) % chunk == 0 or rule != "titans":
            anchor = weights
        kt, vt, qt = k[..., t : t + 1, :], v[..., t : t + 1, :], q[..., t : t + 1, :]
        hs, zs = mlp_forward(anchor, kt)
        ds = mlp_backprop(anchor, hs, zs, vt)
        grads = [h.transpose(-1, -2) @ d for h, d in zip(hs, ds, strict=False)]  # [B, H, d_l, d_{l+1}]
        g_norm = torch.sqrt(sum(g.pow(2).sum((-1, -2)) for g in grads))  # [B, H]
        if rule == "titans":
            eta, keep = log_eta[..., t, None, None].exp(), log_keep[..., t, None, None].exp()
            lr = theta[..., t, None, None]
            momentum = [eta * s - lr * g for s, g in zip(momentum, grads, strict=True)]
            weights = [keep * w + s for w, s in zip(weights, momentum, strict=True)]
        else:
            # seed paper: M_t = (1 - alpha_t) M_{t-1} + beta_t grad l, beta_t = exp(-gamma ||grad l||), and
            # alpha_t = sigmoid(<grad l, x_t>) read as sigmoid(<d l / d M(k_t), k_t>): the gradient with
            # respect to the memory's output against the token as the memory sees it (both head_dim wide).
            # "seed" ascends as written; "seed_corrected" descends.
            alpha = torch.sigmoid((ds[-1] * kt).sum((-1, -2)))[..., None, None]
            beta = torch.exp(-seed_gamma * g_norm)[..., None, None]
            sign = 1.0 if rule == "seed" else -1.0
            momentum = [sign * beta * g for g in grads]
            weights = [(1 - alpha) * w + s for w, s in zip(weights, momentum, strict=True)]
        ys.append(mlp_forward(weights, qt)[0][-1])
        if diagnostics is not None:
            diagnostics["inner_loss"].append((hs[-1] - vt).pow(2).sum((-1, -2)))
            diagnostics["grad_norm"].append(g_norm)
            s_abs = torch.cat([s.abs().flatten(-2) for s in momentum], -1)
            diagnostics["surprise_norm"].append(s_abs.pow(2).sum(-1).sqrt())
            p = s_abs / s_abs.sum(-1, keepdim=True).clamp_min(1e-30)
            diagnostics["surprise_entropy"].append(-(p * p.clamp_min(1e-30).log()).sum(-1))
            diagnostics["memory_norm"].append(torch.sqrt(sum(w.pow(2).sum((-1, -2)) for w in weights)))
    return torch.cat(ys, dim=-2), weights, momentum, anchor


def decay_matrices(log_eta: Tensor, log_keep: Tensor, theta: Tensor) -> dict[str, Tensor]:
    """Scalar coefficients of the chunk recurrences; gates [..., c] -> matrices [..., c, c]."""
    c = log_eta.shape[-1]
    work = torch.promote_types(log_eta.dtype, torch.float32)  # at least fp32, fp64 stays fp64
    la, lb = log_eta.to(work).cumsum(-1), log_keep.to(work).cumsum(-1)  # log A_t, log B_t
    lower = torch.ones(c, c, dtype=torch.bool, device=la.device).tril()
    f = torch.exp((lb[..., :, None] - lb[..., None, :]).masked_fill(~lower, float("-inf")))  # B_t / B_j
    p = torch.exp((la[..., :, None] - la[..., None, :]).masked_fill(~lower, float("-inf")))  # A_j / A_i
    dtype = theta.dtype
    g = (f @ p).to(dtype) * theta[..., None, :]
    bc = (f @ la.exp()[..., None])[..., 0]
    return {
        "G": g,  # [.., c, c]
        "B": lb.exp().to(dtype),  # [.., c]
        "BC": bc.to(dtype),  # [.., c]
        "A_end": la[..., -1].exp().to(dtype),  # [..]
        "S_coef": (p[..., -1, :].to(dtype) * theta),  # theta_i A_c / A_i, [.., c]
    }


def chunk_step(
    weights: list[Tensor], momentum: list[Tensor], anchor: list[Tensor],
    q: Tensor, k: Tensor, v: Tensor, co: dict[str, Tensor],
) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    """One chunk in the dual form. q, k, v: [B, H, c, dh]; returns reads [B, H, c, dh] and end state."""
    hs, zs = mlp_forward(anchor, k)  # key-side activations at the anchor
    ds = mlp_backprop(anchor, hs, zs, v)
    g, b, bc = co["G"], co["B"][..., None], co["BC"][..., None]
    x = q
    for layer, (w, s) in enumerate(zip(weights, momentum, strict=True)):
        z = b * (x @ w) + bc * (x @ s) - (g * (x @ hs[layer].transpose(-1, -2))) @ ds[layer]
        x = F.silu(z) if layer < len(weights) - 1 else z
    new_w, new_s = [], []
    last_g, s_coef, a_end = g[..., -1, :, None], co["S_coef"][..., None], co["A_end"][..., None, None]
    for layer, (w, s) in enumerate(zip(weights, momentum, strict=True)):
        h_t = hs[layer].transpose(-1, -2)
        new_w.append(b[..., -1:, :] * w + bc[..., -1:, :] * s - h_t @ (last_g * ds[layer]))
        new_s.append(a_end * s - h_t @ (s_coef * ds[layer]))
    return x, new_w, new_s


def chunked_scan(
    weights: list[Tensor], momentum: list[Tensor], anchor: list[Tensor], offset: int, chunk: int,
    q: Tensor, k: Tensor, v: Tensor, log_eta: Tensor, log_keep: Tensor, theta: Tensor,
) -> tuple[Tensor, list[Tensor], list[Tensor], list[Tensor]]:
    """The dual form over a call: the rest of a partial chunk, whole chunks, then a trailing partial one.
    Gate coefficients of all whole chunks are computed at once; only weight-dependent work loops."""
    n = q.shape[-2]
    first = min(n, chunk - offset) if offset else 0
    whole = (n - first) // chunk
    segments: list[tuple[int, int, int | None]] = [(0, first, None)] if first else []
    segments += [(first + i * chunk, first + (i + 1) * chunk, i) for i in range(whole)]
    if first + whole * chunk < n:
        segments.append((first + whole * chunk, n, None))
    # split/unbind (not repeated slicing) so that backward stays one linear-cost op per tensor
    sizes = [end - start for start, end, _ in segments]
    pieces = [x.split(sizes, dim=-2) for x in (q, k, v)]
    gates = [x.split(sizes, dim=-1) for x in (log_eta, log_keep, theta)]
    if whole:
        span = slice(first, first + whole * chunk)
        grouped = decay_matrices(*(x[..., span].unflatten(-1, (whole, chunk)) for x in (log_eta, log_keep, theta)))
        per_chunk = [dict(zip(grouped, values, strict=True)) for values in zip(*(t.unbind(2) for t in grouped.values()),
                                                                                 strict=True)]
    ys = []
    for i, (start, _, index) in enumerate(segments):
        co = decay_matrices(*(g[i] for g in gates)) if index is None else per_chunk[index]
        if (offset + start) % chunk == 0:
            anchor = weights
        y, weights, momentum = chunk_step(weights, momentum, anchor, *(p[i] for p in pieces), co)
        ys.append(y)
    return torch.cat(ys, dim=-2), weights, momentum, anchor


# ----------------------------------------------------------------------------------------------------------
# the memory layer


def l2_normalise(x: Tensor) -> Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-6)


class NeuralMemory(nn.Module):
    """The memory layer: q/k/v projections -> causal depthwise conv -> SiLU (q, k L2-normalised), gates per
    token and head, the memory scan, then per-head RMS-norm, a sigmoid gate from x, and the output projection.

    forward(x [B, N, D], state) -> (y [B, N, D], state). State: current weights, momentum and gradient anchor
    per memory layer, the offset inside the current chunk, and the conv tail (last kernel-1 inputs).
    """

    def __init__(self, dim: int, config: MemoryConfig = MemoryConfig(), retrieval: bool = False):
        super().__init__()
        if dim % config.n_heads:
            raise ValueError(f"d_model={dim} must be divisible by memory n_heads={config.n_heads}")
        self.config = c = config
        self.dh = dh = dim // c.n_heads
        hidden = max(1, round(c.expansion * dh))
        widths = [dh] + [hidden] * (c.depth - 1) + [dh]
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.conv = nn.Conv1d(3 * dim, 3 * dim, c.conv_kernel, groups=3 * dim, bias=True)
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
        return 3 * mem + self.conv.in_channels * (self.config.conv_kernel - 1)

    def initial_state(self, batch: int, dtype: torch.dtype) -> dict[str, Any]:
        weights = [w.unsqueeze(0).expand(batch, *w.shape).to(dtype) for w in self.init_weights]
        tail = weights[0].new_zeros(batch, self.conv.in_channels, self.config.conv_kernel - 1)
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
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + 1e-6) * self.out_norm
        return self.out(y.transpose(1, 2).reshape(b, n, d) * torch.sigmoid(self.out_gate(x)))

    def project(self, x: Tensor, state: dict[str, Any]) -> tuple[Tensor, ...]:
        b, n, d = x.shape
        c, h = self.config, self.config.n_heads
        u = self.qkv(x).transpose(1, 2)  # [B, 3D, N]
        u = torch.cat([state["conv"], u], dim=-1)
        new_tail = u[..., u.shape[-1] - (c.conv_kernel - 1):]
        u = F.silu(self.conv(u)).transpose(1, 2)  # causal: output t sees inputs t-kernel+1..t
        q, k, v = (t.view(b, n, h, self.dh).transpose(1, 2) for t in u.chunk(3, dim=-1))  # [B, H, N, dh]
        theta_l, eta_l, alpha_l = self.gates(x).view(b, n, 3, h).permute(2, 0, 3, 1)  # [B, H, N] each
        theta = c.max_lr * torch.sigmoid(theta_l)
        log_eta = F.logsigmoid(eta_l) if c.momentum else torch.full_like(eta_l, NO_MOMENTUM_LOG)
        log_keep = F.logsigmoid(-alpha_l) if c.forgetting else torch.zeros_like(alpha_l)
        return l2_normalise(q), l2_normalise(k), v, log_eta, log_keep, theta, new_tail

    def forward(
        self, x: Tensor, state: dict[str, Any] | None = None, diagnostics: dict[str, list] | None = None
    ) -> tuple[Tensor, dict[str, Any]]:
        c = self.config
        state = state or self.initial_state(x.shape[0], x.dtype)
        q, k, v, log_eta, log_keep, theta, tail = self.project(x, state)
        args = (state["weights"], state["momentum"], state["anchor"], state["offset"], c.chunk,
                q, k, v, log_eta, log_keep, theta)
        if c.path == "reference" or c.rule != "titans" or diagnostics is not None:
            y, weights, momentum, anchor = reference_scan(*args, rule=c.rule, seed_gamma=c.seed_gamma,
                                                          diagnostics=diagnostics)
        else:
            y, weights, momentum, anchor = chunked_scan(*args)
        new_state = {"weights": weights, "momentum": momentum, "anchor": anchor,
                     "offset": (state["offset"] + x.shape[1]) % c.chunk, "conv": tail}
        return self.finish(y, x), new_state
