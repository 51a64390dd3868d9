"""Attention kernels and the attention mixer.

Two backends with equal outputs: `naive` materialises the score matrix (the textbook O(n^2) memory),
`sdpa` calls torch's fused `scaled_dot_product_attention`. Queries are always the *last* Nq positions of
the Nk keys (bottom-right causal alignment), which is what a KV cache needs.

Sliding-window attention is computed blockwise: the sequence is cut into blocks of w queries, each
attending to its own block and the previous one, so time and memory are O(n * w). A dense masked n x n
version is kept as the obviously-right reference (`window_attention_dense`), for tests only.

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


def window_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    window: int,
    backend: str,
    q_start: int = 0,
    prefix: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """Blockwise sliding-window attention in O(n * w).

    q: [B, H, Nq, dh] at stream positions q_start..q_start+Nq-1; k, v: [B, H, Nk, dh] ending at the last
    query (Nk - Nq <= w past keys are used). prefix: keys/values [B, H, P, dh] at positions 0..P-1, seen by
    every query (masked where they already sit inside the query's window, so none counts twice).
    """
    w, n_q, dh = window, q.shape[-2], q.shape[-1]
    past = min(k.shape[-2] - n_q, w)
    k, v = k[..., k.shape[-2] - n_q - past :, :], v[..., v.shape[-2] - n_q - past :, :]
    n_blocks = -(-n_q // w)
    pad_left, pad_right = w - past, n_blocks * w - n_q
    # keys padded to (n_blocks + 1) blocks: block b of queries sees key blocks b and b + 1
    kp = F.pad(k, (0, 0, pad_left, pad_right)).unflatten(-2, (n_blocks + 1, w))
    vp = F.pad(v, (0, 0, pad_left, pad_right)).unflatten(-2, (n_blocks + 1, w))
    k_win = torch.cat([kp[..., :-1, :, :], kp[..., 1:, :, :]], dim=-2)  # [B, H, nb, 2w, dh]
    v_win = torch.cat([vp[..., :-1, :, :], vp[..., 1:, :, :]], dim=-2)
    qb = F.pad(q, (0, 0, 0, pad_right)).unflatten(-2, (n_blocks, w))  # [B, H, nb, w, dh]

    dev = q.device
    r = torch.arange(w, device=dev)[:, None]  # query row inside its block
    c = torch.arange(2 * w, device=dev)[None, :]  # key column inside the block's window
    key_index = torch.arange(n_blocks, device=dev)[:, None, None] * w + c  # index in the padded keys
    mask = (c > r) & (c <= w + r) & (key_index >= pad_left)  # [nb, w, 2w]
    if prefix is not None:
        pk, pv = prefix
        n_p = pk.shape[-2]
        q_pos = q_start + torch.arange(n_blocks * w, device=dev).view(n_blocks, w, 1)
        prefix_mask = torch.arange(n_p, device=dev).view(1, 1, n_p) <= q_pos - w  # outside the window
        expand = (*qb.shape[:2], n_blocks, n_p, dh)
        k_win = torch.cat([pk.unsqueeze(2).expand(expand), k_win], dim=-2)
        v_win = torch.cat([pv.unsqueeze(2).expand(expand), v_win], dim=-2)
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
