"""The chunked dual form of the memory rule (see `rule`): the same result as `naive.reference_scan`, in chunks.
Inside a chunk the recurrences are linear with scalar coefficients:
    F[t, j] = prod_{j<s<=t} (1 - alpha_s)       P[j, i] = prod_{i<s<=j} eta_s        (both in [0, 1])
    G = (F @ P) * theta^T,   BC_t = sum_{j<=t} F[t, j] * prod_{s<=j} eta_s
and, with H_l / D_l the layer inputs and back-propagated signals of all keys at the anchor,
    layer-l pre-activation of the query at t = B_t x W_l + BC_t x S_l - sum_i G[t, i] (x . H_l[i]) D_l[i].
G is formed as a product of two decay matrices rather than from differences of cumulative sums, so it
has no cancellation however strong the gates (the log-space cumsum form loses all precision when the
momentum decays fast within a chunk). No per-token weight tensor is ever built: cost O(b^2 d + b d h)
per chunk, linear in n. Only the key side (each chunk's gradients at the weights the previous chunk
left) runs chunk by chunk, with a hand-written backward that replays it in reverse (`KeyScan`); the
query reads of all chunks then run as batched matmuls (`read_chunks`). On CPU the compiled loops
(`native`, `kernel` in MemoryConfig) do both in one pass, reading each sub-chunk's queries during the scan,
and in training take each chunk's reads and keys back in one reverse pass; the torch versions here stay as
the GPU path and as the tested reference. A chunk that is a multiple of `read_chunk` is read in sub-chunks
that share its anchor (the same coefficients at a finer grain: the c x c work shrinks, the result does not
change), and long inputs are streamed through the state in blocks (`layer`) so that temporaries stay
cache-sized.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from models.memory import native
from models.memory.compiled import Group, compiled_scan, plan


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
    groups = plan(n, offset, chunk, read_chunk)
    theta = 2 * theta  # dl/dM(k) = 2 (M(k) - v)
    if native.use_native(kernel, *weights, *momentum, *anchor, q, k, v, log_eta, log_keep, theta):
        return compiled_scan(weights, momentum, anchor, groups, q, k, v, log_eta, log_keep, theta, bound)
    depth, rows = len(weights), [w.shape[-2] for w in weights]
    states = [torch.cat([w, s], -2).flatten(0, 1) for w, s in zip(weights, momentum, strict=True)]
    anchor = [a.flatten(0, 1) for a in anchor]

    def per_unit(x: Tensor, group: Group, units: int) -> Tensor:  # [B, H, n, ...] -> [units, B H, u, ...]
        return x[:, :, group.start : group.end].flatten(0, 1).unflatten(1, (units, -1)).transpose(0, 1)

    ys = []
    for group in groups:
        subs = group.subs
        co = chunk_coefficients(*(per_unit(g, group, group.count * subs) for g in (log_eta, log_keep, theta)))
        kc, vc = (per_unit(x, group, group.count) for x in (k, v))  # [m, B H, c, dh]
        # a chunk begun in an earlier call keeps its anchor; a new chunk is anchored at its start weights
        anchor = anchor if group.continued else [s[:, :r] for s, r in zip(states, rows, strict=True)]
        qc = per_unit(q, group, group.count * subs)  # [m s, B H, r, dh]
        out = KeyScan.apply(depth, bound, *states, *anchor, kc, vc, co["write"], co["mix"])
        path, states = out[:depth], out[depth : 2 * depth]
        zs, ds = out[2 * depth : 3 * depth - 1], out[3 * depth - 1 :]
        hs, ds = ([to_subchunks(x, subs).flatten(0, 1) for x in xs] for xs in ([kc, *map(F.silu, zs)], ds))
        y = read_chunks(path, hs, ds, qc, co).transpose(0, 1)
        ys.append(y.unflatten(0, (batch, heads)).flatten(2, 3))
    weights, momentum = ([s[:, r:] if part else s[:, :r] for s, r in zip(states, rows, strict=True)] for part in (0, 1))
    weights, momentum, anchor = ([t.unflatten(0, (batch, heads)) for t in ts] for ts in (weights, momentum, anchor))
    return torch.cat(ys, dim=-2) if len(ys) > 1 else ys[0], weights, momentum, anchor
