"""The training loop: AdamW, linear warm-up then cosine decay, gradient clipping, seeded init, tqdm
progress with loss and tokens/s.

A run ends as `diverged` (recorded, never raised) when the loss is not finite, or when it explodes while staying
finite: from step EXPLOSION_AFTER on, its exponential moving average (weight EXPLOSION_EMA on the newest
loss) exceeds `diverge_factor` (default 10) times the first loss, the untrained network's. A healthy run's
loss falls below that start, and noise or a warm-up spike moves a smoothed loss by a few times at most; a loss
ten times its start has lost the signal (a Transformer at lr 10 on copy: 3.6 -> 2000 within 5 steps).
`diverge_factor = 0` turns the rule off; it applies only where the first loss is positive (cross-entropy,
MSE).

The learning curve is kept: the training loss of every step (the result holds it; the runner stores a thinned
copy) and, every `val_every` steps, the task's validation metrics (loss and answer accuracy on the training
distribution's held-out stream). With `val_every`, the weights of the lowest validation loss are restored at the
end, as the published code bases do with early stopping; with `patience` as well, the run stops once that many
validations in a row have not lowered the best validation loss (the Time-Series-Library rule, counted in
validations rather than epochs). `steps` is then the budget, `train_steps` in the results what was used."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from bench.metrics import TRAIN_LOSS, VAL_LOSS
from models.config import Rule, above, at_least, check, require
from tasks.base import Task, TaskNetwork

EXPLOSION_AFTER, EXPLOSION_EMA = 20, 0.1


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 2500
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 0.01
    warmup: int = 100
    grad_clip: float = 1.0
    time_budget_s: float | None = None  # stop early (status "ok", fewer steps) when exceeded
    val_every: int = 0  # > 0: every so many steps score the task's validation loss; keep the best weights
    patience: int = 0  # > 0 (needs val_every): stop after this many validations without a new best; 0: run all steps
    diverge_factor: float = 10.0  # a smoothed loss this many times its start ends the run as diverged; 0: off

    def __post_init__(self):
        check(self, steps=at_least(1), batch_size=at_least(1), lr=above(0), weight_decay=at_least(0),
              warmup=at_least(0), grad_clip=above(0), time_budget_s=above(0), val_every=at_least(0),
              diverge_factor=Rule(lambda v: v == 0 or v > 1, "0 (off) or > 1"), patience=at_least(0))
        require(self.patience == 0 or self.val_every > 0,
                f"patience={self.patience} needs val_every > 0 (it counts validations), got val_every={self.val_every}")


@dataclass
class TrainResult:
    status: str  # "ok" or "diverged"
    steps: int
    final_loss: float
    best_val: float | None
    wall_s: float
    tokens_per_s: float
    losses: list[float] = field(default_factory=list)
    validation: list[dict[str, float]] = field(default_factory=list)  # {"step", "val_loss", "val_accuracy"?}
    final_validation: dict[str, float] = field(default_factory=dict)  # of the weights the run ends with

    def curve(self, points: int = 200) -> dict[str, list[float]]:
        """The learning curve thinned to about `points` training-loss points (means over equal spans of steps, at
        the span's middle step), plus every validation point (val_step, val_loss, val_accuracy)."""
        span = max(1, len(self.losses) // points)
        steps = list(range(0, len(self.losses), span))
        keys = dict.fromkeys(k for v in self.validation for k in v if k != "step")
        return {"step": [s + span / 2 - 0.5 for s in steps],
                TRAIN_LOSS: [sum(self.losses[s : s + span]) / len(self.losses[s : s + span]) for s in steps],
                "val_step": [v["step"] for v in self.validation],
                **{key: [v.get(key, float("nan")) for v in self.validation] for key in keys}}


@dataclass
class ExplosionWatch:
    """The finite-explosion rule of the module docstring, fed one loss per step."""

    factor: float
    seen: int = 0
    start: float = 0.0  # the first loss, before any update
    smoothed: float = 0.0

    def exploded(self, loss: float) -> bool:
        self.seen += 1
        if self.seen == 1:
            self.start = self.smoothed = loss
        self.smoothed = (1 - EXPLOSION_EMA) * self.smoothed + EXPLOSION_EMA * loss
        return (self.factor > 0 and self.seen >= EXPLOSION_AFTER and self.start > 0
                and self.smoothed > self.factor * self.start)


def lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def train(
    net: TaskNetwork,
    task: Task,
    cfg: TrainConfig,
    device: torch.device | str = "cpu",
    desc: str = "train",
    progress: bool = True,
) -> TrainResult:
    net.to(device).train()
    decay = [p for p in net.parameters() if p.dim() >= 2]
    no_decay = [p for p in net.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
    )
    losses: list[float] = []
    validation: list[dict[str, float]] = []
    tokens, start, status, step = 0, time.perf_counter(), "ok", 0
    best_val, best_state, stale = None, None, 0
    watch = ExplosionWatch(cfg.diverge_factor)
    bar = tqdm(range(cfg.steps), desc=desc, disable=not progress, leave=False, dynamic_ncols=True)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        batch = task.train_batch(step, cfg.batch_size).to(device)
        loss = task.loss(net(batch.inputs)[0], batch)
        losses.append(loss.item())
        if not math.isfinite(losses[-1]) or watch.exploded(losses[-1]):
            status = "diverged"
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip)
        opt.step()
        tokens += task.tokens(batch)
        elapsed = time.perf_counter() - start
        if step % 10 == 0:
            bar.set_postfix(loss=f"{losses[-1]:.4f}", tok_s=f"{tokens / max(elapsed, 1e-9):,.0f}")
        if cfg.val_every and (step + 1) % cfg.val_every == 0:
            scores = task.validate(net, device)
            validation.append({"step": step + 1, **scores})
            val = scores.get(VAL_LOSS)
            if val is not None and (best_val is None or val < best_val):
                best_val, best_state, stale = val, {k: v.detach().clone() for k, v in net.state_dict().items()}, 0
            elif val is not None:
                stale += 1
            if cfg.patience and stale >= cfg.patience:
                break
        if cfg.time_budget_s is not None and elapsed > cfg.time_budget_s:
            break
    bar.close()
    if best_state is not None and status == "ok":
        net.load_state_dict(best_state)
    wall = time.perf_counter() - start
    final_validation = task.validate(net, device) if status == "ok" else {}
    net.eval()
    final = losses[-1] if losses else float("nan")
    return TrainResult(status, len(losses), final, best_val, wall, tokens / wall, losses, validation, final_validation)
