"""The forecasting setup's building blocks and the learned reference forecasters, written from the papers:

- RevIN (Kim et al., ICLR 2022): each window's per-channel mean and standard deviation (biased, plus eps under
  the root) removed from the input and put back on the output, with an optional learned per-channel affine map
  in between (undone on the output as well).
- Patch tokens (PatchTST, Nie et al., ICLR 2023): a series cut into patches of `patch_len` steps every `stride`
  steps. Ours pad at the start (repeating the first value) so that the last patch ends at the last observed
  step: a causal model's last token then has seen the whole look-back. PatchTST pads at the end instead.
- DLinear (Zeng et al., AAAI 2023): a moving average of width 25 (the series padded at both ends by repeating its
  first and last values) is the trend, the rest is the seasonal part, and one linear map over time per part
  gives the forecast; the maps are shared by the channels (`individual=False`, the Time-Series-Library default
  behind the published ETTh1 rows) or one per channel.
- RLinear (Li et al. 2023, "Revisiting long-term time series forecasting"): RevIN with its affine map around
  one linear map over time shared by the channels.

Both linear references are fitted the way the published rows were produced (Time-Series-Library's defaults:
Adam, batch 32, MSE, at most 10 epochs, the learning rate kept for two epochs then halved after each (the
library's `type1` schedule), validation MSE after every epoch, stop after 3 epochs without a new best and keep the
best): `LinearRecipe`. DLinear's learning rate is the library's 1e-4, the one behind its published row; RLinear's
is 1e-3 (docs/forecasting.md)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.config import above, at_least, check

EPS = 1e-5


class RevIN(nn.Module):
    """Reversible instance normalisation over the time axis of [B, L, C] windows."""

    def __init__(self, channels: int, affine: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels)) if affine else None
        self.bias = nn.Parameter(torch.zeros(channels)) if affine else None

    def normalise(self, x: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """x [B, L, C] -> (normalised x, the window statistics that `restore` needs)."""
        mean = x.mean(1, keepdim=True)
        std = torch.sqrt(x.var(1, keepdim=True, unbiased=False) + EPS)
        z = (x - mean) / std
        if self.weight is not None:
            z = z * self.weight + self.bias
        return z, (mean, std)

    def restore(self, y: Tensor, stats: tuple[Tensor, Tensor]) -> Tensor:
        """y [B, H, C] in normalised units -> the series' own units."""
        mean, std = stats
        if self.weight is not None:
            y = (y - self.bias) / (self.weight + EPS * EPS)
        return y * std + mean


def patch_count(length: int, patch_len: int, stride: int) -> int:
    return (max(length, patch_len) - patch_len + stride - 1) // stride + 1


def patches(x: Tensor, patch_len: int, stride: int) -> Tensor:
    """[S, L, W] -> [S, P, patch_len * W]: patches of `patch_len` steps every `stride` steps, the last one ending
    at the last step (the start padded with the first value as needed). Each patch is time-major: step by step,
    the W values of a step together. patch_len = stride = 1 gives one token per step."""
    length = x.shape[1]
    pad = (patch_count(length, patch_len, stride) - 1) * stride + patch_len - length
    if pad:
        x = torch.cat([x[:, :1].expand(-1, pad, -1), x], dim=1)
    return x.unfold(1, patch_len, stride).transpose(2, 3).flatten(2)


def moving_average(x: Tensor, kernel: int) -> Tensor:
    """DLinear's trend of [B, L, C]: a centred moving average over time, both ends padded by repetition."""
    front, back = (kernel - 1) // 2, kernel // 2
    padded = torch.cat([x[:, :1].expand(-1, front, -1), x, x[:, -1:].expand(-1, back, -1)], dim=1)
    return F.avg_pool1d(padded.transpose(1, 2), kernel, stride=1).transpose(1, 2)


class TimeLinear(nn.Module):
    """One linear map over time, [B, L, C] -> [B, H, C]: shared by the channels, or one per channel. Weights
    start at 1 / L (the DLinear code's initialisation), biases at nn.Linear's default."""

    def __init__(self, lookback: int, horizon: int, channels: int, individual: bool):
        super().__init__()
        maps = channels if individual else 1
        bound = lookback**-0.5
        self.weight = nn.Parameter(torch.full((maps, horizon, lookback), 1 / lookback))
        self.bias = nn.Parameter(torch.empty(maps, horizon).uniform_(-bound, bound))

    def forward(self, x: Tensor) -> Tensor:
        return torch.einsum("bLc,cHL->bHc", x, self.weight.expand(x.shape[2], -1, -1)) + self.bias.T


class DLinear(nn.Module):
    def __init__(self, lookback: int, horizon: int, channels: int, kernel: int = 25, individual: bool = False):
        super().__init__()
        self.kernel = kernel
        self.seasonal = TimeLinear(lookback, horizon, channels, individual)
        self.trend = TimeLinear(lookback, horizon, channels, individual)

    def forward(self, x: Tensor) -> Tensor:
        trend = moving_average(x, self.kernel)
        return self.seasonal(x - trend) + self.trend(trend)


class RLinear(nn.Module):
    def __init__(self, lookback: int, horizon: int, channels: int):
        super().__init__()
        self.revin = RevIN(channels, affine=True)
        self.linear = TimeLinear(lookback, horizon, channels, individual=False)

    def forward(self, x: Tensor) -> Tensor:
        z, stats = self.revin.normalise(x)
        return self.revin.restore(self.linear(z), stats)


@dataclass(frozen=True)
class LinearRecipe:
    """How a linear reference is fitted (Time-Series-Library's defaults; see the module docstring)."""

    lr: float
    batch_size: int = 32
    epochs: int = 10
    patience: int = 3

    def __post_init__(self):
        check(self, lr=above(0), batch_size=at_least(1), epochs=at_least(1), patience=at_least(1))


REFERENCES: dict[str, tuple[type[nn.Module], LinearRecipe]] = {
    "dlinear": (DLinear, LinearRecipe(lr=1e-4)),
    "rlinear": (RLinear, LinearRecipe(lr=1e-3)),
}
