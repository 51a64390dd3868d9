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

At the end, entry points that compose the jobs into one call each way, for callers whose tensors are small
enough that a crossing from Python, and each torch op or thread fork, costs more than the arithmetic: a
memory write that is one group of chunks (compiled.CompiledWrite), and MAC's read and write of a segment
(models/mac.py: the memory read with the products around it, and the write from the attention's output,
their products in this file's register-blocked loops rather than threaded BLAS calls). They are plain
functions, not operators: callers take them only while no dispatch mode watches, and otherwise the operators
above or torch ops that do the same arithmetic, so FLOP counts are unchanged.
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
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.utils._python_dispatch import _get_current_dispatch_mode
from torch.utils.flop_counter import register_flop_formula

from models.memory.rule import NO_MOMENTUM_LOG

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
    "write_forward": "iiiiiw iii ppppp t ii t PPP t pP i p PP i",
    "write_backward": "iiiiiw iii ppppp t ii P t pP p PP ppppp PPP i",
    "mac_read": "iiiw ii t pPpp ppppp pppp i",
    "mac_read_backward": "iiiw ii t pPpp ppppp pppp ppp P ppp i",
    "mac_write_forward": "iiiiiw iii ppp t P pp ppp t ii t PPP t pP i pppp p PP i",
    "mac_write_backward": "iiiiiw iii ppp t P p ppp t ii P t pP pppp p PP ppp ppp P ppp pp PPP i",
}
RECORD_SIZE = "iiiiiw i"  # write_record_size: the elements of a write's record, returned
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
    for suffix, scalar in SCALARS.items():
        for name, signature in SIGNATURES.items():
            fn = getattr(lib, f"{name}_{suffix}")
            fn.argtypes = [scalar if code == "t" else C_TYPES[code] for code in signature.replace(" ", "")]
            fn.restype = None
        size = getattr(lib, f"write_record_size_{suffix}")
        size.argtypes = [C_TYPES[code] for code in RECORD_SIZE.replace(" ", "")]
        size.restype = ctypes.c_int64
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


def watched() -> bool:
    """Whether a dispatch mode (FlopCounterMode, fake tensors) sees the operators called now."""
    return _get_current_dispatch_mode() is not None


def direct(op: Any, *args: Any) -> Any:
    """Calls an operator's kernel without autograd, through the dispatcher only while a dispatch mode watches
    (FlopCounterMode, fake tensors): that is all the dispatcher adds here, and it costs some 30 us a call in
    Python, a third of the compiled scan of a 64-token segment (MAC calls it hundreds of times a step)."""
    return op(*args) if watched() else _KERNELS[op](*args)


def _call(name: str, dtype: torch.dtype, *args: Any) -> None:
    """Calls the library's `name` for `dtype` with tensors passed as their data, lists of tensors as arrays of
    it, and the thread count last. The arguments stay referenced here for the whole call, so no temporary
    tensor's memory is freed while the C code reads it."""
    def raw(x: Any) -> Any:
        if isinstance(x, Tensor):
            return x.data_ptr()
        if isinstance(x, list | tuple):  # None in a list: a null pointer (an unused output's gradient)
            return (ctypes.c_void_p * len(x))(*(None if t is None else t.data_ptr() for t in x))
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


# ----------------------------------------------------------------------------------------------------------
# NeuralMemory.write of a call that is one group of chunks, in one crossing each way (compiled.CompiledWrite).
# Not operators: while a dispatch mode watches, the layer calls the operators above instead, which do the same
# arithmetic (the jobs these entries compose) and carry the FLOP formulas and shape functions.


class WriteSpec(NamedTuple):
    """What a write needs besides its tensors: the group (`m` chunks of `c` tokens read in `subs` sub-chunks),
    the memory heads, and the gate settings and clip bound of MemoryConfig (`bound`: chunked_scan's clip / 2)."""

    m: int
    c: int
    subs: int
    heads: int
    max_lr: float
    momentum: bool
    forgetting: bool
    bound: float


class Record(NamedTuple):
    """What a write's backward reads: `main` (native_scan.cpp's WriteRecord lays it out) and, when recording, the
    state before every sub-chunk [B H, m s + 1, 2 d_l, d_{l+1}] per layer, then the keys' z per hidden layer and d
    per layer [B H, N, d_{l+1}] as separate tensors: one record of them all is tens of megabytes at training
    batch sizes, which glibc maps afresh on every call (page faults that cost as much as the scan)."""

    main: Tensor
    parts: list[Tensor]


def _write_dims(spec: WriteSpec, weights: list[Tensor], batch: int) -> tuple[list[int], ctypes.Array]:
    widths = [w.shape[-2] for w in weights] + [weights[-1].shape[-1]]
    return ([len(weights), spec.m, spec.subs, batch * spec.heads, spec.c],
            (ctypes.c_int64 * len(widths))(*widths))


def _state_shapes(weights: list[Tensor], momentum: list[Tensor], anchor: list[Tensor], batch: int,
                  heads: int) -> dict[str, tuple[Tensor, tuple[int, ...]]]:
    """A write's states as the C code indexes them, [B, H, d_l, d_{l+1}] per layer, for _check_shapes."""
    return {f"{name}[{layer}]": (t, (batch, heads, *w.shape[-2:]))
            for name, states in (("weights", weights), ("momentum", momentum), ("anchor", anchor))
            for layer, (t, w) in enumerate(zip(states, weights, strict=True))}


def _record(spec: WriteSpec, weights: list[Tensor], batch: int, recording: bool, dims: list[int],
            widths: ctypes.Array) -> Record:
    main = weights[0].new_empty(getattr(library(), f"write_record_size_{SUFFIX[weights[0].dtype]}")(
        *dims, widths, recording))
    if not recording:
        return Record(main, [])
    pairs, n = batch * spec.heads, spec.m * spec.c
    path = [w.new_empty(pairs, spec.m * spec.subs + 1, 2 * w.shape[-2], w.shape[-1]) for w in weights]
    return Record(main, path + [w.new_empty(pairs, n, w.shape[-1]) for w in weights[:-1] + weights])


def write_forward(spec: WriteSpec, tail: Tensor, p: Tensor, conv_w: Tensor, conv_b: Tensor, logits: Tensor,
                  weights: list[Tensor], momentum: list[Tensor], anchor: list[Tensor],
                  recording: bool) -> tuple[Tensor, list[Tensor], list[Tensor], Record]:
    """The conv and norms, the gates, the coefficients and the scan with its reads, for contiguous tail [B, K - 1,
    3 D], projections p [B, N, 3 D] (N = m c), conv weight [K, 3 D] and bias, gate logits [B, N, 3 H] and states
    [B, H, R, C] per layer. Returns the reads [B, H, N, d_L], the end weights and momentum, and the record
    (what write_backward reads when `recording`)."""
    (batch, n, channels), kernel, heads = p.shape, conv_w.shape[0], spec.heads
    dh = channels // (3 * heads)
    expected = {"p": (p, (batch, spec.m * spec.c, 3 * heads * dh)), "tail": (tail, (batch, kernel - 1, channels)),
                "conv weight": (conv_w, (kernel, channels)), "conv bias": (conv_b, (channels,)),
                "logits": (logits, (batch, n, 3 * heads)), **_state_shapes(weights, momentum, anchor, batch, heads)}
    _check_shapes("compiled memory write", expected, [] if n % spec.subs == 0 and spec.c % spec.subs == 0
                  and weights[0].shape[-2] == dh == weights[-1].shape[-1] else [f"group {spec} against n={n}"])
    dims, widths = _write_dims(spec, weights, batch)
    record = _record(spec, weights, batch, recording, dims, widths)
    y = p.new_empty(batch, heads, n, weights[-1].shape[-1])
    end_weights, end_momentum = [w.new_empty(w.shape) for w in weights], [w.new_empty(w.shape) for w in weights]
    _call("write_forward", p.dtype, *dims, widths, batch, heads, kernel, tail, p, conv_w, conv_b, logits,
          spec.max_lr, spec.momentum, spec.forgetting, NO_MOMENTUM_LOG, weights, momentum, anchor, spec.bound,
          record.main, record.parts, recording, y, end_weights, end_momentum)
    return y, end_weights, end_momentum, record


def write_backward(spec: WriteSpec, tail: Tensor, p: Tensor, conv_w: Tensor, conv_b: Tensor, logits: Tensor,
                   anchor: list[Tensor], record: Record, g_y: Tensor, g_end_weights: list[Tensor | None],
                   g_end_momentum: list[Tensor | None]) -> tuple[Tensor, ...]:
    """write_forward's backward from its record and the gradients of the reads and of the end states (None: not
    used). Returns the gradients of tail, p, the conv weight and bias, the logits, then per layer those of
    the weights, momentum and anchor."""
    batch, kernel = p.shape[0], conv_w.shape[0]
    dims, widths = _write_dims(spec, anchor, batch)
    g_tail, g_p, g_conv_w, g_conv_b, g_logits = (t.new_empty(t.shape) for t in (tail, p, conv_w, conv_b, logits))
    g_weights, g_momentum, g_anchor = ([a.new_empty(a.shape) for a in anchor] for _ in range(3))
    _call("write_backward", p.dtype, *dims, widths, batch, spec.heads, kernel, tail, p, conv_w, conv_b, logits,
          spec.max_lr, spec.momentum, spec.forgetting, anchor, spec.bound, *record, g_y.contiguous(), g_end_weights,
          g_end_momentum, g_tail, g_p, g_conv_w, g_conv_b, g_logits, g_weights, g_momentum, g_anchor)
    return g_tail, g_p, g_conv_w, g_conv_b, g_logits, g_weights, g_momentum, g_anchor


# ----------------------------------------------------------------------------------------------------------
# MAC's read of a segment (models/mac.py, MemoryRead): like the write, plain functions, with the torch ops
# taken while a dispatch mode watches


def _read_dims(q: Tensor, weights: list[Tensor]) -> list[Any]:
    batch, heads, c, _ = q.shape
    widths = [w.shape[-2] for w in weights] + [weights[-1].shape[-1]]
    return [len(weights), batch * heads, c, (ctypes.c_int64 * len(widths))(*widths), heads]


def mac_read(attention_heads: int, q: Tensor, weights: list[Tensor], w_norm: Tensor, gate: Tensor, w_out_t: Tensor,
             w_k_t: Tensor, w_v_t: Tensor, cos: Tensor, sin: Tensor, eps: float) -> tuple[Tensor, ...]:
    """MemoryRead's forward for contiguous tensors: the memory MLP at the weights [B, H, d_l, d_{l+1}] on the
    queries q [B, H, c, d_0], each head's read RMS-normed with w_norm [d_L] and gated by gate [B, c, D] to u;
    h = u W_out^T, k = h W_k^T, v = h W_v^T (the weights given transposed, [D, D] each), k rotated with the
    tables' rows cos, sin [c, dha // 2]. Returns u, h [B, c, D] (what the backward reads) and k_h, v_h
    [B, A, c, D / A]."""
    batch, heads, c, _ = q.shape
    d, dh = gate.shape[-1], weights[-1].shape[-1]
    _check_shapes("compiled MAC read", {
        "gate": (gate, (batch, c, heads * dh)), "w_norm": (w_norm, (dh,)), "w_out_t": (w_out_t, (d, d)),
        "w_k_t": (w_k_t, (d, d)), "w_v_t": (w_v_t, (d, d)), "cos": (cos, (c, d // attention_heads // 2)),
        "sin": (sin, (c, d // attention_heads // 2)),
        **{f"weights[{layer}]": (w, (batch, heads, *w.shape[-2:])) for layer, w in enumerate(weights)}})
    u, h = torch.empty_like(gate), torch.empty_like(gate)
    kh, vh = (gate.new_empty(batch, attention_heads, c, d // attention_heads) for _ in range(2))
    _call("mac_read", q.dtype, *_read_dims(q, weights), attention_heads, eps, q, weights, w_norm, gate, w_out_t,
          w_k_t, w_v_t, cos, sin, u, h, kh, vh)
    return u, h, kh, vh


def mac_read_backward(attention_heads: int, q: Tensor, weights: list[Tensor], w_norm: Tensor, gate: Tensor,
                      w_out_t: Tensor, w_k_t: Tensor, w_v_t: Tensor, cos: Tensor, sin: Tensor, eps: float, u: Tensor,
                      h: Tensor, g_kh: Tensor, g_vh: Tensor) -> tuple[Tensor, ...]:
    """mac_read's backward, the MLP recomputed: the gradients of q, the gate, w_norm, W_out^T, W_k^T, W_v^T, then
    of the weights."""
    g_q, g_gate = torch.empty_like(q), torch.empty_like(gate)
    g_w = [torch.empty_like(w) for w in (w_out_t, w_k_t, w_v_t)]
    g_weights = [torch.empty_like(w) for w in weights]
    partial = q.new_zeros(torch.get_num_threads(), w_norm.shape[0])
    _call("mac_read_backward", q.dtype, *_read_dims(q, weights), attention_heads, eps, q, weights, w_norm, gate,
          w_out_t, w_k_t, w_v_t, cos, sin, u, h, g_kh.contiguous(), g_vh.contiguous(), g_q, g_gate, partial, g_weights,
          *g_w)
    return g_q, g_gate, partial.sum(0), *g_w, *g_weights


def mac_write_forward(spec: WriteSpec, a: Tensor, w_o_t: Tensor, w_norm: Tensor, eps: float, w_qkv_t: list[Tensor],
                      w_gates_t: Tensor, b_gates: Tensor, tail: Tensor, conv_w: Tensor, conv_b: Tensor,
                      weights: list[Tensor], momentum: list[Tensor], anchor: list[Tensor],
                      recording: bool) -> tuple[Tensor, ...]:
    """MAC's write of a segment from the attention's output a [B, N, D], contiguous: y = a W_o^T, the write norm
    n (weight w_norm), the memory's projections p = n W_qkv^T (W_qkv^T as q, k, v blocks [D, D]) and gate logits
    n W_g^T + b_g, then write_forward's work. Returns y, n, p [B, N, 3 D], the logits [B, N, 3 H], the reads
    [B, H, N, d_L], the end weights and momentum (lists), and the record."""
    (batch, n, d), heads = a.shape, spec.heads
    expected = {"w_o_t": (w_o_t, (d, d)), "w_norm": (w_norm, (d,)), "w_gates_t": (w_gates_t, (d, 3 * heads)),
                "b_gates": (b_gates, (3 * heads,)), "tail": (tail, (batch, conv_w.shape[0] - 1, 3 * d)),
                "conv weight": (conv_w, (conv_w.shape[0], 3 * d)), "conv bias": (conv_b, (3 * d,)),
                **{f"w_qkv_t[{j}]": (w, (d, d)) for j, w in enumerate(w_qkv_t)},
                **_state_shapes(weights, momentum, anchor, batch, heads)}
    _check_shapes("compiled MAC write", expected, [] if n == spec.m * spec.c and weights[0].shape[-2] * heads == d
                  else [f"group {spec} against a {tuple(a.shape)}"])
    dims, widths = _write_dims(spec, weights, batch)
    record = _record(spec, weights, batch, recording, dims, widths)
    y, normed, p, logits = (a.new_empty(batch, n, width) for width in (d, d, 3 * d, 3 * heads))
    reads = a.new_empty(batch, heads, n, weights[-1].shape[-1])
    end_weights, end_momentum = [w.new_empty(w.shape) for w in weights], [w.new_empty(w.shape) for w in weights]
    _call("mac_write_forward", a.dtype, *dims, widths, batch, heads, conv_w.shape[0], a, w_o_t, w_norm, eps, w_qkv_t,
          w_gates_t, b_gates, tail, conv_w, conv_b, spec.max_lr, spec.momentum, spec.forgetting, NO_MOMENTUM_LOG,
          weights, momentum, anchor, spec.bound, *record, recording, y, normed, p, logits, reads, end_weights,
          end_momentum)
    return y, normed, p, logits, reads, end_weights, end_momentum, record


def mac_write_backward(spec: WriteSpec, a: Tensor, w_o_t: Tensor, w_norm: Tensor, eps: float, w_qkv_t: list[Tensor],
                       w_gates_t: Tensor, tail: Tensor, conv_w: Tensor, conv_b: Tensor, anchor: list[Tensor],
                       record: Record, y: Tensor, normed: Tensor, p: Tensor, logits: Tensor, g_reads: Tensor,
                       g_end_weights: list[Tensor | None], g_end_momentum: list[Tensor | None], g_y: Tensor | None,
                       g_normed: Tensor | None, g_p: Tensor | None) -> tuple[Tensor, ...]:
    """mac_write_forward's backward (None: an output not used). Returns the gradients of a, W_o^T, w_norm, the
    three W_qkv^T blocks, W_g^T, b_g, the tail, the conv weight and bias, then per layer those of the weights,
    momentum and anchor (lists)."""
    batch, kernel = a.shape[0], conv_w.shape[0]
    dims, widths = _write_dims(spec, anchor, batch)
    g_a, g_w_o_t, g_w_norm, g_w_gates_t, g_tail, g_conv_w, g_conv_b = (
        t.new_empty(t.shape) for t in (a, w_o_t, w_norm, w_gates_t, tail, conv_w, conv_b))
    g_w_qkv_t, g_b_gates = [w.new_empty(w.shape) for w in w_qkv_t], a.new_empty(3 * spec.heads)
    g_weights, g_momentum, g_anchor = ([t.new_empty(t.shape) for t in anchor] for _ in range(3))
    _call("mac_write_backward", a.dtype, *dims, widths, batch, spec.heads, kernel, a, w_o_t, w_norm, eps, w_qkv_t,
          w_gates_t, tail, conv_w, conv_b, spec.max_lr, spec.momentum, spec.forgetting, anchor, spec.bound, *record,
          y, normed, p, logits, g_reads.contiguous(), g_end_weights, g_end_momentum, g_y, g_normed, g_p, g_a, g_w_o_t,
          g_w_norm, g_w_qkv_t, g_w_gates_t, g_b_gates, g_tail, g_conv_w, g_conv_b, g_weights, g_momentum, g_anchor)
    return (g_a, g_w_o_t, g_w_norm, *g_w_qkv_t, g_w_gates_t, g_b_gates, g_tail, g_conv_w, g_conv_b, g_weights,
            g_momentum, g_anchor)
