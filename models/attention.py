"""Attention kernels and the attention mixer.

Two backends with equal outputs: `naive` materialises the score matrix (the textbook O(n^2) memory),
`sdpa` calls torch's fused `scaled_dot_product_attention`. Queries are always the *last* Nq positions of
the Nk keys (bottom-right causal alignment), which is what a KV cache needs.

Sliding-window attention is computed blockwise in O(n * w) time and memory, never as a masked n x n matrix.
`window_attention`, the fast path, costs what the window costs at every length: queries whose window
reaches back to the first key (all of them when the keys fit in one window) take plain causal attention,
sdpa's fused `is_causal` kernel; the rest go in blocks of w queries over the key block before theirs and
their own, one 4-d sdpa call with a small mask (the band, and the prefix where it is partly visible), so
the fused kernel takes it. `window_attention_padded` pads every call to blocks of w queries over 2w keys
with a 5-d boolean mask, which sends sdpa to its unfused path: it is the reference the fast path is tested
against. A dense masked n x n version is the obviously-right reference of both (`window_attention_dense`),
for tests only.

Window convention: query i sees keys j with i - w < j <= i (w keys, itself included). An optional prefix
(persistent tokens at stream positions 0..P-1) stays visible to every query.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.layers import rotary

BACKENDS = ("naive", "sdpa")


def check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; valid: {', '.join(BACKENDS)}")


def masked_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, backend: str) -> Tensor:
    """softmax(q k^T / sqrt(d) + log mask) v over any leading dims; mask is True where attention is allowed."""
    if backend == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])  # [..., Nq, Nk]: the n^2 term
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def causal_mask(n_q: int, n_k: int, device: torch.device) -> Tensor:
    offset = n_k - n_q
    rows = torch.arange(n_q, device=device)[:, None] + offset
    return torch.arange(n_k, device=device)[None, :] <= rows


def causal_attention(q: Tensor, k: Tensor, v: Tensor, backend: str) -> Tensor:
    """Full causal attention. q: [B, H, Nq, dh]; k, v: [B, H, Nk, dh] with Nk >= Nq."""
    n_q, n_k = q.shape[-2], k.shape[-2]
    if backend == "sdpa" and n_q == n_k:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return masked_attention(q, k, v, causal_mask(n_q, n_k, q.device), backend)


def window_attention(q: Tensor, k: Tensor, v: Tensor, window: int, backend: str, q_start: int = 0,
                     prefix: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """Sliding-window attention at the cost of its window; arguments and result as `window_attention_padded`.

    The keys used (the queries' own and up to w past ones) are cut into blocks of w from the first. Queries in
    the first block see every key before them within it: causal attention, the fused kernel, with no padding
    (when n <= w that is the whole call). Each later block of w queries sees the block before and its own through
    the band mask [w, 2w]; only the last block is padded, and its padded queries are dropped. Keys before
    the first are taken to be absent (as in the reference), so the first block never sees a prefix key unless the
    call starts past position w with fewer than w past keys, which no caller does (the reference then runs).
    """
    w, n_q, heads = window, q.shape[-2], q.shape[1]
    past = min(k.shape[-2] - n_q, w)
    k, v = k[..., k.shape[-2] - n_q - past :, :], v[..., v.shape[-2] - n_q - past :, :]
    head = min(n_q, w - past)  # queries in the first key block
    if head and prefix is not None and q_start + head > w:  # the first block would see a prefix key
        return window_attention_padded(q, k, v, w, backend, q_start, prefix)
    first = causal_attention(q[..., :head, :], k[..., : past + head, :], v[..., : past + head, :], backend) \
        if head else None
    rest = n_q - head
    if not rest:
        return first
    blocks = -(-rest // w)  # the rest sit at key indices w..past + n_q - 1: blocks 1..nb of the keys
    k_win, v_win = (key_windows(t, w, 0, blocks * w - rest) for t in (k, v))  # [B, H, nb, 2w, dh]
    qb = F.pad(q[..., head:, :], (0, 0, 0, blocks * w - rest)).unflatten(-2, (blocks, w))  # [B, H, nb, w, dh]
    mask = band_mask(w, q.device)  # [w, 2w], the same in every block
    if prefix is not None:
        seen = prefix_visible(prefix[0].shape[-2], q_start + head, blocks * w, w, q.device).view(blocks, w, -1)
        k_win, v_win = with_prefix(prefix, k_win, v_win)
        # per block, repeated per head in the order of the merged (head, block) dimension below
        mask = torch.cat([seen, mask.expand(blocks, w, 2 * w)], dim=-1).repeat(heads, 1, 1)  # [H nb, w, P + 2w]
    out = masked_attention(qb.flatten(1, 2), k_win.flatten(1, 2), v_win.flatten(1, 2), mask, backend)  # 4-d
    out = out.unflatten(1, (heads, blocks)).flatten(-3, -2)[..., :rest, :]
    return out if first is None else torch.cat([first, out], dim=-2)


def key_windows(t: Tensor, window: int, pad_left: int, pad_right: int) -> Tensor:
    """Keys or values [B, H, Nk, dh], padded to (nb + 1) whole blocks of w, -> [B, H, nb, 2w, dh]: query block b
    sees key blocks b and b + 1 of the padded keys."""
    blocks = F.pad(t, (0, 0, pad_left, pad_right)).unflatten(-2, (-1, window))
    return torch.cat([blocks[..., :-1, :, :], blocks[..., 1:, :, :]], dim=-2)


def band_mask(window: int, device: torch.device) -> Tensor:
    """[w, 2w]: query r of a block sees columns r + 1..r + w of its 2w-key window (w keys, itself the last)."""
    r = torch.arange(window, device=device)[:, None]
    c = torch.arange(2 * window, device=device)[None, :]
    return (c > r) & (c <= window + r)


def with_prefix(prefix: tuple[Tensor, Tensor], k_win: Tensor, v_win: Tensor) -> tuple[Tensor, Tensor]:
    """The prefix keys and values [B, H, P, dh] put in front of every block's window [B, H, nb, ., dh]."""
    return tuple(torch.cat([p.unsqueeze(2).expand(*t.shape[:3], *p.shape[-2:]), t], dim=-2)
                 for p, t in zip(prefix, (k_win, v_win), strict=True))


def prefix_visible(n_prefix: int, q_start: int, n_q: int, window: int, device: torch.device) -> Tensor:
    """[n_q, n_prefix]: which prefix keys (stream positions 0..P-1) queries at q_start..q_start+n_q-1 see outside
    their window, j <= p - w (inside it they are ordinary keys, so none counts twice)."""
    p = q_start + torch.arange(n_q, device=device)[:, None]
    return torch.arange(n_prefix, device=device)[None, :] <= p - window


def window_attention_padded(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    window: int,
    backend: str,
    q_start: int = 0,
    prefix: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """Blockwise sliding-window attention in O(n * w), every call padded to blocks of w queries over 2w keys:
    the reference of `window_attention`.

    q: [B, H, Nq, dh] at stream positions q_start..q_start+Nq-1; k, v: [B, H, Nk, dh] ending at the last
    query (Nk - Nq <= w past keys are used). prefix: keys/values [B, H, P, dh] at positions 0..P-1, seen by
    every query (masked where they already sit inside the query's window, so none counts twice).
    """
    w, n_q = window, q.shape[-2]
    past = min(k.shape[-2] - n_q, w)
    k, v = k[..., k.shape[-2] - n_q - past :, :], v[..., v.shape[-2] - n_q - past :, :]
    n_blocks = -(-n_q // w)
    pad_left, pad_right = w - past, n_blocks * w - n_q
    k_win, v_win = (key_windows(t, w, pad_left, pad_right) for t in (k, v))  # [B, H, nb, 2w, dh]
    qb = F.pad(q, (0, 0, 0, pad_right)).unflatten(-2, (n_blocks, w))  # [B, H, nb, w, dh]
    key_index = torch.arange(n_blocks, device=q.device)[:, None, None] * w + torch.arange(2 * w, device=q.device)
    mask = band_mask(w, q.device) & (key_index >= pad_left)  # [nb, w, 2w]
    if prefix is not None:
        prefix_mask = prefix_visible(prefix[0].shape[-2], q_start, n_blocks * w, w, q.device).view(n_blocks, w, -1)
        k_win, v_win = with_prefix(prefix, k_win, v_win)
        mask = torch.cat([prefix_mask, mask], dim=-1)
    out = masked_attention(qb, k_win, v_win, mask, backend)
    return out.flatten(-3, -2)[..., :n_q, :]


def window_attention_dense(
    q: Tensor, k: Tensor, v: Tensor, window: int, q_start: int = 0, n_prefix: int = 0
) -> Tensor:
    """Reference: the same attention as a dense masked Nq x Nk matrix (O(n^2); tests only).
    Here k, v hold the whole stream so far (positions 0..Nk-1), the prefix being its first n_prefix keys."""
    n_q, n_k = q.shape[-2], k.shape[-2]
    i = q_start + torch.arange(n_q, device=q.device)[:, None]
    j = torch.arange(n_k, device=q.device)[None, :]
    mask = (j <= i) & ((j > i - window) | (j < n_prefix))
    return masked_attention(q, k, v, mask, "naive")


class AttentionMixer(nn.Module):
    """Multi-head causal self-attention with rotary positions, full or sliding-window, streamable.

    State: {"pos": tokens seen, "k"/"v": cached keys/values (all of them, or the last w),
    "prefix": the first n_prefix keys/values of the stream (window mode only)}.
    """

    def __init__(
        self,
        dim: int,
        n_heads: int,
        backend: str = "sdpa",
        window: int | None = None,
        n_prefix: int = 0,
        rope_base: float = 10000.0,
    ):
        super().__init__()
        check_backend(backend)
        if dim % n_heads:
            raise ValueError(f"d_model={dim} must be divisible by n_heads={n_heads}")
        if window is not None and window < 1:
            raise ValueError(f"window must be >= 1 or None, got {window}")
        self.n_heads, self.backend, self.window = n_heads, backend, window
        self.n_prefix, self.rope_base = n_prefix, rope_base
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)

    def state_numel(self, n: int) -> int:
        d = self.out.in_features
        return 2 * d * (n if self.window is None else min(n, self.window) + self.n_prefix)

    def forward(self, x: Tensor, state: dict[str, Any] | None = None) -> tuple[Tensor, dict[str, Any]]:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        pos = state["pos"] if state else 0
        q, k = rotary(q, pos, self.rope_base), rotary(k, pos, self.rope_base)  # [B, H, N, dh]
        if state:
            k, v = torch.cat([state["k"], k], dim=-2), torch.cat([state["v"], v], dim=-2)
        if self.window is None:
            y = causal_attention(q, k, v, self.backend)
            new_state = {"pos": pos + n, "k": k, "v": v}
        else:
            prefix = state["prefix"] if state else None
            if prefix is None and self.n_prefix:
                if n < self.n_prefix:
                    raise ValueError(f"the first call must hold the {self.n_prefix} prefix tokens, got {n}")
                prefix = (k[..., : self.n_prefix, :], v[..., : self.n_prefix, :])
            y = window_attention(q, k, v, self.window, self.backend, q_start=pos, prefix=prefix)
            keep = self.window
            new_state = {"pos": pos + n, "k": k[..., -keep:, :], "v": v[..., -keep:, :], "prefix": prefix}
        return self.out(y.transpose(1, 2).reshape(b, n, d)), new_state
