"""The memory's chunk loops as compiled code (native_scan.cpp), for CPU tensors: the sequential key scan with
the queries read during it, one reverse pass for the backward of both, and the gate coefficients; and the
layer's pointwise work around them (the conv, SiLU and q/k norms before, the output norm and gate after).

The torch loop in neural_memory.py issues some 10 (forward) and 25 (backward) tiny kernels per chunk; at
these sizes each costs more in dispatch than in arithmetic, and none can use a second core. The compiled
loops run every (batch, head) recurrence to the end on one of torch's OpenMP threads. They are built on
first use with the system C++ compiler into a per-user cache (TITANS_BENCH_CACHE, default
~/.cache/titans-bench) and loaded with ctypes; without a compiler the torch loops are used, with a warning
that says why.
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

import torch
from torch import Tensor

SOURCE = Path(__file__).with_name("native_scan.cpp")
COMPILER = os.environ.get("CXX", "g++")
# -ffast-math lets the compiler call glibc's vector exp; it is given to the compile step only, so the
# shared library is not linked with crtfastmath, which would flush subnormals for the whole process
COMPILE_FLAGS = ["-O3", "-march=native", "-ffast-math", "-fopenmp", "-std=c++17", "-fPIC"]
SUFFIX = {torch.float32: "f32", torch.float64: "f64"}


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
    try:
        return ctypes.CDLL(str(build()))
    except (OSError, RuntimeError) as err:
        warnings.warn(f"the compiled memory scan is unavailable, using the slower torch loop: {err}", stacklevel=2)
        return None


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


def _pointers(tensors: list[Tensor] | tuple[Tensor, ...]) -> ctypes.Array:
    return (ctypes.c_void_p * len(tensors))(*(t.data_ptr() for t in tensors))


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


def _pointer(t: Tensor | None) -> ctypes.c_void_p:
    return ctypes.c_void_p(None if t is None else t.data_ptr())


def _int(*values: int) -> list[ctypes.c_int64]:
    return [ctypes.c_int64(v) for v in values]


def _float(dtype: torch.dtype, value: float) -> ctypes.c_float | ctypes.c_double:
    return (ctypes.c_float if dtype == torch.float32 else ctypes.c_double)(value)


def _forward(states: list[Tensor], anchor: list[Tensor], k: Tensor, v: Tensor, write: Tensor, mix: Tensor,
             q: Tensor, G: Tensor, BBC: Tensor, y: Tensor, recording: tuple[list[Tensor], ...] | None,
             end: list[Tensor] | None, bound: float, scales: Tensor | None) -> None:
    """Recording: (path, zs, ds) to fill, and the clip scales when bound > 0; else `end` to fill. The reads go to
    y either way."""
    anchor, states = [t.contiguous() for t in anchor], [t.contiguous() for t in states]
    path, zs, ds = (_pointers(x) for x in recording) if recording else (None, None, None)
    dims, widths = _dims(states, k, write, mix, q, G, BBC, v)
    fn = getattr(library(), f"scan_forward_{SUFFIX[k.dtype]}")
    fn(*_int(*dims), widths, _pointers(states), _pointers(anchor), *map(_pointer, (k, v, write, mix)), path, zs, ds,
       *map(_pointer, (q, G, BBC, y)), _pointers(end) if end else None, _float(k.dtype, bound), _pointer(scales),
       ctypes.c_int64(torch.get_num_threads()))


def scan_and_read(states: list[Tensor], anchor: list[Tensor], k: Tensor, v: Tensor, write: Tensor, mix: Tensor,
                  q: Tensor, G: Tensor, BBC: Tensor, bound: float = 0.0) -> tuple[Tensor, list[Tensor]]:
    """Inference: neural_memory.scan_keys with every sub-chunk's queries read from the running state as it
    goes (the math of read_chunks), so that no state per sub-chunk is stored. Layouts are pairs major (see
    native_scan.cpp): k, v [B H, m, c, d], q [B H, m s, r, d_0], G, BBC, write and mix per sub-chunk
    [B H, m s, ...]. `bound` > 0 clips each key's d as neural_memory.scan_keys does. Returns the reads
    [B H, m s, r, d_L] and the end states."""
    k, v, write, mix, q, G, BBC = (t.contiguous() for t in (k, v, write, mix, q, G, BBC))
    y = q.new_empty(*q.shape[:-1], states[-1].shape[-1])
    end = [torch.empty_like(s) for s in states]
    _forward(states, anchor, k, v, write, mix, q, G, BBC, y, None, end, bound, None)
    return y, end


def scan_and_read_recorded(
    states: list[Tensor], anchor: list[Tensor], k: Tensor, v: Tensor, write: Tensor, mix: Tensor, q: Tensor,
    G: Tensor, BBC: Tensor, bound: float = 0.0,
) -> tuple[Tensor, list[Tensor], list[Tensor], list[Tensor], Tensor | None]:
    """Training: scan_and_read that also records what the backward needs, as neural_memory.scan_keys does:
    the states before every sub-chunk and after the last ([B H, m s + 1, 2 d_l, d_{l+1}]), the keys' z_l
    and (clipped) d_l ([B H, m, c, d_{l+1}]), and with a bound the clip scales [B H, m, c]. Returns y, path, zs,
    ds, scales."""
    k, v, write, mix, q, G, BBC = (t.contiguous() for t in (k, v, write, mix, q, G, BBC))
    pairs, m, c, _ = k.shape
    subs = write.shape[1] // m
    path = [s.new_empty(pairs, m * subs + 1, *s.shape[1:]) for s in states]
    zs = [k.new_empty(pairs, m, c, s.shape[-1]) for s in states[:-1]]
    ds = [k.new_empty(pairs, m, c, s.shape[-1]) for s in states]
    y = q.new_empty(*q.shape[:-1], states[-1].shape[-1])
    scales = k.new_empty(pairs, m, c) if bound else None
    _forward(states, anchor, k, v, write, mix, q, G, BBC, y, (path, zs, ds), None, bound, scales)
    return y, path, zs, ds, scales


def scan_and_read_backward(anchor: list[Tensor], k: Tensor, write: Tensor, mix: Tensor, path: list[Tensor],
                           zs: list[Tensor], ds: list[Tensor], q: Tensor, G: Tensor, BBC: Tensor, g_y: Tensor,
                           g_end: list[Tensor], scales: Tensor | None = None, bound: float = 0.0) -> tuple:
    """The backward of scan_and_read_recorded, chunk by chunk in reverse: each chunk's reads are recomputed
    and taken back first, then the chunk's writes and keys. Returns the gradients of the start states, the
    first anchor, k, v, write, mix, q, G and BBC."""
    anchor = [t.contiguous() for t in anchor]
    k, write, mix, q, G, BBC = (t.contiguous() for t in (k, write, mix, q, G, BBC))
    g_y = g_y.contiguous()  # held in a name: a temporary's memory could be freed before the call reads it
    dims, widths = _dims(path, k, write, mix, q, G, BBC)
    g_end = [g.contiguous() for g in g_end]
    g_k, g_dout = torch.empty_like(k), torch.empty_like(ds[-1])
    g_write, g_mix = torch.zeros_like(write), torch.zeros_like(mix)
    g_q, g_G, g_BBC = torch.empty_like(q), torch.empty_like(G), torch.empty_like(BBC)
    g_states = [torch.empty_like(p[:, 0]) for p in path]
    g_anchor = [torch.empty_like(a) for a in anchor]
    fn = getattr(library(), f"scan_backward_{SUFFIX[k.dtype]}")
    fn(*_int(*dims), widths, _pointers(anchor), *map(_pointer, (k, write, mix)), *map(_pointers, (path, zs, ds)),
       *map(_pointer, (q, G, BBC, g_y)), _pointers(g_end), *map(_pointer, (g_k, g_dout, g_write, g_mix)),
       *map(_pointer, (g_q, g_G, g_BBC)), _pointers(g_states), _pointers(g_anchor), _float(k.dtype, bound),
       _pointer(scales), ctypes.c_int64(torch.get_num_threads()))
    return g_states, g_anchor, g_k, -g_dout, g_write, g_mix, g_q, g_G, g_BBC


def coefficients(log_eta: Tensor, log_keep: Tensor, theta: Tensor) -> dict[str, Tensor]:
    """The math of neural_memory.chunk_coefficients for gates [..., r] of one dtype, contiguous."""
    lead, r = log_eta.shape[:-1], log_eta.shape[-1]
    out = {"G": log_eta.new_empty(*lead, r, r), "BBC": log_eta.new_empty(*lead, r, 2, 1),
           "mix": log_eta.new_empty(*lead, 2, 2), "write": log_eta.new_empty(*lead, 2, 1, r)}
    fn = getattr(library(), f"coefficients_{SUFFIX[log_eta.dtype]}")
    fn(*_int(log_eta.numel() // r, r), *map(_pointer, (log_eta, log_keep, theta)),
       *map(_pointer, out.values()), ctypes.c_int64(torch.get_num_threads()))
    return out


def coefficients_backward(log_eta: Tensor, log_keep: Tensor, theta: Tensor,
                          grads: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of `coefficients` with respect to the three gates; `grads` holds contiguous gradients of G,
    BBC, mix and write."""
    r = log_eta.shape[-1]
    g_eta, g_keep, g_theta = (torch.empty_like(t) for t in (log_eta, log_keep, theta))
    fn = getattr(library(), f"coefficients_backward_{SUFFIX[log_eta.dtype]}")
    fn(*_int(log_eta.numel() // r, r), *map(_pointer, (log_eta, log_keep, theta)),
       *(_pointer(grads[name]) for name in ("G", "BBC", "mix", "write")),
       *map(_pointer, (g_eta, g_keep, g_theta)), ctypes.c_int64(torch.get_num_threads()))
    return g_eta, g_keep, g_theta


def conv_activate_normalise(tail: Tensor, p: Tensor, weight: Tensor, bias: Tensor,
                            heads: int) -> tuple[Tensor, Tensor, Tensor]:
    """NeuralMemory.project's pointwise part: the causal depthwise conv over (tail; p) [B, K - 1 + N, 3 H dh],
    SiLU, the split into heads and the L2 norm of q and k. Returns q, k, v [B, H, N, dh]. All contiguous."""
    (batch, n, channels), kernel = p.shape, weight.shape[0]
    dh = channels // (3 * heads)
    _check_shapes("compiled conv and norms", {
        "p": (p, (batch, n, 3 * heads * dh)), "weight": (weight, (kernel, channels)),
        "tail": (tail, (batch, kernel - 1, channels)), "bias": (bias, (channels,))})
    out = [p.new_empty(batch, heads, n, dh) for _ in range(3)]
    fn = getattr(library(), f"conv_activate_normalise_{SUFFIX[p.dtype]}")
    fn(*_int(batch, n, heads, dh, kernel), *map(_pointer, (tail, p, weight, bias)), _pointers(out),
       ctypes.c_int64(torch.get_num_threads()))
    return tuple(out)


def conv_activate_normalise_backward(tail: Tensor, p: Tensor, weight: Tensor, bias: Tensor,
                                     grads: list[Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """From contiguous gradients of q, k, v to those of tail, p, the conv weight and its bias."""
    (batch, n, channels), kernel, threads = p.shape, weight.shape[0], torch.get_num_threads()
    heads = grads[0].shape[1]
    g_a = torch.empty_like(p)
    partial = p.new_zeros(threads, kernel + 1, channels)  # per thread: the weight's gradient, then the bias's
    g_tail, g_p = torch.empty_like(tail), torch.empty_like(p)
    fn = getattr(library(), f"conv_activate_normalise_backward_{SUFFIX[p.dtype]}")
    fn(*_int(batch, n, heads, channels // (3 * heads), kernel), *map(_pointer, (tail, p, weight, bias)),
       _pointers(grads), *map(_pointer, (g_a, partial, g_tail, g_p)), ctypes.c_int64(threads))
    sums = partial.sum(0)
    return g_tail, g_p, sums[:kernel], sums[kernel]


def norm_gate(y: Tensor, weight: Tensor, logits: Tensor, eps: float) -> Tensor:
    """NeuralMemory.finish's pointwise part: each head's read y [B, H, N, dh] RMS-normed with `weight`, laid out
    tokens major and gated by sigmoid(logits) [B, N, H dh]. All contiguous."""
    batch, heads, n, dh = y.shape
    _check_shapes("compiled output norm and gate", {"weight": (weight, (dh,)),
                                                    "logits": (logits, (batch, n, heads * dh))})
    out = torch.empty_like(logits)
    fn = getattr(library(), f"norm_gate_{SUFFIX[y.dtype]}")
    fn(*_int(batch, n, heads, dh), _float(y.dtype, eps), *map(_pointer, (y, weight, logits, out)),
       ctypes.c_int64(torch.get_num_threads()))
    return out


def norm_gate_backward(y: Tensor, weight: Tensor, logits: Tensor, eps: float,
                       g_out: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """From the contiguous gradient of norm_gate's output to those of y, weight and logits."""
    batch, heads, n, dh = y.shape
    threads = torch.get_num_threads()
    g_y, g_logits, partial = torch.empty_like(y), torch.empty_like(logits), y.new_zeros(threads, dh)
    fn = getattr(library(), f"norm_gate_backward_{SUFFIX[y.dtype]}")
    fn(*_int(batch, n, heads, dh), _float(y.dtype, eps), *map(_pointer, (y, weight, logits, g_out, g_y, g_logits,
                                                                           partial)), ctypes.c_int64(threads))
    return g_y, partial.sum(0), g_logits
