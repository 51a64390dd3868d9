"""Contract tests, parametrised over the registry: every model registered later is covered."""

import pytest
import torch

import models

N, D = 150, 64  # longer than every default window / segment / chunk, not a multiple of any


def build64(name):
    return models.build(name).double().eval()


@pytest.mark.parametrize("name", models.names())
def test_model_is_causal_perturbing_the_future_leaves_the_past_unchanged(name):
    model = build64(name)
    x = torch.randn(2, N, D, dtype=torch.float64)
    for t in (0, 37, N - 2):
        x2 = x.clone()
        x2[:, t + 1 :] += torch.randn_like(x2[:, t + 1 :])
        with torch.no_grad():
            y1, y2 = model(x)[0], model(x2)[0]
        torch.testing.assert_close(y1[:, : t + 1], y2[:, : t + 1], rtol=1e-10, atol=1e-10)
        assert (y1[:, t + 1 :] - y2[:, t + 1 :]).abs().max() > 1e-6, "the future must reach the output"


@pytest.mark.parametrize("name", models.names())
def test_streaming_in_pieces_equals_one_call(name):
    model = build64(name)
    x = torch.randn(2, N, D, dtype=torch.float64)
    with torch.no_grad():
        whole, _ = model(x)
        cuts = [0, 1, 2, 9, 40, 41, 107, N]
        state, pieces = None, []
        for a, b in zip(cuts, cuts[1:], strict=False):
            y, state = model(x[:, a:b], state)
            pieces.append(y)
    torch.testing.assert_close(torch.cat(pieces, 1), whole, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", models.names())
def test_model_declares_complexity_params_and_state(name):
    model = models.build(name)
    assert model.num_params() > 0
    assert model.state_numel(1024) > 0
    assert model.complexity.time in ("1", "log n", "n", "n log n", "n^2")
    if model.streams:
        assert model.state_numel(1 << 21) == model.state_numel(1 << 11)


def test_default_configs_share_width_depth_and_mlp():
    configs = [models.build(n).config for n in models.names()]
    assert len({(c.d_model, c.n_layers, c.mlp_ratio) for c in configs}) == 1


def test_unknown_model_names_the_valid_ones():
    with pytest.raises(KeyError, match="valid models: transformer"):
        models.build("gpt5")


def test_unknown_model_option_names_the_valid_ones():
    with pytest.raises(ValueError, match="valid: .*d_model"):
        models.build("transformer", width=3)


def test_kv_cache_grows_with_the_stream_but_the_window_cache_does_not():
    full, swa = models.build("transformer"), models.build("swa")
    assert full.state_numel(4096) == 4 * full.state_numel(1024)
    assert not full.streams and swa.streams


def test_naive_and_sdpa_transformers_give_equal_outputs():
    torch.manual_seed(1)
    naive = models.build("transformer", attention="naive").double()
    sdpa = models.build("transformer", attention="sdpa").double()
    sdpa.load_state_dict(naive.state_dict())
    x = torch.randn(2, 70, 64, dtype=torch.float64)
    torch.testing.assert_close(naive(x)[0], sdpa(x)[0], rtol=1e-10, atol=1e-10)
