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
  left) runs chunk by chunk, with a hand-written backward that replays it in reverse (`KeyScan`); the
  query reads of all chunks then run as batched matmuls (`read_chunks`). On CPU compiled loops
  (native_scan.cpp, `kernel` in MemoryConfig) do both in one pass, reading each sub-chunk's queries during
  the scan, and in training take each chunk's reads and keys back in one reverse pass (`ScanRead`); the
  torch versions stay as the GPU path and as the tested reference. A
  chunk that is a multiple of `read_chunk` is read in sub-chunks that share its anchor (the same
  coefficients at a finer grain: the c x c work shrinks, the result does not change), and long inputs are
  streamed through the state in blocks so that temporaries stay cache-sized.

Choices the paper leaves open (config values, defaults in MemoryConfig): memory MLP depth and hidden
width, SiLU activation, chunk size, conv kernel, gate parameterisation theta = max_lr * sigmoid,
eta = sigmoid, alpha = sigmoid (biases start at eta ~ 0.73, alpha ~ 0.0025), learned initial memory shared
across the batch, zero initial momentum, output RMS-norm gated by sigmoid(linear(x)).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable
from torch.utils._python_dispatch import _get_current_dispatch_mode

from models import native_scan
from models.config import above, at_least, check

RULES = ("titans", "seed", "seed_corrected")
PATHS = ("chunked", "reference")
KERNELS = ("auto", "native", "torch")
NO_MOMENTUM_LOG = -1.0e4  # log eta when momentum is off: exp() of any sum of it is exactly 0
NORM_EPS = 1e-6  # the output RMS norm's


@dataclass(frozen=True)
class MemoryConfig:
    n_heads: int = 4
    depth: int = 2  # L_M: layers of the memory MLP (1 = a linear map)
    expansion: float = 2.0  # hidden width of the memory MLP, in head dims
    chunk: int = 16  # b: tokens sharing one gradient anchor
    conv_kernel: int = 4
    max_lr: float = 0.5  # theta_t = max_lr * sigmoid(.): safe this large only with the clip
    momentum: bool = True
    forgetting: bool = True
    rule: str = "titans"  # "titans", or the seed paper's update as written ("seed") or sign-corrected
    seed_gamma: float = 1.0  # seed rule: beta_t = exp(-gamma ||grad l_t||)
    clip: float = 1.0  # > 0: each token's inner gradient rescaled to norm <= clip (over all memory layers); 0: off
    path: str = "chunked"  # "chunked" (dual form) or "reference" (token loop)
    block: int = 1024  # longer inputs are streamed through the state in blocks of this many tokens
    read_chunk: int = 16  # a chunk that is a multiple of it is read in sub-chunks of this size (same result)
    kernel: str = "auto"  # compiled CPU code ("native") or torch ops for the chunk loops and the pointwise work
    # around the scan (conv, norms, output gate), or native where usable

    def __post_init__(self):
        if self.rule not in RULES:
            raise ValueError(f"unknown memory rule {self.rule!r}; valid: {', '.join(RULES)}")
        if self.path not in PATHS:
            raise ValueError(f"unknown memory path {self.path!r}; valid: {', '.join(PATHS)}")
        if self.kernel not in KERNELS:
            raise ValueError(f"unknown memory kernel {self.kernel!r}; valid: {', '.join(KERNELS)}")
        check(self, depth=at_least(1), chunk=at_least(1), conv_kernel=at_least(1), n_heads=at_least(1),
              block=at_least(1), read_chunk=at_least(1), expansion=above(0), max_lr=at_least(0),
              seed_gamma=at_least(0), clip=at_least(0))


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


def chunk_coefficients(log_eta: Tensor, log_keep: Tensor, theta: Tensor) -> dict[str, Tensor]:
    """Scalar coefficients of the chunk recurrences from gates [..., c]. A chunk ends at
    W' = B_c W + BC_c S - (write[0] * h^T) @ d and S' = A_c S - (write[1] * h^T) @ d."""
    c = log_eta.shape[-1]
    work = torch.promote_types(torch.promote_types(log_eta.dtype, log_keep.dtype), torch.float32)  # fp64 stays fp64
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
    a_end = la[..., -1].exp().to(dtype)
    mix = torch.stack([b[..., -1, 0], bc[..., -1, 0], torch.zeros_like(a_end), a_end], -1)
    return {
        "G": g,  # [.., c, c]
        "BBC": torch.stack([b, bc], -2),  # [.., c, 2, 1]: the query at t reads B_t W + BC_t S
        "mix": mix.unflatten(-1, (2, 2)),  # [.., 2, 2]: (W, S) -> (B_c W + BC_c S, A_c S), then minus the writes
        "write": torch.stack([g[..., -1, :], s_coef], -2)[..., None, :],  # (G[c, i], theta_i A_c / A_i), [.., 2, 1, c]
    }


class Coefficients(torch.autograd.Function):
    """chunk_coefficients compiled (native_scan.coefficients), with a hand-written backward: autograd through
    the [.., c, c] decay ratios records a dozen nodes over the largest temporaries of the layer."""

    @staticmethod
    def forward(ctx, log_eta: Tensor, log_keep: Tensor, theta: Tensor):
        gates = tuple(t.contiguous() for t in (log_eta, log_keep, theta))
        ctx.save_for_backward(*gates)
        co = native_scan.coefficients(*gates)
        return co["G"], co["BBC"], co["mix"], co["write"]

    @staticmethod
    @once_differentiable
    def backward(ctx, g_G: Tensor, g_BBC: Tensor, g_mix: Tensor, g_write: Tensor):
        grads = {name: g.contiguous() for name, g in zip(("G", "BBC", "mix", "write"), (g_G, g_BBC, g_mix, g_write),
                                                          strict=True)}
        return native_scan.coefficients_backward(*ctx.saved_tensors, grads)


def coefficients(native: bool, log_eta: Tensor, log_keep: Tensor, theta: Tensor) -> dict[str, Tensor]:
    """chunk_coefficients, compiled when the scan that uses them is (`native`, decided once by chunked_scan)."""
    if not native:
        return chunk_coefficients(log_eta, log_keep, theta)
    return dict(zip(("G", "BBC", "mix", "write"), Coefficients.apply(log_eta, log_keep, theta), strict=True))


@contextmanager
def one_thread():
    """For the sequential chunk loops: their kernels are tiny, and handing each to a second thread costs more
    than it saves (the batched parts outside the loops keep every thread). The setting is per thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def use_native(kernel: str, *tensors: Tensor) -> bool:
    """Whether a piece of the layer runs compiled for these tensors. Under a dispatch mode (FlopCounterMode, fake
    tensors) the torch ops run instead, so that the mode sees every product: the compiled code is invisible to it."""
    if kernel == "torch" or _get_current_dispatch_mode() is not None:
        return False
    usable = native_scan.usable(*tensors)
    if kernel == "native" and not usable:
        raise RuntimeError("memory kernel 'native' needs CPU tensors in float32 or float64 and a C++ compiler "
                           "(see the warning above); use kernel 'auto' or 'torch'")
    return usable


def written(h: Tensor, write: Tensor) -> Tensor:
    """Layer inputs h [.., c, d] scaled for the weight and the momentum update, stacked: [.., 2 d, c]."""
    return (write * h.transpose(-1, -2).unsqueeze(-3)).flatten(-3, -2)


def silu_slope_and_curvature(z: Tensor) -> tuple[Tensor, Tensor]:
    """silu'(z) = s (1 + z (1 - s)) and silu''(z) = s (1 - s) (2 + z (1 - 2 s)), s = sigmoid(z)."""
    s = torch.sigmoid(z)
    return s * (1 + z * (1 - s)), s * (1 - s) * (2 + z * (1 - 2 * s))


def to_subchunks(x: Tensor, subs: int) -> Tensor:
    """[.., B H, c, d] -> [.., subs, B H, c / subs, d], a view."""
    return x.unflatten(-2, (subs, -1)).transpose(-3, -4)


def from_subchunks(x: Tensor) -> Tensor:
    """[.., subs, B H, r, d] -> [.., B H, subs r, d]."""
    return x.transpose(-3, -4).flatten(-3, -2)


def clip_scales(hs: list[Tensor], ds: list[Tensor], bound: float) -> Tensor:
    """Per key, min(1, bound / sqrt(sum_l |h_l|^2 |d_l|^2)): the factor that takes the key's gradient, whose
    layer-l part is the outer product h_l^T d_l, to norm <= bound. hs, ds: per layer [.., c, width]."""
    sq = sum(h.pow(2).sum(-1) * d.pow(2).sum(-1) for h, d in zip(hs, ds, strict=True))
    return bound * sq.clamp_min(bound * bound).rsqrt()


def scan_keys(states: list[Tensor], anchor: list[Tensor], k: Tensor, v: Tensor, write: Tensor,
              mix: Tensor, bound: float = 0.0) -> tuple[list[Tensor], list[Tensor], list[Tensor], Tensor | None]:
    """The sequential part of the dual form: chunk after chunk, every key's gradient at the chunk's anchor,
    then folded into the state sub-chunk by sub-chunk. Per memory layer the state is the weights stacked on
    the momentum, [B H, 2 d_l, d_{l+1}]; `anchor` [B H, d_l, d_{l+1}] anchors the first chunk, later chunks
    are anchored at their start weights. k [m, B H, c, d_0] and v [m, B H, c, d_L] per chunk; write
    [m s, B H, 2, 1, c / s] and mix [m s, B H, 2, 2] per sub-chunk, s sub-chunks to a chunk.

    `bound` > 0 clips each key's gradient norm (in units of d = M(k) - v, whose factor 2 is in the write scales):
    every d_l of the key is scaled by clip_scales, which this returns too ([m, B H, c]; None without a bound).

    Returns, per layer, the states before every sub-chunk and after the last ([m s + 1, B H, 2 d_l, d_{l+1}]),
    and the keys' hidden pre-activations z_l (l < L - 1) and back-propagated signals d_l ([m, B H, c, d_{l+1}],
    clipped) that the batched reads reuse. Results go straight into preallocated buffers, no per-chunk lists to
    stack."""
    m, bh, c, _ = k.shape
    subs, depth, rows = write.shape[0] // m, len(states), [s.shape[-2] // 2 for s in states]
    path = [s.new_empty(m * subs + 1, *s.shape) for s in states]
    zs = [k.new_empty(m, bh, c, s.shape[-1]) for s in states[:-1]]
    ds = [k.new_empty(m, bh, c, s.shape[-1]) for s in states]
    scales = k.new_empty(m, bh, c) if bound else None
    for p, s in zip(path, states, strict=True):
        p[0] = s
    per_chunk = [[p.unflatten(0, (m, subs)).unbind(0) for p in (x[:-1], x[1:])] for x in path]  # [s, B H, ..]
    writes = write.unflatten(0, (m, subs)).unbind(0)
    mixes = [list(x.unbind(0)) for x in mix.unflatten(0, (m, subs)).unbind(0)]
    k_written = written(to_subchunks(k, subs), write.unflatten(0, (m, subs))).unbind(0)  # [s, B H, 2 d_0, r]
    h_buffers = [k.new_empty(subs, bh, 2 * r, c // subs) for r in rows[1:]]
    starts = [p[: m * subs : subs, :, :r].unbind(0) for p, r in zip(path, rows, strict=True)]  # chunk start weights
    z_chunks, d_chunks = ([x.unbind(0) for x in xs] for xs in (zs, ds))
    for i, (k_i, v_i) in enumerate(zip(k.unbind(0), v.unbind(0), strict=True)):
        at = anchor if i == 0 else [a[i] for a in starts]
        z_i, d_i = [z[i] for z in z_chunks], [d[i] for d in d_chunks]
        # mlp_forward and mlp_backprop with fused kernels (silu_backward has no autograd formula; none is needed)
        hs = [k_i]
        for layer in range(depth - 1):
            hs.append(F.silu(torch.bmm(hs[-1], at[layer], out=z_i[layer])))
        torch.baddbmm(v_i, hs[-1], at[-1], beta=-1, out=d_i[-1])  # M(k) - v; dl/dM(k)'s factor 2 is in theta
        for layer in range(depth - 2, -1, -1):
            torch.ops.aten.silu_backward.grad_input(d_i[layer + 1] @ at[layer + 1].transpose(-1, -2), z_i[layer],
                                                    grad_input=d_i[layer])
        if bound:
            torch.mul(clip_scales(hs, d_i, bound), 1, out=scales[i])
            for d in d_i:
                d.mul_(scales[i].unsqueeze(-1))
        for layer, (before, after) in enumerate(per_chunk):
            if layer == 0:
                h_w = k_written[i]
            else:  # into a contiguous buffer: mul would lay its output out like the transposed h
                h_w = h_buffers[layer - 1]
                torch.mul(writes[i], to_subchunks(hs[layer], subs).transpose(-1, -2).unsqueeze(-3),
                          out=h_w.unflatten(-2, (2, -1)))
            d_sub = to_subchunks(d_i[layer], subs)
            for j in range(subs):
                # (W, S) -> (B W + BC S - h_w^T d, A S - h_s^T d): a small bmm mixes, a baddbmm writes in place
                torch.bmm(mixes[i][j], before[i][j].view(bh, 2, -1), out=after[i][j].view(bh, 2, -1))
                torch.baddbmm(after[i][j], h_w[j], d_sub[j], alpha=-1, out=after[i][j])
    return path, zs, ds, scales


def unclip(g_d: list[Tensor], hs: list[Tensor], ds: list[Tensor], scale: Tensor, bound: float) -> list[Tensor]:
    """The clip's own share of the backward, for the keys of one chunk. With clipped signals d~_l = c d_l and
    c = bound / n, n^2 = sum_l |h_l|^2 |d_l|^2 (clipped keys only; elsewhere c = 1 is constant), the gradient that
    reaches c, b = sum_l <g_l, d~_l> (g_l: the gradient of d~_l from its uses), moves the gradients of the
    unclipped signals, in units of d~, to g_l - b |h_l|^2 d~_l / bound^2 (updated in place) and gives h_l the extra
    gradient -b |d~_l|^2 h_l / bound^2, which this returns per layer. The chain of d then runs on d~ unchanged,
    and its gradient at the root d~_{L-1} = c (M(k) - v) is multiplied by c to give that of M(k) - v."""
    b = sum((g * d).sum(-1) for g, d in zip(g_d, ds, strict=True)) * (scale < 1) / (bound * bound)
    extra = [-(b * d.pow(2).sum(-1)).unsqueeze(-1) * h for h, d in zip(hs, ds, strict=True)]
    for g, h, d in zip(g_d, hs, ds, strict=True):
        g.sub_((b * h.pow(2).sum(-1)).unsqueeze(-1) * d)
    return extra


def scan_keys_backward(anchor: list[Tensor], k: Tensor, write: Tensor, mix: Tensor, path: list[Tensor],
                       zs: list[Tensor], ds: list[Tensor], g_before: list[Tensor], g_end: list[Tensor],
                       g_zs: list[Tensor], g_ds: list[Tensor], scales: Tensor | None = None,
                       bound: float = 0.0) -> tuple[list[Tensor], list[Tensor], Tensor, ...]:
    """The backward of scan_keys: from the gradients of its outputs (the states before every sub-chunk, the end
    state, z_l, d_l) to those of its inputs (start states, first anchor, k, v, write, mix). A reverse pass over
    the chunks carries the gradient at each sub-chunk's end state; what does not flow back into earlier chunks
    (k, v, write, mix) is then left to batched products over all chunks. With a clip bound, `scales` are the
    factors scan_keys applied (see unclip)."""
    depth, (m, bh, c, _) = len(path), k.shape
    subs, rows = write.shape[0] // m, [p.shape[-2] // 2 for p in path]
    anchors = [torch.cat([a.unsqueeze(0), p[subs : m * subs : subs, :, :r]]) for a, p, r in zip(anchor, path, rows,
                                                                                                strict=True)]
    hs = [k, *(F.silu(z) for z in zs)]
    sub_writes = write.unflatten(0, (m, subs))
    h_written = [written(to_subchunks(h, subs), sub_writes) for h in hs]  # [m, s, B H, 2 d_l, r]
    slopes, curvatures = zip(*map(silu_slope_and_curvature, zs), strict=True) if zs else ((), ())
    # d_l = silu'(z_l) * e_l with e_l = d_{l+1} A_{l+1}^T, so z_l moves d_l by silu''(z_l) * e_l
    bends = [(ds[i + 1] @ anchors[i + 1].transpose(-1, -2)) * curvatures[i] for i in range(depth - 1)]
    g_after = [torch.empty_like(p[:-1]) for p in path]  # gradient at each sub-chunk's end state
    for g, ge in zip(g_after, g_end, strict=True):
        g[-1] = ge
    g_states, g_anchor = [None] * depth, [None] * depth
    g_z0, g_dout = torch.empty_like(ds[0]), torch.empty_like(ds[-1])
    g_k_clip = torch.zeros_like(k) if bound else None

    def unmix(layer: int, u: int, out: Tensor) -> None:  # gradient at sub-chunk u's start state
        torch.baddbmm(g_before[layer][u].view(bh, 2, -1), mix[u].transpose(-1, -2),
                      g_after[layer][u].view(bh, 2, -1), out=out.view(bh, 2, -1))

    with one_thread():
        for i in reversed(range(m)):
            at, first = [a[i] for a in anchors], i * subs
            for layer in range(depth):  # back through the mixing of all but the chunk's first sub-chunk
                for u in range(first + subs - 1, first, -1):
                    unmix(layer, u, g_after[layer][u - 1])
            g_x = [g[first : first + subs] for g in g_after]  # [s, B H, 2 d_l, d_{l+1}]
            # the writes subtract h_w^T d: d's gradient, then through d's own back-propagation
            g_d = [from_subchunks(torch.baddbmm(
                to_subchunks(g_ds[layer][i], subs).reshape(bh * subs, c // subs, -1),  # a view when s = 1
                h_written[layer][i].flatten(0, 1).transpose(-1, -2), g_x[layer].flatten(0, 1), alpha=-1,
            ).view(subs, bh, c // subs, -1)) for layer in range(depth)]
            g_h_clip = unclip(g_d, [h[i] for h in hs], [d[i] for d in ds], scales[i], bound) if bound else None
            if bound:
                g_k_clip[i] = g_h_clip[0]
            g_z, g_a = [None] * depth, [None] * depth  # g_a: the gradient at the chunk's anchor
            for layer in range(depth - 1):
                g_e = g_d[layer] * slopes[layer][i]
                g_z[layer] = torch.addcmul(g_zs[layer][i], g_d[layer], bends[layer][i])
                g_d[layer + 1] = torch.baddbmm(g_d[layer + 1], g_e, at[layer + 1])
                g_a[layer + 1] = g_e.transpose(-1, -2) @ ds[layer + 1][i]
            g_z[-1] = g_dout[i] = g_d[-1] * scales[i].unsqueeze(-1) if bound else g_d[-1]  # d_{L-1} = z_{L-1} - v
            # then through the keys' forward pass at the anchor, z_l = h_l A_l, h_{l+1} = silu(z_l)
            for layer in range(depth - 1, -1, -1):
                h_t = hs[layer][i].transpose(-1, -2)
                if g_a[layer] is None:
                    g_a[layer] = h_t @ g_z[layer]
                else:  # in place: the accumulator is contiguous, so bmm's batched path applies
                    torch.baddbmm(g_a[layer], h_t, g_z[layer], out=g_a[layer])
                if layer == 0:
                    if depth == 1:
                        g_z0[i] = g_z[0]
                    continue
                d_t = to_subchunks(ds[layer][i], subs).reshape(subs * bh, c // subs, -1).transpose(-1, -2)
                g_hw = torch.bmm(g_x[layer].flatten(0, 1), d_t).view(subs, bh, 2, rows[layer], -1)
                w = sub_writes[i]  # [s, B H, 2, 1, r]; g_hw [s, B H, 2, d_l, r] is minus the gradient of h_w
                minus_g_h = from_subchunks(torch.addcmul(g_hw[:, :, 0] * w[:, :, 0], g_hw[:, :, 1], w[:, :, 1])
                                           .transpose(-1, -2))
                g_h = torch.baddbmm(minus_g_h, g_z[layer], at[layer].transpose(-1, -2), beta=-1)
                if bound:
                    g_h += g_h_clip[layer]
                g_z[layer - 1] = torch.addcmul(g_z[layer - 1], g_h, slopes[layer - 1][i],
                                               out=g_z0[i] if layer == 1 else None)
            for layer, r in enumerate(rows):  # the chunk's start state, through its first sub-chunk's mixing
                before = g_after[layer][first - 1] if i else torch.empty_like(g_after[layer][0])
                unmix(layer, first, before)
                if i:  # the anchor is the chunk's start weights
                    before[:, :r] += g_a[layer]
                else:
                    g_states[layer], g_anchor[layer] = before, g_a[layer]
    # batched over all chunks: what flows to k, v, write and mix
    g_k = g_z0 @ anchors[0].transpose(-1, -2)
    if bound:
        g_k += g_k_clip
    g_write, g_mix = torch.zeros_like(sub_writes), torch.zeros_like(mix)
    for layer, (g, h, d, p) in enumerate(zip(g_after, hs, ds, path, strict=True)):
        # explicit 3-d bmm: matmul on these 5-d views falls back to one small product per matrix
        d_t = to_subchunks(d, subs).reshape(m * subs * bh, c // subs, -1).transpose(-1, -2)
        g_hw = torch.bmm(g.flatten(0, 1), d_t).view(m, subs, bh, 2, rows[layer], -1)  # [m, s, B H, 2, d_l, r]
        g_write -= (g_hw * to_subchunks(h, subs).transpose(-1, -2).unsqueeze(-3)).sum(-2, keepdim=True)
        if layer == 0:
            g_k -= from_subchunks((g_hw * sub_writes).sum(-3).transpose(-1, -2))
        g_mix += g.flatten(-2).unflatten(-1, (2, -1)) @ p[:-1].flatten(-2).unflatten(-1, (2, -1)).transpose(-1, -2)
    return g_states, g_anchor, g_k, -g_dout, g_write.flatten(0, 1), g_mix


class KeyScan(torch.autograd.Function):
    """scan_keys with a hand-written backward, a reverse pass over the chunks. Autograd would record dozens
    of small nodes per chunk, and at these sizes its per-node bookkeeping costs more than the arithmetic.
    The torch loops (the GPU path and the reference of the compiled ones); checked against autograd through
    the token loop and by gradcheck."""

    @staticmethod
    def forward(ctx, depth: int, bound: float, *tensors: Tensor):
        states, anchor = list(tensors[:depth]), list(tensors[depth : 2 * depth])
        k, v, write, mix = tensors[2 * depth :]
        with one_thread():
            path, zs, ds, scales = scan_keys(states, anchor, k, v, write, mix, bound)
        ctx.depth, ctx.bound = depth, bound
        ctx.save_for_backward(*anchor, k, write, mix, scales, *path, *zs, *ds)
        # the states before each sub-chunk and the end state as two outputs: a slice of one output would make
        # autograd fill a zero gradient buffer for the whole path
        return (*(p[:-1] for p in path), *(p[-1] for p in path), *zs, *ds)

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads: Tensor):
        depth, saved = ctx.depth, ctx.saved_tensors
        anchor, (k, write, mix, scales) = list(saved[:depth]), saved[depth : depth + 4]
        path, zs, ds = (list(x) for x in (saved[depth + 4 : 2 * depth + 4], saved[2 * depth + 4 : 3 * depth + 3],
                                          saved[3 * depth + 3 :]))
        g_before, g_end = list(grads[:depth]), list(grads[depth : 2 * depth])
        g_zs, g_ds = list(grads[2 * depth : 3 * depth - 1]), list(grads[3 * depth - 1 :])
        g_states, g_anchor, *rest = scan_keys_backward(anchor, k, write, mix, path, zs, ds, g_before, g_end, g_zs, g_ds,
                                                       scales, ctx.bound)
        return (None, None, *g_states, *g_anchor, *rest)


class ScanRead(torch.autograd.Function):
    """The compiled loops in training (native_scan): the key scan with each sub-chunk's reads done as it goes,
    recording the states and the keys' z, d; the backward takes each chunk's reads back (recomputed) and
    then its writes and keys, in one reverse pass. Returns the reads and the end states. The same math as
    KeyScan followed by read_chunks, and tested against them."""

    @staticmethod
    def forward(ctx, depth: int, bound: float, *tensors: Tensor):
        states, anchor = list(tensors[:depth]), list(tensors[depth : 2 * depth])
        k, v, write, mix, q, G, BBC = tensors[2 * depth :]
        y, path, zs, ds, scales = native_scan.scan_and_read_recorded(states, anchor, k, v, write, mix, q, G, BBC,
                                                                     bound)
        ctx.depth, ctx.bound = depth, bound
        ctx.save_for_backward(*anchor, k, write, mix, q, G, BBC, scales, *path, *zs, *ds)
        return (y, *(p[:, -1] for p in path))

    @staticmethod
    @once_differentiable
    def backward(ctx, g_y: Tensor, *g_end: Tensor):
        depth, saved = ctx.depth, ctx.saved_tensors
        anchor, (k, write, mix, q, G, BBC, scales) = list(saved[:depth]), saved[depth : depth + 7]
        path, zs, ds = (list(x) for x in (saved[depth + 7 : 2 * depth + 7], saved[2 * depth + 7 : 3 * depth + 6],
                                          saved[3 * depth + 6 :]))
        g_states, g_anchor, *rest = native_scan.scan_and_read_backward(anchor, k, write, mix, path, zs, ds, q, G,
                                                                       BBC, g_y, list(g_end), scales, ctx.bound)
        return (None, None, *g_states, *g_anchor, *rest)


def read_chunks(path: list[Tensor], hs: list[Tensor], ds: list[Tensor], q: Tensor, co: dict[str, Tensor]) -> Tensor:
    """The query reads of all m sub-chunks at once, as batched matmuls: layer l's pre-activation of the query
    at t is B_t x W_l + BC_t x S_l - sum_i G[t, i] (x . H_l[i]) D_l[i], from the state at the sub-chunk's
    start (path: [m, B H, 2 d_l, d_{l+1}]). hs: the keys' layer inputs (k first) and ds: their signals,
    both [m, B H, r, .]."""
    m, bh, c, _ = q.shape
    x = q
    for layer, (p, h, d) in enumerate(zip(path, hs, ds, strict=True)):
        bbc_x = (x.unsqueeze(-2) * co["BBC"]).flatten(-2)  # [m, B H, r, 2 d_l] against (W; S) [2 d_l, d_{l+1}]
        decayed = co["G"] * (x @ h.transpose(-1, -2))  # [m, B H, r, r]
        z = torch.baddbmm(torch.bmm(bbc_x.flatten(0, 1), p.flatten(0, 1)), decayed.flatten(0, 1),
                          d.flatten(0, 1), alpha=-1).view(m, bh, c, -1)
        x = F.silu(z) if layer < len(path) - 1 else z
    return x


def chunked_scan(
    weights: list[Tensor], momentum: list[Tensor], anchor: list[Tensor], offset: int, chunk: int,
    q: Tensor, k: Tensor, v: Tensor, log_eta: Tensor, log_keep: Tensor, theta: Tensor, read_chunk: int = 16,
    kernel: str = "auto", clip: float = 0.0,
) -> tuple[Tensor, list[Tensor], list[Tensor], list[Tensor]]:
    """The dual form over a call, in up to three groups of equal chunks: the rest of a chunk begun in an
    earlier call (anchored where it began), the whole chunks, then a trailing partial chunk. A chunk that is
    a multiple of `read_chunk` is read in sub-chunks of that size which share its anchor: the same result,
    with c x c decay work per sub-chunk instead of per chunk. Batch and heads are merged into one dimension:
    chunk-major for the torch loops, so that every per-chunk slice is a 3-d tensor for bmm, and pairs major
    for the compiled loops, which is [B, H, N, d]'s own layout (no copies on the way in or out). `clip` bounds each
    key's gradient norm as in reference_scan."""
    batch, heads, n = q.shape[:3]
    bound = clip / 2  # the loops clip d = M(k) - v, half of dl/dM(k)
    depth, rows = len(weights), [w.shape[-2] for w in weights]
    first = min(n, chunk - offset) if offset else 0
    whole = (n - first) // chunk
    groups = [(size, count) for size, count in ((first, 1), (chunk, whole), (n - first - whole * chunk, 1))
              if size and count]
    lengths = [size * count for size, count in groups]
    # one group (a call of whole chunks, as MAC's segments are) is not split: a split records a node in training
    pieces = [x.split(lengths, dim=-2) if len(groups) > 1 else (x,) for x in (q, k, v)]
    gates = [x.split(lengths, dim=-1) if len(groups) > 1 else (x,)
             for x in (log_eta, log_keep, 2 * theta)]  # 2: dl/dM(k) = 2 (M(k) - v)
    states = [torch.cat([w, s], -2).flatten(0, 1) for w, s in zip(weights, momentum, strict=True)]
    anchor = [a.flatten(0, 1) for a in anchor]
    inference = not (torch.is_grad_enabled() and any(
        t.requires_grad for t in (*weights, *momentum, *anchor, q, k, v, log_eta, log_keep, theta)))
    native = use_native(kernel, *states, *anchor, q, k, v, log_eta, log_keep, theta)

    def per_unit(x: Tensor, units: int) -> Tensor:  # [B, H, units u, ...] -> [B H, units, u, ...], or chunk-major
        x = x.flatten(0, 1).unflatten(1, (units, -1))
        return x if native else x.transpose(0, 1)

    ys, start = [], 0
    for i, (size, count) in enumerate(groups):
        continued = (offset + start) % chunk != 0
        subs = size // read_chunk if size > read_chunk and size % read_chunk == 0 else 1
        co = coefficients(native, *(per_unit(g[i], count * subs) for g in gates))
        kc, vc = (per_unit(p[i], count) for p in pieces[1:])  # [B H, m, c, dh] or [m, B H, c, dh]
        # a chunk begun in an earlier call keeps its anchor; a new chunk is anchored at its start weights
        anchor = anchor if continued else [s[:, :r] for s, r in zip(states, rows, strict=True)]
        qc = per_unit(pieces[0][i], count * subs)  # [B H, m s, r, dh] or [m s, B H, r, dh]
        keys = (*states, *anchor, kc, vc, co["write"], co["mix"])
        if not native:
            out = KeyScan.apply(depth, bound, *keys)
            path, states = out[:depth], out[depth : 2 * depth]
            zs, ds = out[2 * depth : 3 * depth - 1], out[3 * depth - 1 :]
            hs, ds = ([to_subchunks(x, subs).flatten(0, 1) for x in xs] for xs in ([kc, *map(F.silu, zs)], ds))
            y = read_chunks(path, hs, ds, qc, co).transpose(0, 1)
        elif inference:  # reads as it scans and stores no path
            y, states = native_scan.scan_and_read(states, anchor, kc, vc, co["write"], co["mix"], qc, co["G"],
                                                  co["BBC"], bound)
        else:
            y, *states = ScanRead.apply(depth, bound, *keys, qc, co["G"], co["BBC"])
        ys.append(y.unflatten(0, (batch, heads)).flatten(2, 3))  # a view for the compiled loops' layout
        start += size * count
    weights, momentum = ([s[:, r:] if part else s[:, :r] for s, r in zip(states, rows, strict=True)] for part in (0, 1))
    weights, momentum, anchor = ([t.unflatten(0, (batch, heads)) for t in ts] for ts in (weights, momentum, anchor))
    return torch.cat(ys, dim=-2) if len(ys) > 1 else ys[0], weights, momentum, anchor


# ----------------------------------------------------------------------------------------------------------
# the memory layer


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


class ConvActivateNormalise(torch.autograd.Function):
    """The conv, SiLU and q/k norms of NeuralMemory.project compiled (native_scan), from the projections and the
    conv tail to q, k, v [B, H, N, dh]. The backward recomputes the activations from the conv's inputs rather
    than storing them. The torch ops stay as the GPU path and as the reference the tests hold this to."""

    @staticmethod
    def forward(ctx, tail: Tensor, p: Tensor, weight: Tensor, bias: Tensor, heads: int):
        inputs = [t.contiguous() for t in (tail, p, weight, bias)]
        ctx.save_for_backward(*inputs)
        return native_scan.conv_activate_normalise(*inputs, heads)

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads: Tensor):
        grads = [g.contiguous() for g in grads]  # held in names: the C call reads them
        return (*native_scan.conv_activate_normalise_backward(*ctx.saved_tensors, grads), None)


class NormGate(torch.autograd.Function):
    """The RMS norm, sigmoid gate and token-major layout of NeuralMemory.finish compiled (native_scan), with a
    hand-written backward; the torch ops stay as the GPU path and the tested reference."""

    @staticmethod
    def forward(ctx, y: Tensor, weight: Tensor, logits: Tensor, eps: float):
        inputs = [t.contiguous() for t in (y, weight, logits)]
        ctx.save_for_backward(*inputs)
        ctx.eps = eps
        return native_scan.norm_gate(*inputs, eps)

    @staticmethod
    @once_differentiable
    def backward(ctx, g_out: Tensor):
        g_out = g_out.contiguous()
        return (*native_scan.norm_gate_backward(*ctx.saved_tensors, ctx.eps, g_out), None)


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
        logits = self.out_gate(x)
        if use_native(self.config.kernel, y, self.out_norm, logits):
            return self.out(NormGate.apply(y, self.out_norm, logits, NORM_EPS))
        y = F.rms_norm(y, (self.dh,), self.out_norm, eps=NORM_EPS)
        return self.out(y.transpose(1, 2).reshape(b, n, d) * torch.sigmoid(logits))

    def project(self, x: Tensor, state: dict[str, Any]) -> tuple[Tensor, ...]:
        b, n, d = x.shape
        c, h = self.config, self.config.n_heads
        tail, p = state["conv"], self.qkv(x)  # the last kernel - 1 projections before x, then x's: [B, ., 3D]
        before = p if n >= c.conv_kernel - 1 else torch.cat([tail, p], dim=1)
        new_tail = before[:, before.shape[1] - (c.conv_kernel - 1):]
        if use_native(c.kernel, tail, p, self.conv.weight, self.conv.bias):
            q, k, v = ConvActivateNormalise.apply(tail, p, self.conv.weight, self.conv.bias, h)
        else:
            u = F.silu(self.conv(torch.cat([tail, p], dim=1)))
            q, k, v = u.view(b, n, 3, h, self.dh).permute(2, 0, 3, 1, 4).contiguous()  # [B, H, N, dh] each
            q, k = l2_normalise(q), l2_normalise(k)
        theta_l, eta_l, alpha_l = self.gates(x).view(b, n, 3, h).permute(2, 0, 3, 1)  # [B, H, N] each
        theta = c.max_lr * torch.sigmoid(theta_l)
        log_eta = F.logsigmoid(eta_l) if c.momentum else torch.full_like(eta_l, NO_MOMENTUM_LOG)
        log_keep = F.logsigmoid(-alpha_l) if c.forgetting else torch.zeros_like(alpha_l)
        return q, k, v, log_eta, log_keep, theta, new_tail

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
        q, k, v, log_eta, log_keep, theta, tail = self.project(x, state)
        args = (state["weights"], state["momentum"], state["anchor"], state["offset"], c.chunk,
                q, k, v, log_eta, log_keep, theta)
        if c.path == "reference" or c.rule != "titans" or diagnostics is not None:
            y, weights, momentum, anchor = reference_scan(*args, rule=c.rule, seed_gamma=c.seed_gamma, clip=c.clip,
                                                          diagnostics=diagnostics)
        else:
            y, weights, momentum, anchor = chunked_scan(*args, read_chunk=c.read_chunk, kernel=c.kernel, clip=c.clip)
        new_state = {"weights": weights, "momentum": momentum, "anchor": anchor,
                     "offset": (state["offset"] + x.shape[1]) % c.chunk, "conv": tail}
        return y, new_state
