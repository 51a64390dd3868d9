"""Titans neural long-term memory as a package of ops and a layer (see `rule` for the update rule and the
layout): `rule` the conventions and MemoryConfig, `naive` the token-loop reference, `chunked` the dual form in
torch, `native` the compiled CPU loops as torch operators, `compiled` those operators as few autograd nodes,
`layer` NeuralMemory."""

from models.memory.chunked import chunk_coefficients, chunked_scan
from models.memory.layer import CausalDepthwiseConv, NeuralMemory, l2_normalise
from models.memory.naive import mlp_backprop, mlp_forward, mlp_output, reference_scan
from models.memory.rule import KERNELS, NO_MOMENTUM_LOG, NORM_EPS, PATHS, RULES, STANDALONE_HEADS, MemoryConfig

__all__ = [
    "KERNELS", "NO_MOMENTUM_LOG", "NORM_EPS", "PATHS", "RULES", "STANDALONE_HEADS", "CausalDepthwiseConv",
    "MemoryConfig", "NeuralMemory", "chunk_coefficients", "chunked_scan", "l2_normalise", "mlp_backprop",
    "mlp_forward", "mlp_output", "reference_scan",
]
