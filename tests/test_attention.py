import pytest
import torch

from models.attention import (
    BACKENDS,
    AttentionMixer,
    causal_attention,
    masked_attention,
    window_attention,
    window_attention_dense,
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


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("window", [1, 3, 8, 50, 200])
@pytest.mark.parametrize("n", [1, 37, 64])
def test_blockwise_window_equals_dense_masked_reference(backend, window, n):
    q, k, v = qkv(n)
    torch.testing.assert_close(window_attention(q, k, v, window, backend), window_attention_dense(q, k, v, window),
                               rtol=1e-12, atol=1e-12)


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
