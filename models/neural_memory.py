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
  per chunk, linear in n. Only the key side (each chunk's gradients at the weights the previous chunk
  left) runs chunk by chunk; the query reads of all chunks then run as batched matmuls, and long inputs
  are streamed through the state in blocks so that temporaries stay cache-sized.

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
    block: int = 512  # longer inputs are streamed through the state in blocks of this many tokens

    def __post_init__(self):
        if self.rule not in RULES:
            raise ValueError(f"unknown memory rule {self.rule!r}; valid: {', '.join(RULES)}")
        if self.path not in PATHS:
            raise ValueError(f"unknown memory path {self.path!r}; valid: {', '.join(PATHS)}")
        if min(self.depth, self.chunk, self.conv_kernel, self.n_heads, self.block) < 1:
            raise ValueError("memory depth, chunk, conv_kernel, n_heads and block must be >= 1")


# ----------------------------------------------------------------------------------------------------------
# the memory MLP, its explicit back-propagation, and the two scans


def mlp_forward(weights: list[Tensor], x: Tensor) -> tuple[list[Tensor], list[Tensor]]:
    """x: [..., n, d_in], weights[l]: [..., d_l, d_{l+1}]. Returns the layer inputs h_0..h_L (h_L = output)
    and the SiLU slopes silu'(z_l) of the hidden layers, s (1 + z - h) with s = sigmoid(z) and h = z s."""
    hs, slopes = [x], []
    for layer, w in enumerate(weights):
        z = hs[-1] @ w
        if layer < len(weights) - 1:
            s = torch.sigmoid(z)
            h = z * s
            slopes.append(torch.addcmul(s, s, z - h))
            hs.append(h)
        else:
            hs.append(z)
    return hs, slopes


def mlp_backprop(weights: list[Tensor], slopes: list[Tensor], d_out: Tensor) -> list[Tensor]:
    """Back-propagates d_out = dl/d(output) per token: d_l = dl/dz_l. Layer l's weight gradient is h_l^T d_l."""
    ds = [d_out]
    for layer in range(len(weights) - 1, 0, -1):
        ds.append((ds[-1] @ weights[layer].transpose(-1, -2)) * slopes[layer - 1])
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
        hs, slopes = mlp_forward(anchor, kt)
        ds = mlp_backprop(anchor, slopes, 2 * (hs[-1] - vt))  # l = ||M(k) - v||^2
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


def chunk_coefficients(log_eta: Tensor, log_keep: Tensor, theta: Tensor) -> dict[str, Tensor]:
    """Scalar coefficients of the chunk recurrences from gates [..., c]. A chunk ends at
    W' = B_c W + BC_c S - (write[0] * h^T) @ d and S' = A_c S - (write[1] * h^T) @ d."""
    c = log_eta.shape[-1]
    work = torch.promote_types(log_eta.dtype, torch.float32)  # at least fp32, fp64 stays fp64
    la, lb = log_eta.to(work).cumsum(-1), log_keep.to(work).cumsum(-1)  # log A_t, log B_t
    lower = torch.ones(c, c, dtype=la.dtype, device=la.device).tril()

    def ratios(log_cum: Tensor) -> Tensor:  # exp(log_cum_t - log_cum_j) for j <= t, else 0: entries in [0, 1]
        # Logs are clamped to [-80, 0] before exp (ratios below e^-80 ~ 2e-35 are raised to it) and the upper
        # triangle is zeroed by a product: CPU exp runs several times slower on -inf or on arguments whose
        # results are subnormal. These [.., c, c] tensors are the largest temporaries, hence clamp_ and exp_.
        return (log_cum[..., :, None] - log_cum[..., None, :]).clamp_(-80.0, 0.0).exp_() * lower

    f, p = ratios(lb), ratios(la)  # B_t / B_j and A_j / A_i
    dtype = theta.dtype
    g = (f @ p).to(dtype) * theta[..., None, :]
    bc = (f @ la.exp()[..., None]).to(dtype)
    b = lb.exp().to(dtype)[..., None]
    s_coef = p[..., -1, :].to(dtype) * theta  # theta_i A_c / A_i
    a_end = la[..., -1:].exp().to(dtype)
    return {
        "G": g,  # [.., c, c]
        "B": b,  # [.., c, 1]
        "BC": bc,  # [.., c, 1]
        "B_end": b[..., -1:, :],  # [.., 1, 1]: W' = B_c W + BC_c S - ...
        "BC_end": bc[..., -1:, :],
        "A_end": a_end[..., None],  # S' = A_c S - ...
        "write": torch.stack([g[..., -1, :], s_coef], -2)[..., None, :],  # (G[c, i], theta_i A_c / A_i), [.., 2, 1, c]
    }


def written(h: Tensor, write: Tensor) -> tuple[Tensor, Tensor]:
    """Layer inputs [.., c, d_in] scaled for the weight and the momentum update: two [.., d_in, c]."""
    return (write * h.transpose(-1, -2).unsqueeze(-3)).unbind(-3)


def advance(
    weights: list[Tensor], momentum: list[Tensor], anchor: list[Tensor], k_written: tuple[Tensor, Tensor],
    k: Tensor, v: Tensor, co: dict[str, Tensor],
) -> tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor]]:
    """One chunk of the recurrence: every key's gradient at the anchor, folded into the chunk-end weights
    and momentum ([B H, d_l, d_{l+1}] per layer). k_written = written(k): the first layer's input is known
    before the loop. Also returns the key-side hidden inputs and back-propagated signals, which the
    batched reads reuse."""
    hs, slopes = mlp_forward(anchor, k)
    ds = mlp_backprop(anchor, slopes, hs[-1] - v)  # the factor 2 of dl/dM(k) is folded into theta
    new_w, new_s = [], []
    for layer, (w, s, d) in enumerate(zip(weights, momentum, ds, strict=True)):
        h_w, h_s = k_written if layer == 0 else written(hs[layer], co["write"])
        # W' = B_c W + BC_c S - h_w @ d and S' = A_c S - h_s @ d, each subtraction fused into its matmul
        new_w.append(torch.baddbmm(torch.addcmul(w * co["B_end"], s, co["BC_end"]), h_w, d, alpha=-1))
        new_s.append(torch.baddbmm(s * co["A_end"], h_s, d, alpha=-1))
    return new_w, new_s, hs[1:-1], ds


def scan_chunks(weights: list[Tensor], momentum: list[Tensor], anchor: list[Tensor], q: Tensor, k: Tensor,
                v: Tensor, co: dict[str, Tensor]) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    """m chunks of c tokens in the dual form, chunk-major with batch and heads merged so that every per-chunk
    slice is a contiguous 3-d tensor for bmm. q, k, v: [m, B H, c, dh]; coefficients [m, B H, ...]; weights
    and momentum [B H, d_l, d_{l+1}]. The first chunk is anchored at `anchor`, the others at their start
    weights. Returns the reads [m, B H, c, dh] and the end weights and momentum.

    Only the key side is sequential: each chunk's gradients are taken at the weights the chunk before
    left. The loop keeps each chunk's start state and key-side signals; the query reads then run for all
    chunks at once, as batched matmuls."""
    keys = ("B_end", "BC_end", "A_end", "write")
    steps = zip(zip(*(part.unbind(0) for part in written(k, co["write"])), strict=True), k.unbind(0), v.unbind(0),
                *(co[key].unbind(0) for key in keys), strict=True)
    record: dict[str, list] = {"w": [], "s": [], "h": [], "d": []}
    for i, (k_written, kc, vc, *coefficients) in enumerate(steps):
        record["w"].append(weights)
        record["s"].append(momentum)
        at = anchor if i == 0 else weights
        weights, momentum, hs, ds = advance(weights, momentum, at, k_written, kc, vc, dict(zip(keys, coefficients,
                                                                                                strict=True)))
        record["h"].append(hs)
        record["d"].append(ds)
    w, s, h, d = ([torch.stack(per_layer) for per_layer in zip(*record[key], strict=True)] for key in "wshd")
    x = q
    for layer, inputs in enumerate([k, *h]):
        z = co["B"] * (x @ w[layer]) + co["BC"] * (x @ s[layer]) - (co["G"] * (x @ inputs.transpose(-1, -2))) @ d[layer]
        x = F.silu(z) if layer < len(w) - 1 else z
    return x, weights, momentum


def chunked_scan(
    weights: list[Tensor], momentum: list[Tensor], anchor: list[Tensor], offset: int, chunk: int,
    q: Tensor, k: Tensor, v: Tensor, log_eta: Tensor, log_keep: Tensor, theta: Tensor,
) -> tuple[Tensor, list[Tensor], list[Tensor], list[Tensor]]:
    """The dual form over a call, in up to three groups of equal chunks: the rest of a chunk begun in an
    earlier call (anchored where it began), the whole chunks, then a trailing partial chunk."""
    batch, heads, n = q.shape[:3]
    first = min(n, chunk - offset) if offset else 0
    whole = (n - first) // chunk
    groups = [(size, count) for size, count in ((first, 1), (chunk, whole), (n - first - whole * chunk, 1))
              if size and count]
    lengths = [size * count for size, count in groups]
    pieces = [x.split(lengths, dim=-2) for x in (q, k, v)]
    gates = [x.split(lengths, dim=-1) for x in (log_eta, log_keep, 2 * theta)]  # 2: dl/dM(k) = 2 (M(k) - v)
    weights, momentum, anchor = ([t.flatten(0, 1) for t in ts] for ts in (weights, momentum, anchor))
    ys, start = [], 0
    for i, (size, count) in enumerate(groups):
        continued = (offset + start) % chunk != 0
        co = chunk_coefficients(*(g[i].unflatten(-1, (count, size)).movedim(2, 0).flatten(1, 2) for g in gates))
        qkv = (p[i].unflatten(-2, (count, size)).movedim(2, 0).flatten(1, 2) for p in pieces)  # [m, B H, c, dh]
        # a chunk begun in an earlier call keeps its anchor; a new chunk is anchored at its start weights
        anchor = anchor if continued else weights
        y, weights, momentum = scan_chunks(weights, momentum, anchor, *qkv, co)
        ys.append(y.unflatten(1, (batch, heads)).movedim(0, 2).flatten(2, 3))
        start += size * count
    weights, momentum, anchor = ([t.unflatten(0, (batch, heads)) for t in ts] for ts in (weights, momentum, anchor))
    return torch.cat(ys, dim=-2), weights, momentum, anchor


# ----------------------------------------------------------------------------------------------------------
# the memory layer


class CausalDepthwiseConv(nn.Module):
    """Per-channel causal convolution on time-major input: y_t = bias + sum_j w_j * u_{t+j}, where u carries
    kernel - 1 earlier steps in front. Written as shifted products: at these widths it is several times
    faster than Conv1d's depthwise kernels, backward above all, and needs no transposes."""

    def __init__(self, channels: int, kernel: int):
        super().__init__()
        self.channels = channels
        bound = 1 / math.sqrt(kernel)  # Conv1d's default initialisation, fan-in = kernel
        self.weight = nn.Parameter(torch.empty(kernel, channels).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(channels).uniform_(-bound, bound))

    def forward(self, u: Tensor) -> Tensor:
        """u: [B, kernel - 1 + N, C] -> [B, N, C]."""
        kernel = self.weight.shape[0]
        n = u.shape[1] - kernel + 1
        y = torch.addcmul(self.bias, u[:, :n], self.weight[0])
        for j in range(1, kernel):
            y = torch.addcmul(y, u[:, j : j + n], self.weight[j])
        return y


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
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + 1e-6) * self.out_norm
        return self.out(y.transpose(1, 2).reshape(b, n, d) * torch.sigmoid(self.out_gate(x)))

    def project(self, x: Tensor, state: dict[str, Any]) -> tuple[Tensor, ...]:
        b, n, d = x.shape
        c, h = self.config, self.config.n_heads
        u = torch.cat([state["conv"], self.qkv(x)], dim=1)  # [B, kernel - 1 + N, 3D]
        new_tail = u[:, u.shape[1] - (c.conv_kernel - 1):]
        u = F.silu(self.conv(u))
        q, k, v = u.view(b, n, 3, h, self.dh).permute(2, 0, 3, 1, 4).contiguous()  # [B, H, N, dh] each
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
        if x.shape[1] > c.block and diagnostics is None:
            # stream long inputs through the state in blocks: equal to one call (tested), and the temporaries
            # stay small enough for the allocator to reuse instead of faulting in fresh pages each time
            ys = []
            for piece in x.split(c.block, dim=1):
                y, state = self(piece, state)
                ys.append(y)
            return torch.cat(ys, dim=1), state
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
