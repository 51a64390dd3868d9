"""Developer script, outside the harness (it prints, stores nothing, judges no target): speed of one
neural-memory layer, for work on the memory's kernels. Tokens/s of forward (inference) and forward + backward,
forward work and achieved GFLOP/s (FlopCounterMode) against a matmul peak measured in the same process, and
optionally lucidrains' titans-pytorch NeuralMemory side by side (`pip install titans-bench[compare]`), with
the ratios between them from the same run. Whole models against n are the harness's job: `bench profile`.

What each computes: ours follows the paper (gradients anchored at every chunk start, per-token gates,
reads after each token's write); titans-pytorch takes every inner gradient at the call's initial weights
unless a batch size is set, pools the gates per chunk and reads chunk-end weights only. `--anchored` adds it
with batch_size = chunk, which anchors each chunk's gradients at the previous chunk's end as ours does (it still
pools gates and reads chunk-end weights): the same gradient rule, side by side. `--kernel` picks our
memory kernel (default: compiled where usable). Forward work is counted by FlopCounterMode, which counts our
compiled operators by FLOP formulas equal to the torch loops' count of the same products.

For each (chunk, n) cell the implementations are timed interleaved, repeat after repeat, so that all of
them see the same phases of a shared machine, and the best of `--repeats` runs after a warm-up counts: the
minimum is the least noisy estimate of what the code costs.

    python -m tools.memory_speed --lengths 1024,4096,16384 --chunks 16,64 --threads 2 --titans-pytorch
"""

from __future__ import annotations

import argparse
import functools
import time
from collections.abc import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from models.memory import KERNELS, MemoryConfig, NeuralMemory, native

ANCHORED = "titans-pytorch/anchored"
# titans-pytorch anchored concatenates each chunk's weights onto all earlier ones (bytes allocated quadratic in
# n); at n = 16K, chunk 16 it ran a 24 GB machine out of memory, so it is measured up to this length only
ANCHORED_MAX_N = 4096


def matmul_peak_gflops(size: int = 1024, repeats: int = 20) -> float:
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * size**3 * repeats / (time.perf_counter() - start) / 1e9


def ours(dim: int, heads: int, depth: int, chunk: int, kernel: str = "auto") -> torch.nn.Module:
    layer = NeuralMemory(dim, MemoryConfig(n_heads=heads, depth=depth, chunk=chunk, expansion=2.0, kernel=kernel))
    return _Wrap(lambda x: layer(x)[0], layer)


def titans_pytorch(dim: int, heads: int, depth: int, chunk: int, anchored: bool = False) -> torch.nn.Module:
    """anchored: batch_size = chunk, so that titans-pytorch takes each chunk's gradients at the weights the
    previous chunk left, as the paper (and ours) does; it then runs its chunks one after another."""
    from titans_pytorch import NeuralMemory as TPMemory  # optional extra

    layer = TPMemory(dim=dim, chunk_size=chunk, heads=heads, dim_head=dim // heads,
                     batch_size=chunk if anchored else None,
                     default_model_kwargs={"depth": depth, "expansion_factor": 2.0})
    return _Wrap(lambda x: layer(x)[0], layer)


class _Wrap(torch.nn.Module):
    def __init__(self, fn: Callable, module: torch.nn.Module):
        super().__init__()
        self.fn, self.module = fn, module

    def forward(self, x):
        return self.fn(x)


def measure_cell(layers: dict[str, torch.nn.Module], batch: int, n: int, dim: int,
                 repeats: int) -> dict[str, dict[str, float]]:
    """Tokens/s of forward and forward + backward, and forward GFLOP/s, for each implementation at one
    (chunk, n) cell. Repeats are interleaved (forward of each, then training step of each, `repeats` times
    after a warm-up round) so that every implementation sees the same phases of a shared machine; the
    fastest repeat counts."""
    x = torch.randn(batch, n, dim)

    def forward(layer):
        with torch.inference_mode():
            layer(x)

    def train(layer):
        xg = x.clone().requires_grad_(True)
        layer(xg).square().mean().backward()
        layer.zero_grad(set_to_none=True)

    flops, best = {}, {}
    for name, layer in layers.items():
        with FlopCounterMode(display=False) as counter:
            layer(x)
        flops[name] = counter.get_total_flops()
    for repeat in range(repeats + 1):
        for mode, step in (("fwd", forward), ("train", train)):
            for name, layer in layers.items():
                start = time.perf_counter()
                step(layer)
                elapsed = time.perf_counter() - start
                if repeat:  # the first round warms up
                    best[name, mode] = min(best.get((name, mode), elapsed), elapsed)
    return {name: {"fwd_tok_s": batch * n / best[name, "fwd"], "train_tok_s": batch * n / best[name, "train"],
                   "fwd_gflop": flops[name] / 1e9, "fwd_gflops": flops[name] / best[name, "fwd"] / 1e9}
            for name in layers}


def breakdown(layer: torch.nn.Module, batch: int, n: int, dim: int, rows: int = 12) -> tuple[float, list]:
    """Where one training step's time goes: torch.profiler's self CPU time per operator (autograd Functions such
    as the compiled scan count as one), after a warm-up step. Returns the total in ms and the largest rows as
    (name, ms)."""
    x = torch.randn(batch, n, dim, requires_grad=True)

    def step():
        layer(x).square().mean().backward()
        layer.zero_grad(set_to_none=True)

    step()
    with torch.profiler.profile() as prof:
        step()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    return sum(e.self_cpu_time_total for e in events) / 1e3, [(e.key, e.self_cpu_time_total / 1e3)
                                                              for e in events[:rows]]


def comparisons(results: dict[tuple[str, int, int], dict[str, float]]) -> list[str]:
    """What this run measured, side by side, one line per chunk size and fact: how flat ours is in n (the slowest
    length's tokens/s below the fastest's), and, where measured, ours over titans-pytorch and over titans-pytorch
    anchored per chunk (the same gradient rule) at every length. Facts only: no targets are judged here."""
    lines = []
    for chunk in sorted({c for _, c, _ in results}):
        lengths = sorted(n for name, c, n in results if name == "ours" and c == chunk)
        for key, label in (("fwd_tok_s", "forward"), ("train_tok_s", "forward+backward")):
            rates = [results["ours", chunk, n][key] for n in lengths]
            lines.append(f"chunk {chunk}: {label} tokens/s over n = {lengths[0]}..{lengths[-1]}: slowest "
                         f"{100 * (1 - min(rates) / max(rates)):.0f}% below fastest")
        for other in ("titans-pytorch", ANCHORED):
            for n in lengths:
                if (other, chunk, n) in results:
                    ratios = [results["ours", chunk, n][key] / results[other, chunk, n][key]
                              for key in ("fwd_tok_s", "train_tok_s")]
                    lines.append(f"chunk {chunk}: at n={n}, ours over {other}: forward {ratios[0]:.2f}x, "
                                 f"forward+backward {ratios[1]:.2f}x")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.memory_speed", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", default="1024,4096,16384")
    p.add_argument("--chunks", default="16,64")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3, help="timed runs per cell after a warm-up; the best counts")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--kernel", default="auto", choices=KERNELS, help="our memory kernel (see MemoryConfig)")
    p.add_argument("--titans-pytorch", action="store_true", help="also measure titans-pytorch's NeuralMemory")
    p.add_argument("--breakdown", action="store_true",
                   help="also print where one training step of ours goes (torch.profiler), per chunk at the longest n")
    p.add_argument("--anchored", action="store_true",
                   help=f"also measure {ANCHORED}: titans-pytorch with batch_size = chunk, the paper's gradient rule "
                        f"(slow: its chunks run one by one in Python; up to n = {ANCHORED_MAX_N}, see ANCHORED_MAX_N)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    peak = matmul_peak_gflops()
    print(f"threads {args.threads}, batch {args.batch}, D {args.dim}, heads {args.heads}, depth {args.depth}, "
          f"kernel {args.kernel}, best of {args.repeats}; fp32 matmul peak {peak:.0f} GFLOP/s")
    if args.kernel != "torch":
        print(f"memory loops: {native.describe()}")
    impls = {"ours": functools.partial(ours, kernel=args.kernel)} | (
        {"titans-pytorch": titans_pytorch} if args.titans_pytorch else {}) | (
        {ANCHORED: functools.partial(titans_pytorch, anchored=True)} if args.anchored else {})
    header = ("impl", "chunk", "n", "fwd tok/s", "fwd+bwd tok/s", "fwd GFLOP", "fwd GFLOP/s", "% peak")
    print("{:<24} {:>5} {:>6} {:>11} {:>14} {:>10} {:>12} {:>7}".format(*header))
    results = {}
    for chunk in (int(c) for c in args.chunks.split(",")):
        for n in (int(v) for v in args.lengths.split(",")):
            layers = {name: make(args.dim, args.heads, args.depth, chunk) for name, make in impls.items()
                      if name != ANCHORED or n <= ANCHORED_MAX_N}
            for name, r in measure_cell(layers, args.batch, n, args.dim, args.repeats).items():
                results[name, chunk, n] = r
                print(f"{name:<24} {chunk:>5} {n:>6} {r['fwd_tok_s']:>11,.0f} {r['train_tok_s']:>14,.0f} "
                      f"{r['fwd_gflop']:>10.2f} {r['fwd_gflops']:>12.1f} {100 * r['fwd_gflops'] / peak:>6.1f}%",
                      flush=True)
    for line in comparisons(results):
        print(line)
    if args.breakdown:
        n = max(int(v) for v in args.lengths.split(","))
        for chunk in (int(c) for c in args.chunks.split(",")):
            total, top = breakdown(ours(args.dim, args.heads, args.depth, chunk, args.kernel), args.batch, n, args.dim)
            print(f"training step of ours, chunk {chunk}, n={n}: {total:.0f} ms of operator time (torch.profiler), "
                  "largest:")
            for name, ms in top:
                print(f"  {name[:60]:<60} {ms:>8.1f} ms {100 * ms / total:>5.1f}%")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
