"""Multivariate long-horizon forecasting with the standard ETT protocol (Zhou et al. 2021; the
Time-Series-Library conventions):
- rows 0..8640 train, 8640..11520 val, 11520..14400 test (12/4/4 months of hourly rows); val and test
  windows start look-back rows earlier, so every test target row is forecast; every test window is kept;
- standardisation fitted on the train rows only; MSE and MAE in that normalised space.

Datasets: `etth1`, `etth2` (located and sha256-checked by tasks.data) and `synthetic`, embedded and seeded:
daily and weekly seasonality, a half-day harmonic, a slow trend and noise on 7 channels, same row count.

Model IO, the field's setup as options (tasks/forecasters.py; the defaults are the published models' setup, kept
because each alternative measured scored a higher validation MSE: docs/forecasting.md): RevIN (`revin`,
`revin_affine`), channel independence (`channel_independent`: each variable its own series through the shared
backbone, as in PatchTST), patch tokens (`patch_len`, `patch_stride`; 1 and 1 give one token per time step) and a
direct multi-horizon head, a linear map from the last token's output (`head = "last"`: the only position that has
seen the whole look-back in a causal model) or from all of them flattened (`"flatten"`, PatchTST's head).

References scored on the same windows (`test_mse_<name>` beside `test_mse`): repeat-last-value, seasonal-naive
(period 24), and two learned linear maps fitted on the train split by the published recipe with early stopping on
the validation split, DLinear and RLinear (a linear map on RevIN). They are fitted once per process and data
setting, seeded, so every cell of a run reports the same reference numbers.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import pandas as pd
import torch
from torch import Tensor, nn

from bench.metrics import VAL_LOSS, example, forecast_error
from models.config import at_least, check, one_of, require
from tasks.base import SPLITS, Batch, Task, generator
from tasks.data import locate
from tasks.forecasters import REFERENCES, RevIN, patch_count, patches

DATASETS = ("synthetic", "etth1", "etth2")
HEADS = ("last", "flatten")
TRAIN_END, VAL_END, TEST_END = 8640, 11520, 14400
PERIOD = 24


@dataclass(frozen=True)
class TimeseriesConfig:
    dataset: str = "synthetic"
    lookback: int = 96
    horizon: int = 96
    revin: bool = True
    revin_affine: bool = False
    channel_independent: bool = True
    patch_len: int = 16
    patch_stride: int = 8
    head: str = "flatten"
    linear_references: bool = True  # fit DLinear and RLinear for the evaluation (seconds per data setting)
    data_dir: str | None = None
    path: str | None = None  # explicit CSV path (beats the data folder and the cache)
    data_seed: int = 0
    eval_batch: int = 256

    def __post_init__(self):
        if self.dataset not in DATASETS:
            raise ValueError(f"unknown dataset {self.dataset!r}; valid: {', '.join(DATASETS)}")
        check(self, data_seed=at_least(0), eval_batch=at_least(1), patch_len=at_least(1), patch_stride=at_least(1),
              head=one_of(*HEADS))
        if self.lookback < 1 or self.horizon < 1 or self.lookback + self.horizon > TRAIN_END:
            raise ValueError(f"need lookback, horizon >= 1 and lookback + horizon <= {TRAIN_END}, got "
                             f"{self.lookback}, {self.horizon}")
        require(self.patch_stride <= self.patch_len,
                f"patch_stride={self.patch_stride} must be <= patch_len={self.patch_len} (no step left out)")


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
    """[B, L, C] windows -> [B, H, C] forecasts: RevIN, series (the window, or each channel alone), patch tokens,
    the backbone, the head, RevIN undone."""

    def __init__(self, backbone: nn.Module, d_model: int, channels: int, config: TimeseriesConfig):
        super().__init__()
        c = self.config = config
        width = 1 if c.channel_independent else channels  # values per time step in one series
        self.revin = RevIN(channels, c.revin_affine) if c.revin else None
        self.embed = nn.Linear(c.patch_len * width, d_model)
        self.backbone = backbone
        tokens = patch_count(c.lookback, c.patch_len, c.patch_stride) if c.head == "flatten" else 1
        self.head = nn.Linear(tokens * d_model, c.horizon * width)

    def forward(self, x: Tensor, state: Any = None) -> tuple[Tensor, Any]:
        c = self.config
        batch, length, channels = x.shape
        if self.revin is not None:
            x, stats = self.revin.normalise(x)
        series = x.transpose(1, 2).reshape(batch * channels, length, 1) if c.channel_independent else x
        y, state = self.backbone(self.embed(patches(series, c.patch_len, c.patch_stride)), state)
        out = self.head(y.flatten(1) if c.head == "flatten" else y[:, -1])
        out = out.view(batch, channels, c.horizon).transpose(1, 2) if c.channel_independent else \
            out.view(batch, c.horizon, channels)
        if self.revin is not None:
            out = self.revin.restore(out, stats)
        return out, state


Forecaster = Callable[[Tensor], Tensor]  # [B, L, C] look-back windows (CPU) -> [B, H, C] forecasts (CPU)
_FITTED: dict[tuple, dict[str, tuple[nn.Module, dict[str, Any]]]] = {}  # per data setting, for the process


class TimeseriesTask(Task):
    name = "timeseries"

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
        """Dataset, look-back and horizon: results of different settings are never pooled, and one model at two
        look-backs is two settings, not two recipes of one (the look-back is also the rows' length n)."""
        return f"{self.config.dataset}-l{self.config.lookback}-h{self.config.horizon}"

    def build_network(self, backbone: nn.Module, d_model: int) -> ForecastNetwork:
        return ForecastNetwork(backbone, d_model, self.data.shape[1], self.config)

    def loss(self, outputs: Tensor, batch: Batch) -> Tensor:
        return (outputs - batch.targets).pow(2).mean()

    def tokens(self, batch: Batch) -> int:
        """Tokens through the backbone: series per window times patches per series."""
        c = self.config
        series = batch.inputs.shape[0] * (batch.inputs.shape[2] if c.channel_independent else 1)
        return series * patch_count(c.lookback, c.patch_len, c.patch_stride)

    @staticmethod
    def references(inputs: Tensor, horizon: int) -> dict[str, Tensor]:
        """Reference forecasts from the look-back alone: [B, L, C] -> [B, H, C] each."""
        last = inputs[:, -1:].expand(-1, horizon, -1)
        period = min(PERIOD, inputs.shape[1])
        cycle = inputs[:, -period:]
        seasonal = cycle[:, torch.arange(horizon) % period]
        return {"repeat_last": last, "seasonal_naive": seasonal}

    @torch.inference_mode()
    def split_errors(self, forecasters: dict[str, Forecaster], split: str) -> tuple[dict[str, Tensor], int]:
        """Summed squared and absolute errors of each forecaster over every window of a split."""
        c = self.config
        starts = list(self.windows(split))
        sums = {name: torch.zeros(2, dtype=torch.float64) for name in forecasters}
        for i in range(0, len(starts), c.eval_batch):
            batch = self.batch_at(starts[i : i + c.eval_batch])
            for name, forecast in forecasters.items():
                err = (forecast(batch.inputs) - batch.targets).double()
                sums[name] += torch.stack([err.pow(2).sum(), err.abs().sum()])
        return sums, len(starts)

    def split_mse(self, forecast: Forecaster, split: str) -> float:
        sums, windows = self.split_errors({"f": forecast}, split)
        return float(sums["f"][0]) / (windows * self.config.horizon * self.data.shape[1])

    @staticmethod
    def model_forecaster(net: nn.Module, device: torch.device | str) -> Forecaster:
        return lambda inputs: net(inputs.to(device))[0].cpu()

    def validate(self, net: nn.Module, device: torch.device | str) -> dict[str, float]:
        """Validation MSE over every window of the validation split (the checkpoint-selection loss)."""
        was_training = net.training
        net.eval()
        loss = self.split_mse(self.model_forecaster(net, device), "val")
        net.train(was_training)
        return {VAL_LOSS: loss}

    def fit_reference(self, name: str) -> tuple[nn.Module, dict[str, Any]]:
        """A learned reference fitted on the train split by its recipe: the epoch of the lowest validation MSE is
        kept. Deterministic for a data setting (seeded initialisation and batch order; the global RNG is left as
        it was). Returns the module and what its fit did (epochs run, best epoch, learning rate)."""
        c = self.config
        cls, recipe = REFERENCES[name]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(c.data_seed)
            module = cls(c.lookback, c.horizon, self.data.shape[1])
        opt = torch.optim.Adam(module.parameters(), lr=recipe.lr)
        starts = torch.tensor(self.windows("train"))
        best, best_epoch, best_state, epoch = math.inf, 0, None, 0
        for epoch in range(1, recipe.epochs + 1):
            for group in opt.param_groups:
                group["lr"] = recipe.lr * 0.5 ** max(0, epoch - 2)  # the library halves it from the third
            order = starts[torch.randperm(len(starts), generator=generator(c.data_seed, SPLITS["train"], epoch))]
            for i in range(0, len(order) - recipe.batch_size + 1, recipe.batch_size):
                batch = self.batch_at(order[i : i + recipe.batch_size].tolist())
                loss = self.loss(module(batch.inputs), batch)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            val = self.split_mse(module, "val")
            if val < best:
                best, best_epoch, best_state = val, epoch, {k: v.clone() for k, v in module.state_dict().items()}
            elif epoch - best_epoch >= recipe.patience:
                break
        module.load_state_dict(best_state)
        module.eval()
        return module, {"epochs": epoch, "best_epoch": best_epoch, "lr": recipe.lr, "batch_size": recipe.batch_size}

    def fitted_references(self) -> dict[str, tuple[nn.Module, dict[str, Any]]]:
        """The learned references of this data setting, fitted once per process (empty with linear_references
        off)."""
        c = self.config
        if not c.linear_references:
            return {}
        key = (c.dataset, c.data_seed, c.lookback, c.horizon, tuple(REFERENCES.values()))
        if key not in _FITTED:
            _FITTED[key] = {name: self.fit_reference(name) for name in REFERENCES}
        return _FITTED[key]

    def forecasters(self, net: nn.Module, device: torch.device | str) -> tuple[dict[str, Forecaster], dict[str, dict]]:
        """The model and every reference, by name ("model" first), and what each learned reference's fit did."""
        fitted = self.fitted_references()
        naive = {name: (lambda inputs, name=name: self.references(inputs, self.config.horizon)[name])
                 for name in ("repeat_last", "seasonal_naive")}
        return ({"model": self.model_forecaster(net, device), **{name: m for name, (m, _) in fitted.items()}, **naive},
                {name: info for name, (_, info) in fitted.items()})

    def evaluate(self, net: nn.Module, device: torch.device | str) -> list[dict[str, Any]]:
        c = self.config
        net.eval()
        forecasters, fits = self.forecasters(net, device)
        common = {"n": c.lookback, "variant": self.variant, "dataset": c.dataset, "horizon": c.horizon,
                  "train_windows": len(self.windows("train"))}
        rows = []
        for split in ("val", "test"):
            sums, windows = self.split_errors(forecasters, split)
            count = windows * c.horizon * self.data.shape[1]
            for name, (sq, ab) in sums.items():
                reference = None if name == "model" else name  # e.g. test_mse, test_mse_dlinear
                extra = {**common, "windows": windows, **({"fit": fits[name]} if name in fits else {})}
                rows.append({**extra, "metric": forecast_error(split, "mse", reference), "value": float(sq) / count})
                rows.append({**extra, "metric": forecast_error(split, "mae", reference), "value": float(ab) / count})
        return rows + self.example_rows(forecasters)

    @torch.inference_mode()
    def example_rows(self, forecasters: dict[str, Forecaster]) -> list[dict[str, Any]]:
        """One test window of the last channel (OT for ETT) for the report's forecast plot: the look-back, the
        target and each forecaster's forecast (`example_forecast` for the model, `example_forecast_<reference>`);
        n is the offset in time from the forecast origin (negative: the look-back)."""
        c = self.config
        test = self.windows("test")
        batch = self.batch_at([test[len(test) // 2]])
        series = {example("input"): (range(-c.lookback, 0), batch.inputs[0, :, -1]),
                  example("target"): (range(c.horizon), batch.targets[0, :, -1])}
        for name, forecast in forecasters.items():
            series[example("forecast", None if name == "model" else name)] = (range(c.horizon),
                                                                              forecast(batch.inputs)[0, :, -1])
        common = {"variant": self.variant, "dataset": c.dataset, "horizon": c.horizon, "lookback": c.lookback}
        return [{**common, "n": offset, "metric": metric, "value": float(v)}
                for metric, (offsets, values) in series.items() for offset, v in zip(offsets, values, strict=True)]
