"""The forecasting setup's parts (RevIN, patch tokens, channel independence, the heads) and the linear references
(DLinear, RLinear): each does what its paper says, shown on inputs where the answer is known."""

import pytest
import torch

import models
import tasks
from tasks.forecasters import DLinear, RevIN, RLinear, TimeLinear, moving_average, patch_count, patches


@pytest.mark.parametrize("affine", [False, True])
def test_revin_restores_what_it_removed_and_normalises_each_window_and_channel(affine):
    x = torch.randn(3, 50, 4) * torch.tensor([1.0, 10.0, 0.1, 3.0]) + torch.tensor([5.0, -2.0, 0.0, 100.0])
    revin = RevIN(4, affine)
    if affine:
        with torch.no_grad():
            revin.weight.copy_(torch.tensor([2.0, 0.5, 1.0, 3.0]))
            revin.bias.copy_(torch.tensor([1.0, 0.0, -1.0, 0.5]))
    z, stats = revin.normalise(x)
    torch.testing.assert_close(revin.restore(z, stats), x, atol=1e-4, rtol=1e-5)
    if not affine:
        torch.testing.assert_close(z.mean(1), torch.zeros(3, 4), atol=1e-5, rtol=0)
        torch.testing.assert_close(z.std(1, unbiased=False), torch.ones(3, 4), atol=1e-3, rtol=0)


def test_patches_cover_the_look_back_and_the_last_patch_ends_at_the_last_step():
    x = torch.arange(96.0)[None, :, None]
    p = patches(x, 16, 8)
    assert p.shape == (1, patch_count(96, 16, 8), 16) == (1, 11, 16)
    assert p[0, -1].tolist() == list(range(80, 96)) and p[0, 0].tolist() == list(range(16))
    odd = patches(torch.arange(20.0)[None, :, None], 16, 8)  # 20 steps: the start is padded with the first value
    assert odd.shape == (1, 2, 16) and odd[0, -1, -1] == 19 and odd[0, 0, 0] == 0
    assert torch.equal(patches(x, 1, 1), x)  # one token per step


def test_patches_keep_the_values_of_one_step_together():
    x = torch.arange(12.0).view(1, 6, 2)  # steps of 2 channels: (0, 1), (2, 3), ...
    assert patches(x, 3, 3)[0].tolist() == [[0, 1, 2, 3, 4, 5], [6, 7, 8, 9, 10, 11]]


def test_moving_average_keeps_a_straight_line_and_flattens_a_period_of_its_width():
    line = torch.arange(60.0)[None, :, None]
    torch.testing.assert_close(moving_average(line, 25)[:, 12:-12], line[:, 12:-12])
    wave = torch.sin(2 * torch.pi * torch.arange(100.0) / 25)[None, :, None]
    assert moving_average(wave, 25)[:, 12:-12].abs().max() < 1e-5


def test_time_linear_is_shared_by_the_channels_unless_individual():
    x = torch.randn(2, 10, 3)
    shared, individual = TimeLinear(10, 4, 3, individual=False), TimeLinear(10, 4, 3, individual=True)
    assert shared.weight.shape == (1, 4, 10) and individual.weight.shape == (3, 4, 10)
    same = x[:, :, :1].expand(-1, -1, 3)
    out = shared(same)
    torch.testing.assert_close(out[..., 0], out[..., 2])
    with torch.no_grad():
        individual.weight[2].mul_(2)
    out = individual(same)
    assert not torch.allclose(out[..., 0], out[..., 2])


def test_dlinear_and_rlinear_can_learn_a_linear_continuation():
    """A straight line continued: both references fit it from a few hundred steps (RLinear exactly by design:
    RevIN leaves a line's shape to one linear map)."""
    torch.manual_seed(0)
    t = torch.arange(30.0)
    for model in (DLinear(20, 10, 1), RLinear(20, 10, 1)):
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        for _ in range(300):
            slope, offset = torch.randn(16, 1, 1), torch.randn(16, 1, 1)
            series = slope * t[None, :, None] / 10 + offset
            loss = (model(series[:, :20]) - series[:, 20:]).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        assert loss.item() < 1e-2, type(model).__name__


@pytest.mark.parametrize("setup", [
    dict(channel_independent=True, patch_len=16, patch_stride=8, head="flatten"),
    dict(channel_independent=True, patch_len=1, patch_stride=1, head="last"),
    dict(channel_independent=False, patch_len=8, patch_stride=4, head="flatten"),
])
def test_forecast_network_maps_windows_to_horizons_in_every_setup(setup):
    task = tasks.build("timeseries", lookback=48, horizon=24, linear_references=False, **setup)
    net = task.build_network(models.build("transformer", d_model=16, n_layers=1, n_heads=2), 16)
    batch = task.train_batch(0, 3)
    assert net(batch.inputs)[0].shape == batch.targets.shape == (3, 24, 7)


def test_channel_independence_keeps_each_channel_forecast_to_its_own_series():
    task = tasks.build("timeseries", lookback=48, horizon=24, channel_independent=True, linear_references=False)
    net = task.build_network(models.build("transformer", d_model=16, n_layers=1, n_heads=2), 16).eval()
    x = task.train_batch(0, 2).inputs
    moved = x.clone()
    moved[:, :, 3] += torch.randn(2, 48)
    with torch.no_grad():
        a, b = net(x)[0], net(moved)[0]
    keep = [c for c in range(7) if c != 3]
    torch.testing.assert_close(a[..., keep], b[..., keep])
    assert not torch.allclose(a[..., 3], b[..., 3])


def test_revin_makes_the_forecast_follow_a_shift_of_the_window():
    task = tasks.build("timeseries", lookback=48, horizon=24, revin=True, linear_references=False)
    net = task.build_network(models.build("transformer", d_model=16, n_layers=1, n_heads=2), 16).eval()
    x = task.train_batch(0, 2).inputs
    with torch.no_grad():
        torch.testing.assert_close(net(x + 5.0)[0], net(x)[0] + 5.0, atol=1e-4, rtol=1e-5)


def test_patch_stride_longer_than_the_patch_is_refused():
    with pytest.raises(ValueError, match="patch_stride=16 must be <= patch_len=8"):
        tasks.build("timeseries", patch_len=8, patch_stride=16)
