"""What several test files share: the marker for tests of the compiled code, and a walk over autograd graphs."""

from dataclasses import dataclass

import pytest
import torch

from models.memory import native

needs_native = pytest.mark.skipif(not native.available(), reason="no C++ compiler: the compiled scan is unavailable")


def graph_nodes(t: torch.Tensor) -> list:
    """Every autograd node of the graph behind t."""
    seen, stack = {}, [t.grad_fn]
    while stack:
        node = stack.pop()
        if node is not None and node not in seen:
            seen[node] = None
            stack += [child for child, _ in node.next_functions]
    return list(seen)


def node_names(t: torch.Tensor) -> set[str]:
    """The kinds of autograd node in the graph behind t (e.g. "CompiledWriteBackward")."""
    return {type(node).__name__ for node in graph_nodes(t)}


@dataclass
class SmallWrite:
    """A small one-group memory write for gradchecks: `batch` x `heads` heads of `dh` channels, memory hidden width
    5, conv kernel 3 and `n` = 6 tokens (two chunks of 3, or when `continued` the rest of a chunk begun in an
    earlier call, with its own anchor); `rnd` makes float64 leaves from the same generator."""

    continued: bool
    seed: int
    batch: int = 2
    heads: int = 2
    dh: int = 3
    kernel: int = 3
    n: int = 6

    def __post_init__(self):
        self.generator = torch.Generator().manual_seed(self.seed)
        self.spec = native.WriteSpec(m=1 if self.continued else 2, c=self.n if self.continued else 3, subs=1,
                                     heads=self.heads, max_lr=0.5, momentum=True, forgetting=True, bound=0.5)

    def rnd(self, *shape: int, scale: float = 1.0) -> torch.Tensor:
        return (scale * torch.randn(*shape, generator=self.generator, dtype=torch.float64)).requires_grad_(True)

    def states(self) -> list[torch.Tensor]:
        """The weights, momentum and anchor of a depth-2 memory, flat (the anchor is the weights unless continued)."""
        shapes = [(self.batch, self.heads, self.dh, 5), (self.batch, self.heads, 5, self.dh)]
        weights = [self.rnd(*shape, scale=0.5) for shape in shapes]
        momentum = [self.rnd(*shape, scale=0.1) for shape in shapes]
        anchor = [self.rnd(*shape, scale=0.5) for shape in shapes] if self.continued else weights
        return [*weights, *momentum, *anchor]
