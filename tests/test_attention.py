import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from models.attention import (
    BACKENDS,
    AttentionMixer,
    causal_attention,
    masked_attention,
    window_attention,
    window_attention_dense,
    window_attention_padded,
)


def qkv(n_q, n_k=None, b=2, h=3, d=8):
    n_k = n_k or n_q
    g = torch.Generator().manual_seed(n_q * 31 + n_k)
    q = torch.randn(b, h, n_q, d, dtype=torch.float64, generator=g)
    k = torch.randn(b, h, n_k, d, dtype=torch.float64, generator=g)
    v = torch.randn(b, h, n_k, d, dtype=torch.float64, generator=g)
    return q, k, v


def textbook(q, k, v):
    """softmax(QK^T/sqrt(d)) V with an explicit loop over query rows: the obviously-right reference."""
    n_q, n_k = q.shape[-2], k.shape[-2]
    out = torch.empty_like(q)
    for i in range(n_q):
        visible = n_k - n_q + i + 1
        w = torch.softmax(q[..., i : i + 1, :] @ k[..., :visible, :].transpose(-1, -2) / q.shape[-1] ** 0.5, -1)
        out[..., i : i + 1, :] = w @ v[..., :visible, :]
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n_q,n_k", [(1, 1), (17, 17), (64, 64), (5, 23), (1, 40)])
def test_causal_backends_equal_textbook_attention_in_fp64(backend, n_q, n_k):
    q, k, v = qkv(n_q, n_k)
    torch.testing.assert_close(causal_attention(q, k, v, backend), textbook(q, k, v), rtol=1e-12, atol=1e-12)


def test_sdpa_and_naive_agree_in_fp64():
    q, k, v = qkv(200)
    torch.testing.assert_close(causal_attention(q, k, v, "sdpa"), causal_attention(q, k, v, "naive"),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("blockwise", [window_attention, window_attention_padded])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("window", [1, 3, 8, 50, 200])
@pytest.mark.parametrize("n", [1, 37, 64])
def test_blockwise_window_equals_dense_masked_reference(blockwise, backend, window, n):
    q, k, v = qkv(n)
    torch.testing.assert_close(blockwise(q, k, v, window, backend), window_attention_dense(q, k, v, window),
                               rtol=1e-12, atol=1e-12)


def values_and_gradients(fn, q, k, v, window, backend, q_start=0, n_prefix=0):
    """fn's output and the gradients of a random projection of it with respect to q, k, v. q: the queries at
    q_start..; k, v: the whole stream, of which fn gets what the mixer caches (at most w past keys); the prefix,
    when there is one, is the stream's first n_prefix keys (its gradient flows into k and v)."""
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    prefix = (k[..., :n_prefix, :], v[..., :n_prefix, :]) if n_prefix else None
    lo = k.shape[-2] - q.shape[-2] - min(window, q_start)
    y = fn(q, k[..., lo:, :], v[..., lo:, :], window, backend, q_start=q_start, prefix=prefix)
    weight = torch.randn(y.shape, dtype=y.dtype, generator=torch.Generator().manual_seed(7))
    return (y, *torch.autograd.grad((y * weight).sum(), (q, k, v)))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n_prefix", [0, 3])
@pytest.mark.parametrize("n,window", [(3, 8), (7, 8), (8, 8), (9, 8), (37, 8), (64, 16), (65, 16), (50, 1),
                                      (23, 3), (100, 7)])
def test_fast_window_equals_the_padded_reference_in_values_and_gradients(backend, n_prefix, n, window):
    """n < w (one fused causal call), n = w, n one past w, n not a multiple of w; with and without a prefix."""
    q, k, v = qkv(n)
    fast = values_and_gradients(window_attention, q, k, v, window, backend, n_prefix=n_prefix)
    reference = values_and_gradients(window_attention_padded, q, k, v, window, backend, n_prefix=n_prefix)
    for got, want in zip(fast, reference, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("start", [1, 4, 7, 8, 9, 20])
def test_fast_window_continuing_a_stream_equals_the_padded_reference(backend, start):
    """Queries from stream position `start` on, with the cached past keys (fewer than w, exactly w) and a prefix."""
    window, n_prefix = 8, 3
    q, k, v = qkv(30, 30 + start)  # 30 queries at positions start..start + 29 over the whole stream
    fast = values_and_gradients(window_attention, q, k, v, window, backend, q_start=start, n_prefix=n_prefix)
    reference = values_and_gradients(window_attention_padded, q, k, v, window, backend, q_start=start,
                                     n_prefix=n_prefix)
    for got, want in zip(fast, reference, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    dense = window_attention_dense(q, k, v, window, q_start=start, n_prefix=n_prefix)
    torch.testing.assert_close(fast[0], dense, rtol=1e-12, atol=1e-12)


class OpNames(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


def test_fast_window_at_most_one_window_long_is_plain_causal_sdpa():
    """n <= w: sdpa with is_causal, no padding and no mask (on CPU: the fused flash kernel)."""
    q, k, v = qkv(36, d=16)
    q, k, v = (t.float() for t in (q, k, v))
    with OpNames() as ops:
        window_attention(q, k, v, 64, "sdpa", prefix=(k[..., :4, :], v[..., :4, :]))
    assert any("scaled_dot_product" in name for name in ops.names), ops.names
    unfused = ("aten.bmm", "aten._softmax", "aten.constant_pad_nd", "aten.masked_fill")
    assert not any(name.startswith(unfused) for name in ops.names), ops.names


@pytest.mark.parametrize("window", [2, 5, 16])
def test_window_prefix_stays_visible_and_is_not_counted_twice(window):
    q, k, v = qkv(41)
    prefix = (k[..., :4, :], v[..., :4, :])
    got = window_attention(q, k, v, window, "sdpa", prefix=prefix)
    torch.testing.assert_close(got, window_attention_dense(q, k, v, window, n_prefix=4), rtol=1e-12, atol=1e-12)


def test_window_with_cached_past_keys_matches_the_whole_stream():
    q, k, v = qkv(50)
    prefix = (k[..., :3, :], v[..., :3, :])
    whole = window_attention_dense(q, k, v, 6, n_prefix=3)
    part = window_attention(q[..., 30:, :], k[..., 24:, :], v[..., 24:, :], 6, "naive", q_start=30, prefix=prefix)
    torch.testing.assert_close(part, whole[..., 30:, :], rtol=1e-12, atol=1e-12)


def test_blockwise_window_never_builds_an_n_by_n_score_matrix(monkeypatch):
    seen = []
    real = masked_attention

    def spy(q, k, v, mask, backend):
        seen.append(k.shape[-2])
        return real(q, k, v, mask, backend)

    monkeypatch.setattr("models.attention.masked_attention", spy)
    q, k, v = qkv(512, d=4)
    window_attention(q, k, v, 16, "naive")
    assert seen and max(seen) <= 2 * 16


def test_mixer_rejects_bad_backend_and_window():
    with pytest.raises(ValueError, match="valid: naive, sdpa"):
        AttentionMixer(16, 2, backend="flash")
    with pytest.raises(ValueError, match="window"):
        AttentionMixer(16, 2, window=0)
    with pytest.raises(ValueError, match="divisible"):
        AttentionMixer(15, 2)
