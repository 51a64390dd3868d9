"""The memory's chunk loops as compiled code (native_scan.cpp), for CPU tensors, registered as torch operators
`titans_bench::*`: the sequential key scan with the queries read during it, one reverse pass for the backward
of both, and the gate coefficients; and the layer's pointwise work around them (the conv, SiLU and q/k norms
before, the output norm and gate after).

The torch loops in `chunked` issue some 10 (forward) and 25 (backward) tiny kernels per chunk; at these sizes
each costs more in dispatch than in arithmetic, and none can use a second core. The compiled loops run every
(batch, head) recurrence to the end on one of torch's OpenMP threads. They are built on first use with the
system C++ compiler into a per-user cache (TITANS_BENCH_CACHE, default ~/.cache/titans-bench) and loaded with
ctypes, every entry point with declared argument types; without a compiler the torch loops are used, with a
warning that says why.

As operators they carry what the dispatcher needs: declared schemas, shape functions (`register_fake`: fake and
meta tensors trace through them without the library), autograd (`register_autograd`: each forward's backward is
an operator too; the model calls them inside the few nodes of `compiled`, through `direct`) and FLOP formulas,
so that FlopCounterMode counts the compiled code that is timed. The formulas
count the products of the torch path, operation for operation (`chunked`: scan_keys, read_chunks,
scan_keys_backward, and autograd through chunk_coefficients and read_chunks), so that both kernels report equal
FLOPs. Two differences are conventions, not work left out: the compiled backward recomputes each chunk's reads
rather than storing them (the recomputation is not counted, as activation checkpointing would not be), and the
pointwise operators count 0, as FlopCounterMode counts no pointwise op of the torch path. The gate coefficients'
backward counts the gradients of all three gates, which is what it computes; the torch path skips the products
of a gate that is constant (momentum or forgetting off), so there the counts differ by those.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import subprocess
import tempfile
import warnings
from functools import cache
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils._python_dispatch import _get_current_dispatch_mode
from torch.utils.flop_counter import register_flop_formula

SOURCE = Path(__file__).with_name("native_scan.cpp")
COMPILER = os.environ.get("CXX", "g++")
# -ffast-math lets the compiler call glibc's vector exp; it is given to the compile step only, so the
# shared library is not linked with crtfastmath, which would flush subnormals for the whole process
COMPILE_FLAGS = ["-O3", "-march=native", "-ffast-math", "-fopenmp", "-std=c++17", "-fPIC"]
SUFFIX = {torch.float32: "f32", torch.float64: "f64"}
# The library's entry points, each compiled for float (f32) and double (f64), and their C argument lists:
# i int64, w const int64* (the layer widths), p a tensor's data, P an array of tensors' data, t a scalar of
# the tensor type. Every function ends with the thread count and returns nothing.
SIGNATURES = {
    "scan_forward": "iiiiiw PP pppp PPP pppp P t p i",
    "scan_backward": "iiiiiw P ppp PPP pppp P pppp ppp PP t p i",
    "coefficients": "ii ppp pppp i",
    "coefficients_backward": "ii ppp pppp ppp i",
    "conv_activate_normalise": "iiiii pppp P i",
    "conv_activate_normalise_backward": "iiiii pppp P pppp i",
    "norm_gate": "iiii t pppp i",
    "norm_gate_backward": "iiii t ppppppp i",
}
C_TYPES = {"i": ctypes.c_int64, "w": ctypes.POINTER(ctypes.c_int64), "p": ctypes.c_void_p,
           "P": ctypes.POINTER(ctypes.c_void_p)}
SCALARS = {"f32": ctypes.c_float, "f64": ctypes.c_double}


def cache_dir() -> Path:
    return Path(os.environ.get("TITANS_BENCH_CACHE", Path.home() / ".cache" / "titans-bench"))


def cpu_signature() -> str:
    """-march=native ties a build to the CPU it was built on."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        flags = ""
    return platform.machine() + flags


def build() -> Path:
    """Compiles once per source, flags and CPU; concurrent builders each write their own file, then rename."""
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join([COMPILER, *COMPILE_FLAGS, cpu_signature()]).encode())
    library = cache_dir() / f"native_scan-{key.hexdigest()[:16]}.so"
    if library.exists():
        return library
    library.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=library.parent) as tmp:
        obj, out = Path(tmp) / "native_scan.o", Path(tmp) / library.name
        for cmd in ([COMPILER, *COMPILE_FLAGS, "-c", str(SOURCE), "-o", str(obj)],
                    [COMPILER, "-shared", "-fopenmp", str(obj), "-o", str(out)]):
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode:
                raise RuntimeError(f"`{' '.join(cmd)}` failed:\n{done.stderr.strip()}")
        os.replace(out, library)
    return library


@cache
def library() -> ctypes.CDLL | None:
    """The built library with every entry point's argument types declared, or None (with a warning) when it
    cannot be built or loaded."""
    try:
        lib = ctypes.CDLL(str(build()))
    except (OSError, RuntimeError) as err:
        warnings.warn(f"the compiled memory scan is unavailable, using the slower torch loop: {err}", stacklevel=2)
        return None
    for name, signature in SIGNATURES.items():
        for suffix, scalar in SCALARS.items():
            fn = getattr(lib, f"{name}_{suffix}")
            fn.argtypes = [scalar if code == "t" else C_TYPES[code] for code in signature.replace(" ", "")]
            fn.restype = None
    return lib


def available() -> bool:
    return library() is not None


def describe() -> str:
    """For a run's env.json: which loops the memory runs on, and built by what; timings differ several-fold."""
    if not available():
        return "torch loops (the compiled loops are unavailable)"
    version = subprocess.run([COMPILER, "--version"], capture_output=True, text=True).stdout.splitlines()
    return f"compiled ({version[0] if version else COMPILER}; {' '.join(COMPILE_FLAGS)})"


def usable(*tensors: Tensor) -> bool:
    """CPU tensors of one supported dtype, and a library that loaded."""
    dtype = tensors[0].dtype
    return (dtype in SUFFIX and all(t.device.type == "cpu" and t.dtype == dtype for t in tensors)
            and available())


def use_native(kernel: str, *tensors: Tensor) -> bool:
    """Whether a piece of the layer runs compiled for these tensors (MemoryConfig.kernel). Under a dispatch mode
    the operators are what the mode sees: FlopCounterMode counts them by their formulas, fake tensors take their
    shape functions. Meta tensors are not CPU tensors, so they take the torch path."""
    if kernel == "torch":
        return False
    ok = usable(*tensors)
    if kernel == "native" and not ok:
        raise RuntimeError("memory kernel 'native' needs CPU tensors in float32 or float64 and a C++ compiler "
                           "(see the warning above); use kernel 'auto' or 'torch'")
    return ok


_KERNELS: dict[Any, Any] = {}  # each operator's Python kernel, for `direct`


def operator(name: str) -> Any:
    """Registers the decorated function as the operator titans_bench::`name` (no argument mutated) and keeps
    the function itself for `direct`."""
    def register(kernel: Any) -> Any:
        op = torch.library.custom_op(f"titans_bench::{name}", mutates_args=())(kernel)
        _KERNELS[op] = kernel
        return op
    return register


def direct(op: Any, *args: Any) -> Any:
    """Calls an operator's kernel without autograd, through the dispatcher only while a dispatch mode watches
    (FlopCounterMode, fake tensors): that is all the dispatcher adds here, and it costs some 30 us a call in
    Python, a third of the compiled scan of a 64-token segment (MAC calls it hundreds of times a step)."""
    return op(*args) if _get_current_dispatch_mode() is not None else _KERNELS[op](*args)


def _call(name: str, dtype: torch.dtype, *args: Any) -> None:
    """Calls the library's `name` for `dtype` with tensors passed as their data, lists of tensors as arrays of
    it, and the thread count last. The arguments stay referenced here for the whole call, so no temporary
    tensor's memory is freed while the C code reads it."""
    def raw(x: Any) -> Any:
        if isinstance(x, Tensor):
            return x.data_ptr()
        if isinstance(x, list | tuple):
            return (ctypes.c_void_p * len(x))(*(t.data_ptr() for t in x))
        return x

    getattr(library(), f"{name}_{SUFFIX[dtype]}")(*map(raw, args), torch.get_num_threads())


def _dims(states: list[Tensor], k: Tensor, write: Tensor, mix: Tensor, q: Tensor, G: Tensor, BBC: Tensor,
          v: Tensor | None = None) -> tuple[list[int], ctypes.Array]:
    """The loops' dimensions, once every tensor is checked to have the pairs-major shape that the C code
    indexes by: another layout would be read out of bounds."""
    pairs, m, c, _ = k.shape
    units = write.shape[1]
    subs = max(1, units // m)
    r = c // subs
    widths = [s.shape[-2] // 2 for s in states] + [states[-1].shape[-1]]
    expected = {"write": (write, (pairs, units, 2, 1, r)), "mix": (mix, (pairs, units, 2, 2)),
                "q": (q, (pairs, units, r, widths[0])), "G": (G, (pairs, units, r, r)),
                "BBC": (BBC, (pairs, units, r, 2, 1))}
    if v is not None:
        expected["v"] = (v, (pairs, m, c, widths[-1]))
    consistent = (units == m * subs and c == r * subs and k.shape[-1] == widths[0]
                  and all(s.shape[0] == pairs for s in states))
    _check_shapes("compiled memory loops: tensors not in the pairs-major layout [B H, chunks, ...]", expected,
                  [] if consistent else [f"k {tuple(k.shape)} against {units} sub-chunks and states "
                                         f"{[tuple(s.shape) for s in states]}"])
    return [len(states), m, subs, pairs, c], (ctypes.c_int64 * len(widths))(*widths)


def _check_shapes(what: str, expected: dict[str, tuple[Tensor, tuple[int, ...]]], wrong: list[str] = ()) -> None:
    """Refuses tensors of other shapes than the C code indexes by, which it would read out of bounds."""
    wrong = [*wrong, *(f"{name} {tuple(t.shape)} (expected {shape})" for name, (t, shape) in expected.items()
                       if tuple(t.shape) != shape)]
    if wrong:
        raise ValueError(f"{what}: " + "; ".join(wrong))


def _contiguous(*tensors: Tensor) -> list[Tensor]:
    return [t.contiguous() for t in tensors]


def _nothing(*_: Any, **__: Any) -> int:
    """The FLOP formula of the pointwise operators: FlopCounterMode counts no pointwise op of the torch path."""
    return 0


def _scan_flops(states: list, k: Any, write: Any) -> tuple[int, int, int]:
    """Products of the torch path for a scan of these shapes (pairs-major k [P, m, c, d_0], write [P, m s, 2, 1,
    r], states [P, 2 d_l, d_{l+1}]), at FlopCounterMode's 2 per multiply-add, as (the keys' forward, scan_keys;
    the reads' forward, read_chunks; the keys' backward, scan_keys_backward). With n_l = d_l d_{l+1}, per chunk:
    the keys' layers and back-propagation 2 c n_l (and 2 c n_l for l >= 1), per sub-chunk the state's mix 8 n_l
    and the write 4 r n_l; per sub-chunk the reads' x h^T, (B; BC) x (W; S) and the decayed d, 2 r^2 d_l +
    4 r n_l + 2 r^2 d_{l+1}; and the backward's bends, unmixing, gradients of d, of the anchor, of h_w, of h, of
    the write, the mix and k (in scan_keys_backward's order), 16 s n_l + 10 c n_l + 12 c n_l (l >= 1) + 2 c n_0."""
    pairs, m, c, _ = k
    units, r = write[1], write[-1]
    subs = units // m
    widths = [s[-2] // 2 for s in states] + [states[-1][-1]]
    sizes = [a * b for a, b in zip(widths, widths[1:], strict=False)]
    keys = m * pairs * sum((6 * c + 8 * subs) * n + (2 * c * n if layer else 0) for layer, n in enumerate(sizes))
    reads = units * pairs * r * sum(2 * r * a + 4 * a * b + 2 * r * b for a, b in zip(widths, widths[1:], strict=False))
    back = m * pairs * (sum((16 * subs + 10 * c) * n + (12 * c * n if layer else 0) for layer, n in enumerate(sizes))
                        + 2 * c * sizes[0])
    return keys, reads, back


# ----------------------------------------------------------------------------------------------------------
# the gate coefficients


@operator("coefficients")
def coefficients(log_eta: Tensor, log_keep: Tensor, theta: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The math of chunked.chunk_coefficients for gates [..., r] of one dtype: G [.., r, r], BBC [.., r, 2, 1],
    mix [.., 2, 2], write [.., 2, 1, r]."""
    log_eta, log_keep, theta = _contiguous(log_eta, log_keep, theta)
    out = _coefficients_fake(log_eta, log_keep, theta)
    r = log_eta.shape[-1]
    _call("coefficients", log_eta.dtype, log_eta.numel() // r, r, log_eta, log_keep, theta, *out)
    return out


@coefficients.register_fake
def _coefficients_fake(log_eta: Tensor, log_keep: Tensor, theta: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    lead, r = log_eta.shape[:-1], log_eta.shape[-1]
    return (log_eta.new_empty(*lead, r, r), log_eta.new_empty(*lead, r, 2, 1), log_eta.new_empty(*lead, 2, 2),
            log_eta.new_empty(*lead, 2, 1, r))


@operator("coefficients_backward")
def coefficients_backward(log_eta: Tensor, log_keep: Tensor, theta: Tensor, g_G: Tensor, g_BBC: Tensor,
                          g_mix: Tensor, g_write: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of `coefficients` with respect to the three gates, from those of G, BBC, mix and write."""
    tensors = _contiguous(log_eta, log_keep, theta, g_G, g_BBC, g_mix, g_write)
    out = _coefficients_backward_fake(*tensors)
    r = log_eta.shape[-1]
    _call("coefficients_backward", log_eta.dtype, log_eta.numel() // r, r, *tensors, *out)
    return out


@coefficients_backward.register_fake
def _coefficients_backward_fake(log_eta: Tensor, log_keep: Tensor, theta: Tensor, *_: Tensor) -> tuple[Tensor, ...]:
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (log_eta, log_keep, theta))


def _coefficients_setup(ctx: Any, inputs: tuple, output: tuple) -> None:
    ctx.save_for_backward(*inputs)


def _coefficients_autograd(ctx: Any, *grads: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    return coefficients_backward(*ctx.saved_tensors, *grads)


coefficients.register_autograd(_coefficients_autograd, setup_context=_coefficients_setup)


@register_flop_formula(torch.ops.titans_bench.coefficients)
def _coefficients_flops(log_eta: Any, *_: Any, **__: Any) -> int:
    """chunk_coefficients' two products per unit of r tokens: F @ P [r, r] and F @ exp(la) [r, 1]."""
    r = log_eta[-1]
    return 2 * r * r * (r + 1) * (torch.Size(log_eta).numel() // r)


@register_flop_formula(torch.ops.titans_bench.coefficients_backward)
def _coefficients_backward_flops(log_eta: Any, *_: Any, **__: Any) -> int:
    """Autograd through chunk_coefficients' two products: both operands' gradients, twice the forward."""
    return 2 * _coefficients_flops(log_eta)


# ----------------------------------------------------------------------------------------------------------
# the key scan with its reads, in inference and in training, and its backward


def _scan(states: list[Tensor], anchor: list[Tensor], k: Tensor, v: Tensor, write: Tensor, mix: Tensor, q: Tensor,
          G: Tensor, BBC: Tensor, bound: float, recording: tuple[list[Tensor], ...] | None,
          end: list[Tensor] | None, scales: Tensor | None) -> Tensor:
    """Runs the forward loops: recording, (path, zs, ds) and the clip scales (with a bound) are filled;
    otherwise `end`. Returns the reads."""
    states, anchor = _contiguous(*states), _contiguous(*anchor)
    k, v, write, mix, q, G, BBC = _contiguous(k, v, write, mix, q, G, BBC)
    dims, widths = _dims(states, k, write, mix, q, G, BBC, v)
    y = q.new_empty(*q.shape[:-1], states[-1].shape[-1])
    path, zs, ds = recording or (None, None, None)
    _call("scan_forward", k.dtype, *dims, widths, states, anchor, k, v, write, mix, path, zs, ds, q, G, BBC, y, end,
          bound, scales)
    return y


@operator("scan_read")
def scan_read(states: list[Tensor], anchor: list[Tensor], k: Tensor, v: Tensor, write: Tensor, mix: Tensor,
              q: Tensor, G: Tensor, BBC: Tensor, bound: float) -> tuple[Tensor, list[Tensor]]:
    """Inference: chunked.scan_keys with every sub-chunk's queries read from the running state as it goes (the
    math of read_chunks), so that no state per sub-chunk is stored. Layouts are pairs major (see
    native_scan.cpp): states [B H, 2 d_l, d_{l+1}], anchor [B H, d_l, d_{l+1}], k, v [B H, m, c, d], q
    [B H, m s, r, d_0], G, BBC, write and mix per sub-chunk [B H, m s, ...]. `bound` > 0 clips each key's d as
    chunked.scan_keys does. Returns the reads [B H, m s, r, d_L] and the end states."""
    end = [torch.empty(s.shape, dtype=s.dtype) for s in states]
    return _scan(states, anchor, k, v, write, mix, q, G, BBC, bound, None, end, None), end


@scan_read.register_fake
def _scan_read_fake(states: list[Tensor], anchor: list[Tensor], k: Tensor, v: Tensor, write: Tensor, mix: Tensor,
                    q: Tensor, *_: Any) -> tuple[Tensor, list[Tensor]]:
    return q.new_empty(*q.shape[:-1], states[-1].shape[-1]), [s.new_empty(s.shape) for s in states]


@operator("scan_read_recorded")
def scan_read_recorded(
    states: list[Tensor], anchor: list[Tensor], k: Tensor, v: Tensor, write: Tensor, mix: Tensor, q: Tensor,
    G: Tensor, BBC: Tensor, bound: float,
) -> tuple[Tensor, list[Tensor], list[Tensor], list[Tensor], list[Tensor], Tensor]:
    """Training: scan_read that also records what the backward needs, as chunked.scan_keys does. Returns the
    reads y and the end states (what the caller uses, and all that has a gradient), then the states before
    every sub-chunk and after the last ([B H, m s + 1, 2 d_l, d_{l+1}]), the keys' z_l and (clipped) d_l
    ([B H, m, c, d_{l+1}]), and the clip scales ([B H, m, c]; empty without a bound)."""
    y, end, path, zs, ds, scales = _scan_read_recorded_fake(states, anchor, k, v, write, mix, q, G, BBC, bound)
    y = _scan(states, anchor, k, v, write, mix, q, G, BBC, bound, (path, zs, ds), None, scales if bound else None)
    return y, [p[:, -1].clone() for p in path], path, zs, ds, scales


@scan_read_recorded.register_fake
def _scan_read_recorded_fake(states: list[Tensor], anchor: list[Tensor], k: Tensor, v: Tensor, write: Tensor,
                             mix: Tensor, q: Tensor, G: Tensor, BBC: Tensor, bound: float) -> tuple:
    pairs, m, c, _ = k.shape
    units = write.shape[1]
    path = [s.new_empty(pairs, units + 1, *s.shape[1:]) for s in states]
    zs = [k.new_empty(pairs, m, c, s.shape[-1]) for s in states[:-1]]
    ds = [k.new_empty(pairs, m, c, s.shape[-1]) for s in states]
    y = q.new_empty(*q.shape[:-1], states[-1].shape[-1])
    return y, [s.new_empty(s.shape) for s in states], path, zs, ds, k.new_empty((pairs, m, c) if bound else (0,))


@operator("scan_read_backward")
def scan_read_backward(anchor: list[Tensor], k: Tensor, write: Tensor, mix: Tensor, path: list[Tensor],
                       zs: list[Tensor], ds: list[Tensor], q: Tensor, G: Tensor, BBC: Tensor, g_y: Tensor,
                       g_end: list[Tensor], scales: Tensor, bound: float) -> tuple[list[Tensor], list[Tensor], Tensor,
                                                                                 Tensor, Tensor, Tensor, Tensor, Tensor,
                                                                                 Tensor]:
    """The backward of scan_read_recorded, chunk by chunk in reverse: each chunk's reads are recomputed and
    taken back first, then the chunk's writes and keys. Returns the gradients of the start states, the first
    anchor, k, v, write, mix, q, G and BBC."""
    anchor, path, zs, ds, g_end = ([t.contiguous() for t in ts] for ts in (anchor, path, zs, ds, g_end))
    k, write, mix, q, G, BBC, g_y = _contiguous(k, write, mix, q, G, BBC, g_y)
    dims, widths = _dims(path, k, write, mix, q, G, BBC)
    g_states, g_anchor, g_k, g_dout, g_write, g_mix, g_q, g_G, g_BBC = _scan_read_backward_fake(
        anchor, k, write, mix, path, zs, ds, q, G, BBC)
    g_write.zero_()
    g_mix.zero_()
    _call("scan_backward", k.dtype, *dims, widths, anchor, k, write, mix, path, zs, ds, q, G, BBC, g_y, g_end, g_k,
          g_dout, g_write, g_mix, g_q, g_G, g_BBC, g_states, g_anchor, bound, scales if bound else None)
    return g_states, g_anchor, g_k, g_dout.neg_(), g_write, g_mix, g_q, g_G, g_BBC


@scan_read_backward.register_fake
def _scan_read_backward_fake(anchor: list[Tensor], k: Tensor, write: Tensor, mix: Tensor, path: list[Tensor],
                             zs: list[Tensor], ds: list[Tensor], q: Tensor, G: Tensor, BBC: Tensor,
                             *_: Any) -> tuple:
    new = [t.new_empty(t.shape) for t in (k, ds[-1], write, mix, q, G, BBC)]
    return [p.new_empty(p[:, 0].shape) for p in path], [a.new_empty(a.shape) for a in anchor], *new


def _scan_setup(ctx: Any, inputs: tuple, output: tuple) -> None:
    """Saves what the backward reads; unused outputs (the record) get no gradient, so none is zero-filled."""
    _, anchor, k, _, write, mix, q, G, BBC, bound = inputs
    _, end, path, zs, ds, scales = output
    ctx.depth, ctx.bound = len(anchor), bound
    ctx.save_for_backward(*anchor, k, write, mix, q, G, BBC, scales, *path, *zs, *ds)
    ctx.set_materialize_grads(False)


def _scan_autograd(ctx: Any, g_y: Tensor | None, g_end: list[Tensor | None], *_: Any) -> tuple:
    depth, saved = ctx.depth, ctx.saved_tensors
    anchor, (k, write, mix, q, G, BBC, scales) = list(saved[:depth]), saved[depth : depth + 7]
    path, zs, ds = (list(x) for x in (saved[depth + 7 : 2 * depth + 7], saved[2 * depth + 7 : 3 * depth + 6],
                                      saved[3 * depth + 6 :]))
    g_y = torch.zeros(q.shape[:-1] + (path[-1].shape[-1],), dtype=q.dtype) if g_y is None else g_y
    g_end = [torch.zeros_like(p[:, -1]) if g is None else g for g, p in zip(g_end, path, strict=True)]
    g_states, g_anchor, *rest = scan_read_backward(anchor, k, write, mix, path, zs, ds, q, G, BBC, g_y, g_end,
                                                   scales, ctx.bound)
    return (g_states, g_anchor, *rest, None)


scan_read_recorded.register_autograd(_scan_autograd, setup_context=_scan_setup)


@register_flop_formula([torch.ops.titans_bench.scan_read, torch.ops.titans_bench.scan_read_recorded])
def _scan_read_flops(states: list, anchor: list, k: Any, v: Any, write: Any, *_: Any, **__: Any) -> int:
    """scan_keys and read_chunks: the same products, recorded or not."""
    keys, reads, _ = _scan_flops(states, k, write)
    return keys + reads


@register_flop_formula(torch.ops.titans_bench.scan_read_backward)
def _scan_read_backward_flops(anchor: list, k: Any, write: Any, mix: Any, path: list, *_: Any, **__: Any) -> int:
    """scan_keys_backward, and autograd through read_chunks: each of its products twice over."""
    states = [p[:1] + p[2:] for p in path]  # [P, m s + 1, 2 d_l, d_{l+1}] -> the states' [P, 2 d_l, d_{l+1}]
    _, reads, back = _scan_flops(states, k, write)
    return back + 2 * reads


# ----------------------------------------------------------------------------------------------------------
# the layer's pointwise work around the scan


@operator("conv_activate_normalise")
def conv_activate_normalise(tail: Tensor, p: Tensor, weight: Tensor, bias: Tensor,
                            heads: int) -> tuple[Tensor, Tensor, Tensor]:
    """NeuralMemory.project's pointwise part: the causal depthwise conv over (tail; p) [B, K - 1 + N, 3 H dh],
    SiLU, the split into heads and the L2 norm of q and k. Returns q, k, v [B, H, N, dh]."""
    tail, p, weight, bias = _contiguous(tail, p, weight, bias)
    (batch, n, channels), kernel = p.shape, weight.shape[0]
    dh = channels // (3 * heads)
    _check_shapes("compiled conv and norms", {
        "p": (p, (batch, n, 3 * heads * dh)), "weight": (weight, (kernel, channels)),
        "tail": (tail, (batch, kernel - 1, channels)), "bias": (bias, (channels,))})
    out = _conv_fake(tail, p, weight, bias, heads)
    _call("conv_activate_normalise", p.dtype, batch, n, heads, dh, kernel, tail, p, weight, bias, out)
    return out


@conv_activate_normalise.register_fake
def _conv_fake(tail: Tensor, p: Tensor, weight: Tensor, bias: Tensor, heads: int) -> tuple[Tensor, Tensor, Tensor]:
    batch, n, channels = p.shape
    return tuple(p.new_empty(batch, heads, n, channels // (3 * heads)) for _ in range(3))


@operator("conv_activate_normalise_backward")
def conv_activate_normalise_backward(tail: Tensor, p: Tensor, weight: Tensor, bias: Tensor,
                                     grads: list[Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """From the gradients of q, k, v to those of tail, p, the conv weight and its bias. The activations are
    recomputed from the conv's inputs rather than stored."""
    tail, p, weight, bias = _contiguous(tail, p, weight, bias)
    grads = _contiguous(*grads)
    (batch, n, channels), kernel, threads = p.shape, weight.shape[0], torch.get_num_threads()
    heads = grads[0].shape[1]
    g_a = torch.empty_like(p)
    partial = p.new_zeros(threads, kernel + 1, channels)  # per thread: the weight's gradient, then the bias's
    g_tail, g_p = torch.empty_like(tail), torch.empty_like(p)
    _call("conv_activate_normalise_backward", p.dtype, batch, n, heads, channels // (3 * heads), kernel, tail, p,
          weight, bias, grads, g_a, partial, g_tail, g_p)
    sums = partial.sum(0)
    return g_tail, g_p, sums[:kernel], sums[kernel].clone()  # outputs of an operator may not share memory


@conv_activate_normalise_backward.register_fake
def _conv_backward_fake(tail: Tensor, p: Tensor, weight: Tensor, bias: Tensor, grads: list[Tensor]) -> tuple:
    return tuple(t.new_empty(t.shape) for t in (tail, p, weight, bias))


def _conv_setup(ctx: Any, inputs: tuple, output: tuple) -> None:
    ctx.save_for_backward(*inputs[:4])


def _conv_autograd(ctx: Any, *grads: Tensor) -> tuple:
    return (*conv_activate_normalise_backward(*ctx.saved_tensors, list(grads)), None)


conv_activate_normalise.register_autograd(_conv_autograd, setup_context=_conv_setup)


@operator("norm_gate")
def norm_gate(y: Tensor, weight: Tensor, logits: Tensor, eps: float) -> Tensor:
    """NeuralMemory.finish's pointwise part: each head's read y [B, H, N, dh] RMS-normed with `weight`, laid out
    tokens major and gated by sigmoid(logits) [B, N, H dh]."""
    y, weight, logits = _contiguous(y, weight, logits)
    batch, heads, n, dh = y.shape
    _check_shapes("compiled output norm and gate", {"weight": (weight, (dh,)),
                                                    "logits": (logits, (batch, n, heads * dh))})
    out = torch.empty_like(logits)
    _call("norm_gate", y.dtype, batch, n, heads, dh, eps, y, weight, logits, out)
    return out


@norm_gate.register_fake
def _norm_gate_fake(y: Tensor, weight: Tensor, logits: Tensor, eps: float) -> Tensor:
    return logits.new_empty(logits.shape)


@operator("norm_gate_backward")
def norm_gate_backward(y: Tensor, weight: Tensor, logits: Tensor, eps: float,
                       g_out: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """From the gradient of norm_gate's output to those of y, weight and logits."""
    y, weight, logits, g_out = _contiguous(y, weight, logits, g_out)
    batch, heads, n, dh = y.shape
    g_y, g_logits, partial = torch.empty_like(y), torch.empty_like(logits), y.new_zeros(torch.get_num_threads(), dh)
    _call("norm_gate_backward", y.dtype, batch, n, heads, dh, eps, y, weight, logits, g_out, g_y, g_logits, partial)
    return g_y, partial.sum(0), g_logits


@norm_gate_backward.register_fake
def _norm_gate_backward_fake(y: Tensor, weight: Tensor, logits: Tensor, *_: Any) -> tuple[Tensor, Tensor, Tensor]:
    return tuple(t.new_empty(t.shape) for t in (y, weight, logits))


def _norm_gate_setup(ctx: Any, inputs: tuple, output: Tensor) -> None:
    ctx.save_for_backward(*inputs[:3])
    ctx.eps = inputs[3]


def _norm_gate_autograd(ctx: Any, g_out: Tensor) -> tuple:
    return (*norm_gate_backward(*ctx.saved_tensors, ctx.eps, g_out), None)


norm_gate.register_autograd(_norm_gate_autograd, setup_context=_norm_gate_setup)
register_flop_formula([torch.ops.titans_bench.norm_gate, torch.ops.titans_bench.norm_gate_backward,
                       torch.ops.titans_bench.conv_activate_normalise,
                       torch.ops.titans_bench.conv_activate_normalise_backward])(_nothing)
