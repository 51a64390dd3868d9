import math

import torch

import models
import tasks
from bench.train import TrainConfig, lr_at, train


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
