"""Multivariate long-horizon forecasting with the standard ETT protocol (Zhou et al. 2021; the
Time-Series-Library conventions):
- rows 0..8640 train, 8640..11520 val, 11520..14400 test (12/4/4 months of hourly rows); val and test
  windows start look-back rows earlier, so every test target row is forecast; every test window is kept;
- standardisation fitted on the train rows only; MSE and MAE in that normalised space.

Datasets: `etth1`, `etth2` (located and sha256-checked by tasks.data) and `synthetic`, embedded and seeded:
daily and weekly seasonality, a half-day harmonic, a slow trend and noise on 7 channels, same row count.

Model IO: point tokens (each time step's channel vector projected to d_model), the backbone, then a direct
multi-horizon head on the last token's output (the only position that has seen the whole look-back in a
causal model). Optional instance normalisation (each window's own mean and std, removed before the model
and restored after; on by default). The task also scores two reference forecasts on the same windows:
repeat-last-value and seasonal-naive (period 24).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import pandas as pd
import torch
from torch import Tensor, nn

from models.config import at_least, check
from tasks.base import Batch, Task, generator
from tasks.data import locate

DATASETS = ("synthetic", "etth1", "etth2")
TRAIN_END, VAL_END, TEST_END = 8640, 11520, 14400
PERIOD = 24


@dataclass(frozen=True)
class TimeseriesConfig:
    dataset: str = "synthetic"
    lookback: int = 96
    horizon: int = 96
    instance_norm: bool = True
    data_dir: str | None = None
    path: str | None = None  # explicit CSV path (beats the data folder and the cache)
    data_seed: int = 0
    eval_batch: int = 256

    def __post_init__(self):
        if self.dataset not in DATASETS:
            raise ValueError(f"unknown dataset {self.dataset!r}; valid: {', '.join(DATASETS)}")
        check(self, data_seed=at_least(0), eval_batch=at_least(1))
        if self.lookback < 1 or self.horizon < 1 or self.lookback + self.horizon > TRAIN_END:
            raise ValueError(f"need lookback, horizon >= 1 and lookback + horizon <= {TRAIN_END}, got "
                             f"{self.lookback}, {self.horizon}")


def synthetic_series(seed: int, rows: int = TEST_END, channels: int = 7) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    t = torch.arange(rows, dtype=torch.float64)[:, None]
    amp = torch.rand(4, channels, generator=gen, dtype=torch.float64) * torch.tensor([[2.0], [1.0], [0.5], [0.3]])
    phase = torch.rand(3, channels, generator=gen, dtype=torch.float64) * 2 * math.pi
    series = (amp[0] * torch.sin(2 * math.pi * t / 24 + phase[0]) + amp[1] * torch.sin(2 * math.pi * t / 168 + phase[1])
              + amp[2] * torch.sin(2 * math.pi * t / 12 + phase[2]) + amp[3] * t / rows
              + 0.3 * torch.randn(rows, channels, generator=gen, dtype=torch.float64))
    return series.float()


class ForecastNetwork(nn.Module):
    def __init__(self, backbone: nn.Module, d_model: int, channels: int, horizon: int, instance_norm: bool):
        super().__init__()
        self.embed = nn.Linear(channels, d_model)
        self.backbone = backbone
        self.head = nn.Linear(d_model, horizon * channels)
        self.horizon, self.channels, self.instance_norm = horizon, channels, instance_norm

    def forward(self, x: Tensor, state: Any = None) -> tuple[Tensor, Any]:
        """x: [B, L, C] -> forecast [B, H, C]."""
        if self.instance_norm:
            mean, std = x.mean(1, keepdim=True), x.std(1, keepdim=True).clamp_min(1e-5)
            x = (x - mean) / std
        y, state = self.backbone(self.embed(x), state)
        out = self.head(y[:, -1]).view(-1, self.horizon, self.channels)
        if self.instance_norm:
            out = out * std + mean
        return out, state


class TimeseriesTask(Task):
    name = "timeseries"
    headline = "test_mse"

    def __init__(self, config: TimeseriesConfig):
        self.config = config

    @cached_property
    def data(self) -> Tensor:
        """All rows, standardised with the train split's statistics: [rows, channels]."""
        c = self.config
        if c.dataset == "synthetic":
            raw = synthetic_series(c.data_seed)
        else:
            frame = pd.read_csv(locate(c.dataset, path=c.path, data_dir=c.data_dir))
            raw = torch.tensor(frame.drop(columns=["date"]).to_numpy(), dtype=torch.float32)[:TEST_END]
        train = raw[:TRAIN_END]
        return (raw - train.mean(0)) / train.std(0)

    def prepare(self) -> None:
        self.data  # noqa: B018  (load and verify the file now, so a missing one fails before training)

    def windows(self, split: str) -> range:
        """Start rows of every window whose targets fall in the split (look-back may reach into the one before)."""
        c = self.config
        lo, hi = {"train": (0, TRAIN_END), "val": (TRAIN_END - c.lookback, VAL_END),
                  "test": (VAL_END - c.lookback, TEST_END)}[split]
        return range(lo, hi - c.lookback - c.horizon + 1)

    def batch_at(self, starts: list[int]) -> Batch:
        c, data = self.config, self.data
        idx = torch.tensor(starts)[:, None]
        inputs = data[idx + torch.arange(c.lookback)]
        targets = data[idx + c.lookback + torch.arange(c.horizon)]
        return Batch(inputs, targets)

    def train_batch(self, step: int, batch_size: int) -> Batch:
        starts = self.windows("train")
        pick = torch.randint(0, len(starts), (batch_size,), generator=generator(self.config.data_seed, 0, step))
        return self.batch_at([starts[i] for i in pick.tolist()])

    @property
    def variant(self) -> str:
        return self.config.dataset

    def build_network(self, backbone: nn.Module, d_model: int) -> ForecastNetwork:
        c = self.config
        return ForecastNetwork(backbone, d_model, self.data.shape[1], c.horizon, c.instance_norm)

    def loss(self, outputs: Tensor, batch: Batch) -> Tensor:
        return (outputs - batch.targets).pow(2).mean()

    def tokens(self, batch: Batch) -> int:
        return batch.inputs.shape[0] * batch.inputs.shape[1]

    @staticmethod
    def references(inputs: Tensor, horizon: int) -> dict[str, Tensor]:
        """Reference forecasts from the look-back alone: [B, L, C] -> [B, H, C] each."""
        last = inputs[:, -1:].expand(-1, horizon, -1)
        period = min(PERIOD, inputs.shape[1])
        cycle = inputs[:, -period:]
        seasonal = cycle[:, torch.arange(horizon) % period]
        return {"repeat_last": last, "seasonal_naive": seasonal}

    @torch.inference_mode()
    def split_errors(self, net: nn.Module, device: torch.device | str, split: str) -> tuple[dict[str, Tensor], int]:
        """Summed squared and absolute errors over every window of a split, for the model and the references."""
        c = self.config
        net.eval()
        starts = list(self.windows(split))
        sums = {name: torch.zeros(2, dtype=torch.float64) for name in ("model", "repeat_last", "seasonal_naive")}
        for i in range(0, len(starts), c.eval_batch):
            batch = self.batch_at(starts[i : i + c.eval_batch])
            forecasts = {"model": net(batch.inputs.to(device))[0].cpu(), **self.references(batch.inputs, c.horizon)}
            for name, pred in forecasts.items():
                err = (pred - batch.targets).double()
                sums[name] += torch.stack([err.pow(2).sum(), err.abs().sum()])
        return sums, len(starts)

    def validate(self, net: nn.Module, device: torch.device | str) -> dict[str, float]:
        """Validation MSE over every window of the validation split (the checkpoint-selection loss)."""
        was_training = net.training
        sums, windows = self.split_errors(net, device, "val")
        net.train(was_training)
        return {"val_loss": float(sums["model"][0]) / (windows * self.config.horizon * self.data.shape[1])}

    def evaluate(self, net: nn.Module, device: torch.device | str) -> list[dict[str, Any]]:
        c = self.config
        rows = []
        for split in ("val", "test"):
            sums, windows = self.split_errors(net, device, split)
            count = windows * c.horizon * self.data.shape[1]
            for name, (sq, ab) in sums.items():
                suffix = "" if name == "model" else f"_{name}"  # e.g. test_mse, test_mse_seasonal_naive
                common = {"n": c.lookback, "horizon": c.horizon, "windows": windows,
                          "variant": c.dataset}
                rows.append({**common, "metric": f"{split}_mse{suffix}", "value": float(sq) / count})
                rows.append({**common, "metric": f"{split}_mae{suffix}", "value": float(ab) / count})
        return rows + self.example_rows(net, device)

    @torch.inference_mode()
    def example_rows(self, net: nn.Module, device: torch.device | str) -> list[dict[str, Any]]:
        """One test window of the last channel (OT for ETT) for the report's forecast plot; n is the offset in
        time from the forecast origin (negative: the look-back)."""
        c = self.config
        batch = self.batch_at([self.windows("test")[len(self.windows("test")) // 2]])
        forecast = net(batch.inputs.to(device))[0].cpu()[0, :, -1]
        series = {"example_input": (range(-c.lookback, 0), batch.inputs[0, :, -1]),
                  "example_target": (range(c.horizon), batch.targets[0, :, -1]),
                  "example_forecast": (range(c.horizon), forecast)}
        return [{"n": offset, "metric": metric, "value": float(v), "variant": c.dataset}
                for metric, (offsets, values) in series.items() for offset, v in zip(offsets, values, strict=True)]
