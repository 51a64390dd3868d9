import math

import pytest
import torch

import models
import tasks
from bench.measuring.train import EXPLOSION_AFTER, ExplosionWatch, TrainConfig, lr_at, train
from models.config import ConfigError


def test_training_reduces_copy_loss():
    torch.manual_seed(0)
    task = tasks.build("copy", train_max_len=6)
    net = task.build_network(models.build("transformer"), 64)
    result = train(net, task, TrainConfig(steps=80, batch_size=16, warmup=10), progress=False)
    assert result.status == "ok" and result.steps == 80
    assert sum(result.losses[-10:]) / 10 < 0.8 * sum(result.losses[:5]) / 5


def test_non_finite_loss_is_recorded_as_diverged_not_raised():
    task = tasks.build("copy", train_max_len=4)

    class Poisoned(type(task)):
        def loss(self, outputs, batch):
            return super().loss(outputs, batch) * float("nan")

    poisoned = Poisoned(task.config)
    net = poisoned.build_network(models.build("swa"), 64)
    result = train(net, poisoned, TrainConfig(steps=20, batch_size=4, warmup=2), progress=False)
    assert result.status == "diverged" and result.steps == 1 and math.isnan(result.final_loss)


def test_schedule_warms_up_then_decays_to_zero():
    cfg = TrainConfig(steps=100, lr=1.0, warmup=10)
    assert lr_at(0, cfg) == 0.1 and lr_at(9, cfg) == 1.0
    assert lr_at(55, cfg) < lr_at(20, cfg) and lr_at(99, cfg) < 0.01


def losses_through(watch: ExplosionWatch, losses) -> int | None:
    """The 1-based step at which the watch calls an explosion, or None."""
    return next((i for i, loss in enumerate(losses, 1) if watch.exploded(loss)), None)


def test_explosion_rule_reaches_both_verdicts():
    falling = [3.6 * 0.99**i for i in range(200)]
    spiky = [3.6] * 30 + [25.0] * 3 + [3.0] * 100  # a short spike: the smoothed loss stays under 10x
    growing = [3.6 * 1.2**i for i in range(200)]
    assert losses_through(ExplosionWatch(10.0), falling) is None
    assert losses_through(ExplosionWatch(10.0), spiky) is None
    step = losses_through(ExplosionWatch(10.0), growing)
    assert step is not None and step >= EXPLOSION_AFTER
    assert losses_through(ExplosionWatch(10.0), [3.6] + [200.0] * 50) == EXPLOSION_AFTER  # not before
    assert losses_through(ExplosionWatch(0.0), growing) is None  # the rule turned off
    assert losses_through(ExplosionWatch(10.0), [0.0] + [5.0] * 50) is None  # no positive start to compare with


def test_a_finite_explosion_is_recorded_as_diverged():
    torch.manual_seed(0)
    task = tasks.build("copy", train_max_len=8)
    net = task.build_network(models.build("transformer"), 64)
    result = train(net, task, TrainConfig(steps=60, batch_size=8, warmup=5, lr=10.0), progress=False)
    assert result.status == "diverged" and all(math.isfinite(v) for v in result.losses)
    assert result.steps < 60 and result.final_loss > 10 * result.losses[0]


def test_early_stopping_ends_after_patience_stale_validations_and_restores_the_best_weights():
    """Validation scores scripted to improve twice then worsen: with patience 3 the run stops at the fifth
    validation (step 10 of 100) and ends on the weights of the second (step 4)."""
    task = tasks.build("copy", train_max_len=4)
    scripted = iter([5.0, 4.0, 4.5, 6.0, 7.0, 8.0, 9.0])
    seen = {}

    class Scripted(type(task)):
        def validate(self, net, device):
            seen[len(seen)] = {k: v.clone() for k, v in net.state_dict().items()}
            return {"val_loss": next(scripted)}

    t = Scripted(task.config)
    net = t.build_network(models.build("transformer", d_model=16, n_layers=1, n_heads=2), 16)
    result = train(net, t, TrainConfig(steps=100, batch_size=4, warmup=1, val_every=2, patience=3), progress=False)
    assert result.steps == 10 and result.best_val == 4.0 and [v["step"] for v in result.validation] == [2, 4, 6, 8, 10]
    for key, value in net.state_dict().items():
        torch.testing.assert_close(value, seen[1][key])


def test_patience_without_validation_is_refused():
    with pytest.raises(ConfigError, match="patience=3 needs val_every > 0"):
        TrainConfig(patience=3)
