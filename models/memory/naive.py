"""The reference: the memory rule (see `rule`) as a plain loop over tokens, the obviously-right version that the
chunked dual form and the compiled loops are tested against; the only path for the seed paper's formulation
and for per-token diagnostics. With the memory MLP's forward and its explicit back-propagation, which the
other paths and MAC's read reuse."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


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


def mlp_output(weights: list[Tensor], x: Tensor) -> Tensor:
    """The memory's output M(x) alone, as `mlp_forward`'s last h_L but without its inputs and slopes (MAC's read
    in its segment chain, where each saved op counts)."""
    for layer, w in enumerate(weights):
        x = x @ w if layer == len(weights) - 1 else F.silu(x @ w)
    return x


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
    clip: float = 0.0,
) -> tuple[Tensor, list[Tensor], list[Tensor], list[Tensor]]:
    """Token-by-token loop. q, k, v: [B, H, N, dh]; gates [B, H, N]; weights [B, H, d_l, d_{l+1}].
    `offset` tokens of the current chunk were seen before this call (anchored at `anchor`). `clip` > 0 bounds
    each token's inner gradient norm (over all memory layers) by clip, as a differentiable rescaling."""
    ys = []
    for t in range(q.shape[-2]):
        if (offset + t) % chunk == 0 or rule != "titans":
            anchor = weights
        kt, vt, qt = k[..., t : t + 1, :], v[..., t : t + 1, :], q[..., t : t + 1, :]
        hs, slopes = mlp_forward(anchor, kt)
        ds = mlp_backprop(anchor, slopes, 2 * (hs[-1] - vt))  # l = ||M(k) - v||^2
        grads = [h.transpose(-1, -2) @ d for h, d in zip(hs, ds, strict=False)]  # [B, H, d_l, d_{l+1}]
        g_norm = torch.sqrt(sum(g.pow(2).sum((-1, -2)) for g in grads))  # [B, H]
        if clip and rule == "titans":
            # min(1, clip / ||grad||), from the squared norm so that a zero gradient has a finite derivative
            scale = clip * sum(g.pow(2).sum((-1, -2)) for g in grads).clamp_min(clip * clip).rsqrt()
            grads = [g * scale[..., None, None] for g in grads]
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

