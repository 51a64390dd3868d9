"""Time, memory and FLOP profiles of a model against sequence length n (the streaming profile: streaming.py).

- time: forward in inference mode, and forward + backward; warm-up excluded, median of repeats with the
  quartiles as spread, and every repeat kept (`samples`: the exponent's bootstrap resamples them); CUDA
  synchronised on GPU.
- memory: peak memory of one step, each point in a fresh process (`bench.measuring.isolated`). CPU: peak RSS above
  a baseline taken after the model and input are built (the kernel's high-water mark is reset first);
  GPU: max_memory_allocated above the allocated baseline after a reset.
- flops: torch's FlopCounterMode. Convention: attention counted as the full n x n product (the counter
  ignores causal masking, for both backends alike). SDPA's CPU kernel is unknown to the counter (it would
  count 0): its formula is registered here so that both backends report equal forward FLOPs. In backward
  the fused kernel recomputes the scores, so it counts 5 products where the naive path counts 4.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch.utils import flop_counter

import models
from bench.measuring.isolated import ProbeFailed, run_isolated
from bench.metrics import profiled
from models.attention import AttentionMixer
from models.config import above, at_least, check

if TYPE_CHECKING:
    from bench.cells import Cell


@dataclass(frozen=True)
class ProfileConfig:
    batch: int = 1
    repeats: int = 3
    warmup: int = 1
    memory_budget_mb: float = 10000.0  # points estimated or measured above it are recorded as `oom`
    time_budget_s: float = 30.0  # one step slower than this is recorded as `timeout`

    def __post_init__(self):
        check(self, batch=at_least(1), repeats=at_least(1), warmup=at_least(0), memory_budget_mb=above(0),
              time_budget_s=above(0))


def _register_cpu_sdpa_flops() -> None:
    aten = torch.ops.aten
    forward = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    backward = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
    if forward is not None and forward not in flop_counter.flop_registry:
        @flop_counter.register_flop_formula(forward)
        def _forward(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
            return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)
    if backward is not None and backward not in flop_counter.flop_registry:
        @flop_counter.register_flop_formula(backward)
        def _backward(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
            return flop_counter.sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


_register_cpu_sdpa_flops()


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def make_input(model: torch.nn.Module, batch: int, n: int, device: str) -> torch.Tensor:
    gen = torch.Generator().manual_seed(n)
    return torch.randn(batch, n, model.config.d_model, generator=gen).to(device)


def step(model: torch.nn.Module, x: torch.Tensor, mode: str) -> None:
    """One measured step: `forward` (inference mode) or `train` (forward + backward)."""
    if mode == "forward":
        with torch.inference_mode():
            model(x)
    else:
        y, _ = model(x)
        y.square().mean().backward()
        model.zero_grad(set_to_none=True)


def estimate_attention_bytes(model: torch.nn.Module, n: int, batch: int, mode: str) -> int:
    """Bytes of materialised n x n scores (naive full attention only), to refuse a point before it swaps.
    Inference frees each layer's scores before the next layer; training keeps every layer's for backward."""
    per_layer = [4 * batch * m.n_heads * n * n * (2 if mode == "forward" else 4) for m in model.modules()
                 if isinstance(m, AttentionMixer) and m.backend == "naive" and m.window is None]
    if not per_layer:
        return 0
    return max(per_layer) if mode == "forward" else sum(per_layer)


def measure_time(model: torch.nn.Module, n: int, mode: str, cfg: ProfileConfig, device: str) -> list[dict[str, Any]]:
    x = make_input(model, cfg.batch, n, device)
    times = []
    for i in range(cfg.warmup + cfg.repeats):
        sync(device)
        start = time.perf_counter()
        step(model, x, mode)
        sync(device)
        elapsed = time.perf_counter() - start
        if elapsed > cfg.time_budget_s:
            return [{"metric": profiled("time", mode), "value": elapsed, "status": "timeout"}]
        if i >= cfg.warmup:
            times.append(elapsed)
    q = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
    median = statistics.median(times)
    spread = {"q25": q[0], "q75": q[2], "repeats": len(times), "samples": times}  # every repeat: the bootstrap
    return [
        {"metric": profiled("time", mode), "value": median, "status": "ok", **spread},
        {"metric": profiled("tokens_per_s", mode), "value": cfg.batch * n / median, "status": "ok"},
    ]


def count_flops(model: torch.nn.Module, n: int, mode: str, cfg: ProfileConfig, device: str) -> list[dict[str, Any]]:
    x = make_input(model, cfg.batch, n, device)
    with flop_counter.FlopCounterMode(display=False) as counter:
        if mode == "forward":  # with autograd on: the counter's module hooks need graph nodes; same FLOPs
            model(x)
        else:
            step(model, x, mode)
    return [{"metric": profiled("flops", mode), "value": float(counter.get_total_flops()), "status": "ok"}]


def measure_memory(cell: Cell, mode: str, device: str, threads: int) -> list[dict[str, Any]]:
    """Peak memory of one step of a memory profile cell in a fresh process (bench.measuring.isolated); the
    request is the cell as the store writes it, the mode, and where it runs."""
    cfg = cell.run_config.profile
    metric = profiled("memory", mode)
    request = {"cell": cell.as_dict(), "mode": mode, "device": device, "threads": threads}
    try:
        result = run_isolated(request, timeout_s=cfg.time_budget_s * 3 + 60)
    except ProbeFailed as failed:
        return [{"metric": metric, "value": float("nan"), "status": failed.status, "error": str(failed)}]
    status = "oom" if result["peak_bytes"] > cfg.memory_budget_mb * 2**20 else "ok"
    return [{"metric": metric, "value": float(result["peak_bytes"]), "status": status,
             "baseline_bytes": result["baseline_bytes"], "probe": result["probe"]}]


METRICS = ("time", "memory", "flops")  # what a profile cell measures: each a family of bench.metrics.profiled


def profile_point(cell: Cell, device: str, threads: int) -> list[dict[str, Any]]:
    """Rows for one profile cell (model, n, metric family) over its modes."""
    run = cell.run_config
    n, metric, cfg = run.n, run.metric, run.profile
    torch.manual_seed(0)
    model = models.build(cell.model, **cell.model_config).to(device)
    rows: list[dict[str, Any]] = []
    for mode in run.modes:
        estimate = estimate_attention_bytes(model, n, cfg.batch, mode)
        if metric != "flops" and estimate > cfg.memory_budget_mb * 2**20:
            rows.append({"metric": profiled(metric, mode), "value": float(estimate), "status": "oom",
                         "reason": "estimated n^2 scores over budget"})
        elif metric == "time":
            rows += measure_time(model, n, mode, cfg, device)
        elif metric == "flops":
            rows += count_flops(model, n, mode, cfg, device)
        else:
            rows += measure_memory(cell, mode, device, threads)
    sizes = {"params": model.num_params(), "state_numel": model.state_numel(n)}
    return [{**row, **sizes, "n": n} for row in rows]
