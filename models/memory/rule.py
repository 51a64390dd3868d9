"""Titans neural long-term memory (Behrouz et al. 2025), per head a small MLP whose weights are the state: the
update rule and its conventions, stated once, and the layer's config.

For every token t (DESIGN.md section 3):
    inner loss      l_t(M) = || M(k_t) - v_t ||^2
    surprise        S_t = eta_t * S_{t-1} - theta_t * grad l_t(M_anchor)
    forgetting      M_t = (1 - alpha_t) * M_{t-1} + S_t
    read            y_t = M_t(q_t)                        (after the write of token t)
The gradient anchor is the memory at the start of the token's chunk of `chunk` tokens (chunk = 1 is the
exact online rule). Chunks are aligned to stream positions, so streaming cuts do not change the result.

The package, laid out as flash-linear-attention lays out its ops (references beside the chunked kernels, a
layer that only calls them):
- `rule` (this module): the rule's conventions (RULES, PATHS, KERNELS, NO_MOMENTUM_LOG, NORM_EPS) and MemoryConfig;
- `naive`: the token loop `reference_scan`, the obviously-right reference (and the only path for the seed
  paper's formulation and for per-token diagnostics), with the plain MLP forward and back-propagation;
- `chunked`: the dual form `chunked_scan`, its torch loops with hand-written backwards (the GPU path and the
  tested reference of the compiled ones);
- `native`: the compiled CPU loops (native_scan.cpp) registered as torch operators `titans_bench::*`, with
  shape functions, autograd and FLOP formulas;
- `compiled`: the operators composed into few autograd nodes with hand-written backwards (chunked_scan's
  compiled path, and the layer's projection), since per-node bookkeeping outweighs small calls' arithmetic;
- `layer`: NeuralMemory, which projects, gates, scans and finishes by calling the above.

Choices the paper leaves open (config values, defaults in MemoryConfig): memory MLP depth and hidden
width, SiLU activation, chunk size, conv kernel, gate parameterisation theta = max_lr * sigmoid,
eta = sigmoid, alpha = sigmoid (biases start at eta ~ 0.73, alpha ~ 0.0025), learned initial memory shared
across the batch, zero initial momentum, output RMS-norm gated by sigmoid(linear(x)).
"""

from __future__ import annotations

from dataclasses import dataclass

from models.config import above, at_least, check, one_of

RULES = ("titans", "seed", "seed_corrected")
PATHS = ("chunked", "reference")
KERNELS = ("auto", "native", "torch")
NO_MOMENTUM_LOG = -1.0e4  # log eta when momentum is off: exp() of any sum of it is exactly 0
NORM_EPS = 1e-6  # the output RMS norm's
STANDALONE_HEADS = 4  # a NeuralMemory built on its own, with n_heads unset


@dataclass(frozen=True)
class MemoryConfig:
    n_heads: int | None = None  # None: the enclosing model's attention heads (TitansConfig), else STANDALONE_HEADS
    depth: int = 2  # L_M: layers of the memory MLP (1 = a linear map)
    expansion: float = 2.0  # hidden width of the memory MLP, in head dims
    chunk: int = 16  # b: tokens sharing one gradient anchor
    conv_kernel: int = 4
    max_lr: float = 0.5  # theta_t = max_lr * sigmoid(.): safe this large only with the clip
    momentum: bool = True
    forgetting: bool = True
    rule: str = "titans"  # "titans", or the seed paper's update as written ("seed") or sign-corrected
    seed_gamma: float = 1.0  # seed rule: beta_t = exp(-gamma ||grad l_t||)
    clip: float = 1.0  # > 0: each token's inner gradient rescaled to norm <= clip (over all memory layers); 0: off
    path: str = "chunked"  # "chunked" (dual form) or "reference" (token loop)
    block: int = 1024  # longer inputs are streamed through the state in blocks of this many tokens
    read_chunk: int = 16  # a chunk that is a multiple of it is read in sub-chunks of this size (same result)
    kernel: str = "auto"  # compiled CPU code ("native") or torch ops for the chunk loops and the pointwise work
    # around the scan (conv, norms, output gate), or native where usable

    def __post_init__(self):
        check(self, rule=one_of(*RULES), path=one_of(*PATHS), kernel=one_of(*KERNELS), depth=at_least(1),
              chunk=at_least(1), conv_kernel=at_least(1), n_heads=at_least(1),
              block=at_least(1), read_chunk=at_least(1), expansion=above(0), max_lr=at_least(0),
              seed_gamma=at_least(0), clip=at_least(0))

