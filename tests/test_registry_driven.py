"""A model and a task are one registry entry each, for the analysis too: a toy model (a new member of the memory
family) and a toy task with a grid axis, registered at runtime and nowhere else, run through the real runner
into a run folder and show up in the report, the plots and the claims ledger."""

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

import models
import tasks
from bench import metrics
from bench.cli import main
from models.base import Complexity, SequenceModel
from models.registry import ModelSpec
from tasks.base import SPLITS, TokenTask, accuracy_rows, answer_hits, generator, pack
from tasks.registry import TaskSpec


@dataclass(frozen=True)
class ToyConfig:
    d_model: int = 16


class ToyModel(SequenceModel):
    """A causal running mean, then a linear map: a bounded state (the sum and the count so far)."""

    def __init__(self, config: ToyConfig):
        super().__init__()
        self.config = config
        self.proj = nn.Linear(config.d_model, config.d_model)

    def forward(self, x: Tensor, state: Any = None) -> tuple[Tensor, Any]:
        total, count = state if state is not None else (x.new_zeros(x.shape[0], 1, x.shape[2]), 0)
        sums = total + x.cumsum(1)
        counts = count + torch.arange(1, x.shape[1] + 1, device=x.device).view(1, -1, 1)
        return self.proj(x + sums / counts), (sums[:, -1:], count + x.shape[1])

    @property
    def complexity(self) -> Complexity:
        return Complexity("n", "1")

    def state_numel(self, n: int) -> int:
        return self.config.d_model + 1


@dataclass(frozen=True)
class ToyTaskConfig:
    length: int = 6
    eval_lengths: tuple[int, ...] = (6, 12)
    depths: tuple[float, ...] = (0.0, 100.0)
    eval_samples: int = 8
    val_batches: int = 1
    data_seed: int = 0


SYMBOLS, QUERY, PAD = 6, 6, 7


class ToyTask(TokenTask):
    """Name the symbol at a depth of the sequence (training asks for the first one)."""

    name = "toy-recall"
    vocab = 8

    def __init__(self, config: ToyTaskConfig):
        self.config = config

    def example(self, gen: torch.Generator, length: int, depth: float) -> tuple[list[int], list[bool]]:
        body = torch.randint(0, SYMBOLS, (length,), generator=gen).tolist()
        return [*body, QUERY, body[round(depth / 100 * (length - 1))]], [False] * (length + 1) + [True]

    def batch(self, split: str, index: int, batch_size: int):
        gen = generator(self.config.data_seed, SPLITS[split], index)
        return pack([self.example(gen, self.config.length, 0.0) for _ in range(batch_size)], PAD)

    @torch.inference_mode()
    def evaluate(self, net: nn.Module, device: torch.device | str) -> list[dict[str, Any]]:
        c, rows = self.config, []
        for n in c.eval_lengths:
            for depth in c.depths:
                gen = generator(c.data_seed, SPLITS["test"], n, int(depth))
                batch = pack([self.example(gen, n, depth) for _ in range(c.eval_samples)], PAD).to(device)
                hits = answer_hits(net(batch.inputs)[0], batch.targets)
                rows += accuracy_rows(*hits, c.eval_samples, n=n, depth=depth, trained_length=c.length)
        return rows


SUITE = """
[model_config]
d_model = 16
[model_config.transformer]
n_layers = 1
n_heads = 2

[[train]]
task = "toy-recall"
models = ["transformer", "toy"]
train_config = { steps = 3, batch_size = 4, warmup = 1 }
"""


def test_a_model_and_a_task_registered_at_runtime_reach_report_plots_and_claims(tmp_path, monkeypatch):
    monkeypatch.setitem(models.MODELS, "toy", ModelSpec("toy", ToyModel, ToyConfig, "running mean", "memory"))
    monkeypatch.setitem(tasks.TASKS, "toy-recall", TaskSpec("toy-recall", ToyTask, ToyTaskConfig, "toy recall",
                                                            metrics.EXACT_MATCH, grid=("depth",)))
    suite, run = tmp_path / "toy.toml", tmp_path / "run"
    suite.write_text(SUITE)
    run.mkdir()
    (run / "results.csv").write_text("")
    assert main(["run", "--suite", str(suite), "--resume", str(run), "--threads", "1", "--device", "cpu"]) == 0

    text = (run / "report.md").read_text()
    assert "## toy-recall" in text  # the task's accuracy table
    assert "| toy | memory |" in text  # the model's row in the models table, with its family
    assert "| toy |" in text[text.index("## toy-recall"):]
    plots = {p.name for p in (run / "plots").glob("*.png")}
    assert {"recall_vs_length_toy-recall_toy-recall.png", "toy-recall_grid_depth_toy.png"} <= plots
    ledger = text[text.index("## Claims ledger"):]
    c9 = next(line for line in ledger.splitlines() if line.startswith("| C9 |"))
    assert "toy " in c9 and "vs transformer" in c9  # judged as a Titans-side model against attention
    assert "toy: " in next(line for line in ledger.splitlines() if line.startswith("| C11 |"))
