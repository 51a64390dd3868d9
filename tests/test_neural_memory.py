"""The chunk-parallel dual form against the plain token loop, streaming, gradients, the seed rule."""

import ctypes
import functools
import itertools
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import SmallWrite, needs_native, node_names
from torch.utils.flop_counter import FlopCounterMode

from models.memory import (
    NO_MOMENTUM_LOG,
    CausalDepthwiseConv,
    MemoryConfig,
    NeuralMemory,
    chunk_coefficients,
    chunked_scan,
    l2_normalise,
    mlp_backprop,
    mlp_forward,
    native,
    reference_scan,
)
from models.memory.chunked import KeyScan, read_chunks, to_subchunks
from models.memory.layer import ShiftedProducts
from models.memory.native import use_native

FIXTURES = Path(__file__).parent / "fixtures"
KERNELS = ["torch", pytest.param("native", marks=needs_native)]


def scan_inputs(depth, n=101, momentum=True, forgetting=True, b=2, h=3, dh=8, hidden=12, eta_scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    widths = [dh] + [hidden] * (depth - 1) + [dh]
    weights = [rnd(b, h, i, o) / i**0.5 for i, o in zip(widths, widths[1:], strict=False)]
    momentum_state = [0.01 * rnd(*w.shape) for w in weights]
    q, k, v = (l2_normalise(rnd(b, h, n, dh)) for _ in range(3))
    log_eta = F.logsigmoid(eta_scale * rnd(b, h, n)) if momentum else torch.full_like(rnd(b, h, n), NO_MOMENTUM_LOG)
    log_keep = F.logsigmoid(-2 * rnd(b, h, n)) if forgetting else torch.zeros(b, h, n, dtype=torch.float64)
    theta = 0.2 * torch.sigmoid(rnd(b, h, n))
    return weights, momentum_state, q, k, v, log_eta, log_keep, theta


def run(scan, chunk, inputs, dtype=torch.float64):
    w, s, *rest = (x if isinstance(x, torch.Tensor) else x for x in inputs)
    cast = [[t.to(dtype) for t in w], [t.to(dtype) for t in s]]
    tensors = [t.to(dtype) for t in rest]
    return scan(cast[0], cast[1], cast[0], 0, chunk, *tensors)


def rel_err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


CASES = list(itertools.product([1, 4, 16, 64], [1, 2, 3], [True, False], [True, False]))


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("chunk,depth,momentum,forgetting", CASES)
def test_chunk_parallel_equals_token_loop_fp64(chunk, depth, momentum, forgetting, kernel):
    inputs = scan_inputs(depth, momentum=momentum, forgetting=forgetting)
    y_ref, w_ref, s_ref, _ = run(reference_scan, chunk, inputs)
    y, w, s, _ = run(functools.partial(chunked_scan, kernel=kernel), chunk, inputs)
    assert torch.isfinite(y_ref).all() and rel_err(y, y_ref) < 1e-9
    for a, b in zip(w + s, w_ref + s_ref, strict=True):
        assert rel_err(a, b) < 1e-9


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("chunk,depth,momentum,forgetting", CASES)
def test_chunk_parallel_in_fp32_is_within_1e_5_of_the_exact_loop(chunk, depth, momentum, forgetting, kernel):
    inputs = scan_inputs(depth, momentum=momentum, forgetting=forgetting)
    y_ref = run(reference_scan, chunk, inputs)[0]
    assert rel_err(run(functools.partial(chunked_scan, kernel=kernel), chunk, inputs, torch.float32)[0], y_ref) < 1e-5


def test_fast_decaying_momentum_in_large_chunks_stays_accurate_in_fp32():
    # eta ~ 0.02: A_t spans 1e-100 over a chunk of 64; a cumsum-difference form would lose every digit
    inputs = scan_inputs(2, n=128, eta_scale=0.1)
    inputs = (*inputs[:5], torch.full_like(inputs[5], -4.0), *inputs[6:])
    y_ref = run(reference_scan, 64, inputs)[0]
    assert rel_err(run(chunked_scan, 64, inputs, torch.float32)[0], y_ref) < 1e-5


def test_gate_coefficients_use_the_widest_gate_precision():
    _, _, _, _, _, log_eta, log_keep, theta = scan_inputs(1, n=16)
    wide = chunk_coefficients(log_eta, log_keep, theta)
    mixed = chunk_coefficients(log_eta.float(), log_keep, theta)  # e.g. a constant "momentum off" gate in fp32
    torch.testing.assert_close(mixed["BBC"], wide["BBC"], rtol=1e-6, atol=0)
    assert (mixed["BBC"][..., 0, :] == wide["BBC"][..., 0, :]).all()  # B depends on log_keep alone: exact


def test_explicit_backprop_equals_autograd():
    weights, _, _, k, v, *_ = scan_inputs(3, n=5)
    weights = [w.clone().requires_grad_(True) for w in weights]
    hs, slopes = mlp_forward(weights, k)
    grads = torch.autograd.grad((hs[-1] - v).pow(2).sum(), weights)
    ds = mlp_backprop(weights, slopes, 2 * (hs[-1] - v))
    for h, d, g in zip(hs, ds, grads, strict=False):
        torch.testing.assert_close(h.transpose(-1, -2) @ d, g)


def test_gradcheck_through_the_inner_updates():
    weights, mom, q, k, v, log_eta, log_keep, theta = scan_inputs(2, n=7, b=1, h=1, dh=3, hidden=4)
    leaves = [t.clone().requires_grad_(True) for t in (*weights, q, k, v, log_eta, log_keep, theta)]

    def f(w1, w2, q, k, v, le, lk, th):
        return chunked_scan([w1, w2], mom, [w1, w2], 0, 3, q, k, v, le, lk, th)[0]

    assert torch.autograd.gradcheck(f, leaves, eps=1e-6, atol=1e-6)


GRAD_CASES = [(chunk, read, depth, momentum) for chunk, read in ((1, 16), (4, 16), (16, 16), (16, 4), (32, 8))
              for depth in (1, 2, 3) for momentum in (True, False)]


def median_gradient_norm(weights, k, v):
    """Midway between the two middle values over keys of the inner gradient's norm at these weights: a clip there
    clips about half of them, and no key sits on the clip's kink."""
    hs, slopes = mlp_forward(weights, k)
    ds = mlp_backprop(weights, slopes, 2 * (hs[-1] - v))
    norms = sum(h.pow(2).sum(-1) * d.pow(2).sum(-1) for h, d in zip(hs[:-1], ds, strict=True)).sqrt().flatten().sort()
    middle = norms.values.numel() // 2
    return norms.values[middle - 1 : middle + 1].mean().item()


CLIP_CASES = [(4, 16, 2, True), (16, 4, 3, True), (32, 8, 1, False), (1, 16, 2, True)]


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("chunk,read_chunk,depth,momentum,clip", [(*case, False) for case in GRAD_CASES]
                         + [(*case, True) for case in CLIP_CASES])
def test_hand_written_scan_backward_equals_autograd_through_the_token_loop(chunk, read_chunk, depth, momentum, clip,
                                                                          kernel):
    # a call that starts inside a chunk (its own anchor), whole chunks cut into sub-chunks, and a partial tail;
    # with a clip at the median gradient norm, about half the keys take each branch of the clip
    weights, mom, q, k, v, log_eta, log_keep, theta = scan_inputs(depth, n=83, momentum=momentum)
    bound = median_gradient_norm(weights, k, v) if clip else 0.0
    g = torch.Generator().manual_seed(5)
    anchor = [w + 0.1 * torch.randn(w.shape, generator=g, dtype=w.dtype) for w in weights]
    leaves = [t.clone().requires_grad_(True) for t in (*weights, *mom, *anchor, q, k, v, log_eta, log_keep, theta)]
    offset = min(3, chunk - 1)
    probes = None

    def grads(scan, **kw):
        nonlocal probes
        w, s, a = (leaves[i * depth : (i + 1) * depth] for i in range(3))
        y, w_end, s_end, _ = scan(w, s, a, offset, chunk, *leaves[3 * depth :], clip=bound, **kw)
        outs = [y, *w_end, *s_end]
        probes = probes or [torch.randn(o.shape, generator=g, dtype=o.dtype) for o in outs]
        loss = sum((o * p).sum() for o, p in zip(outs, probes, strict=True))
        return torch.autograd.grad(loss, [t for t in leaves if t.requires_grad], allow_unused=True)

    expected, got = grads(reference_scan), grads(chunked_scan, read_chunk=read_chunk, kernel=kernel)
    for e, a in zip(expected, got, strict=True):
        if e is None:  # momentum off: the log eta gates have no effect
            assert a is None or a.abs().max() == 0
        else:
            torch.testing.assert_close(a, e, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("n", [2, 11, 13])
def test_gradcheck_with_sub_chunks_and_a_chunk_continued_from_an_earlier_call(kernel, n):
    # at offset 1 of chunk 4: n = 2 stays inside the continued chunk (the end anchor is the one passed in),
    # 11 continues it and adds two whole chunks, 13 also a partial tail (three groups, chained); the end
    # anchor is an output too, as the next call of a stream reads it
    weights, mom, q, k, v, log_eta, log_keep, theta = scan_inputs(3, n=n, b=1, h=1, dh=3, hidden=4)
    anchor = [0.9 * w for w in weights]
    leaves = [t.clone().requires_grad_(True) for t in (*weights, *mom, *anchor, q, k, v, log_eta, log_keep, theta)]

    def f(*t):
        y, w, s, a = chunked_scan(list(t[:3]), list(t[3:6]), list(t[6:9]), 1, 4, *t[9:], read_chunk=2, kernel=kernel)
        return (y, *w, *s, *a)

    assert torch.autograd.gradcheck(f, leaves, eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("chunk,depth", [(1, 2), (4, 1), (16, 2), (64, 3)])
def test_clipped_chunk_parallel_equals_the_clipped_token_loop_and_clips(chunk, depth, kernel):
    weights, mom, q, k, v, log_eta, log_keep, theta = scan_inputs(depth)
    bound = median_gradient_norm(weights, k, v)
    args = (weights, mom, weights, 0, chunk, q, k, v, log_eta, log_keep, theta)
    y_ref, w_ref, s_ref, _ = reference_scan(*args, clip=bound)
    y, w, s, _ = chunked_scan(*args, kernel=kernel, clip=bound)
    assert rel_err(y, y_ref) < 1e-9 and all(rel_err(a, b) < 1e-9 for a, b in zip(w + s, w_ref + s_ref, strict=True))
    assert rel_err(y, reference_scan(*args)[0]) > 1e-3  # the bound changed the result


@pytest.mark.parametrize("kernel", KERNELS)
def test_gradcheck_of_the_clipped_scan(kernel):
    weights, mom, q, k, v, log_eta, log_keep, theta = scan_inputs(2, n=11, b=1, h=2, dh=3, hidden=4)
    bound = median_gradient_norm(weights, k, v)
    leaves = [t.clone().requires_grad_(True) for t in (*weights, *mom, q, k, v, log_eta, log_keep, theta)]

    def f(*t):
        y, w, s, _ = chunked_scan(list(t[:2]), list(t[2:4]), list(t[:2]), 0, 4, *t[4:], read_chunk=2, kernel=kernel,
                                  clip=bound)
        return (y, *w, *s)

    assert torch.autograd.gradcheck(f, leaves, eps=1e-6, atol=1e-6)


def captured(name: str, **overrides) -> tuple[NeuralMemory, torch.Tensor]:
    """A memory layer and its input captured from a training run (tests/fixtures/README.md)."""
    case = torch.load(FIXTURES / name)
    layer = NeuralMemory(case["dim"], MemoryConfig(**{**case["config"], **overrides}))
    layer.load_state_dict(case["state_dict"])
    return layer, case["x"]


@needs_native
def test_compiled_float32_scan_stays_finite_where_its_hidden_pre_activations_overflow_exp():
    # captured from an LMM whose memory weights had grown until some sigmoid(z) had exp(-z) = inf in float32:
    # under -ffast-math a vectorised 1 / (1 + inf) became NaN (tests/fixtures/README.md)
    layer, x = captured("memory_sigmoid_overflow_fp32.pt", kernel="native", clip=0.0)
    with torch.no_grad():
        y = layer(x)[0]
        y_torch = captured("memory_sigmoid_overflow_fp32.pt", kernel="torch", clip=0.0)[0](x)[0]
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y, y_torch, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kernel", KERNELS)
def test_inner_gradient_clip_keeps_a_captured_exploding_memory_bounded(kernel):
    # captured from a MAL whose memory weights grew ~1e10-fold within 64 tokens in float32 (step sizes that were
    # stable at the start of training were not once the weights had grown; tests/fixtures/README.md)
    for clip, finite in ((0.0, False), (MemoryConfig().clip, True)):
        layer, x = captured("memory_inner_loop_explodes_fp32.pt", kernel=kernel, clip=clip)
        with torch.no_grad():
            y, state = layer(x)
        norm = max(w.abs().max().item() for w in state["weights"])
        assert torch.isfinite(y).all() == finite, clip
        assert (norm < 10) == finite, (clip, norm)


@needs_native
@pytest.mark.parametrize("cut,end,node", [(21, 60, "CompiledScanBackward"), (32, 48, "CompiledWriteBackward")],
                         ids=["mid-chunk", "whole chunks"])
def test_compiled_nodes_equal_the_torch_ops_on_captured_training_inputs(cut, end, node):
    # the compiled path's autograd nodes at the magnitudes training reached, in float64, over two calls chained
    # through the state, the loss reading both calls' outputs and the end state. Cut mid-chunk: a call that ends
    # inside a chunk, then one that continues it (its anchor carried; 11 tokens to the chunk boundary, 16, then
    # 12: three groups), through the projection's node and the scan's. Whole chunks: each call one group, through
    # the one-call write (CompiledWrite)
    results = []
    for kernel in ("torch", "native"):
        layer, x = captured("memory_inner_loop_explodes_fp32.pt", kernel=kernel)
        layer = layer.double()
        x = x.double().requires_grad_(True)
        y1, state = layer(x[:, :cut])
        y2, state = layer(x[:, cut:end], state)
        assert (node in node_names(y2)) == (kernel == "native")
        loss = y1.pow(2).sum() + y2.sin().sum() + sum(w.pow(2).sum() for w in
                                                      state["weights"] + state["momentum"] + state["anchor"])
        results.append([y1, y2, *torch.autograd.grad(loss, [x, *layer.parameters()])])
    for name, e, a in zip(["y1", "y2", "x", *(n for n, _ in layer.named_parameters())], *results, strict=True):
        assert torch.isfinite(e).all() and e.abs().max() > 0, name
        torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-9 * e.abs().max().item(), msg=name)


def layer_pair(depth=2, chunk=16, **kw):
    torch.manual_seed(3)
    chunked = NeuralMemory(32, MemoryConfig(depth=depth, chunk=chunk, **kw)).double()
    ref = NeuralMemory(32, MemoryConfig(depth=depth, chunk=chunk, path="reference", **kw)).double()
    ref.load_state_dict(chunked.state_dict())
    return chunked, ref


def test_layer_gradients_of_both_paths_agree_and_reach_every_parameter():
    chunked, ref = layer_pair()
    x = torch.randn(2, 45, 32, dtype=torch.float64)
    chunked(x)[0].pow(2).sum().backward()
    ref(x)[0].pow(2).sum().backward()
    for (name, p), q in zip(chunked.named_parameters(), ref.parameters(), strict=True):
        assert p.grad is not None and p.grad.abs().max() > 0, name
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-8, atol=1e-10)


def test_chunk_loops_leave_the_thread_count_as_they_found_it():
    layer = NeuralMemory(32, MemoryConfig(chunk=4)).double()
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        layer(torch.randn(1, 20, 32, dtype=torch.float64, requires_grad=True))[0].sum().backward()
        assert torch.get_num_threads() == 2
        with pytest.raises(RuntimeError), torch.no_grad():  # an error inside the loop restores it too
            KeyScan.apply(1, 0.0, torch.zeros(1, 4, 3), torch.zeros(1, 2, 3), torch.zeros(1, 1, 4, 5),
                          torch.zeros(1, 1, 4, 3), torch.zeros(1, 1, 2, 1, 4), torch.zeros(1, 1, 2, 2))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)


def scan_case(dtype, pairs=6, chunks=3, c=8, subs=2, widths=(8, 16, 32, 8), seed=0):
    """Inputs of the key scan and the reads, on widths the compiled loops have fixed-size products for (8, 16,
    32) or not (6, 12), in `dtype`: states, anchor, k, v, write, mix, q, G, BBC."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=g, dtype=torch.float64)).to(dtype)

    r = c // subs
    states = [rnd(pairs, 2 * a, b, scale=a**-0.5) for a, b in zip(widths, widths[1:], strict=False)]
    anchor = [s[:, : s.shape[1] // 2] + rnd(*s[:, : s.shape[1] // 2].shape, scale=0.1) for s in states]
    k, v = l2_normalise(rnd(chunks, pairs, c, widths[0])), rnd(chunks, pairs, c, widths[-1])
    write = rnd(chunks * subs, pairs, 2, 1, r, scale=0.05)
    mix = torch.tensor([[0.9, 0.3], [0.0, 0.8]], dtype=dtype) + rnd(chunks * subs, pairs, 2, 2, scale=0.01)
    q = l2_normalise(rnd(chunks * subs, pairs, r, widths[0]))
    G, BBC = rnd(chunks * subs, pairs, r, r, scale=0.1).tril(), 1 + rnd(chunks * subs, pairs, r, 2, 1, scale=0.1)
    return states, anchor, k, v, write, mix, q, G, BBC


def pairs_major(tensors):
    """scan_case's chunk-major tensors (the torch loops' layout) as views in the compiled loops' layout, pairs
    first; the states and anchors, one per pair, are the same in both."""
    return [t.transpose(0, 1) if i >= len(tensors) - 7 else t for i, t in enumerate(tensors)]


def compiled_scan_and_read(depth, bound, *tensors):
    """The training operator on scan_case's layout: what torch_scan_and_read returns, from the compiled loops."""
    states, anchor = list(tensors[:depth]), list(tensors[depth : 2 * depth])
    y, end = native.scan_read_recorded(states, anchor, *pairs_major(tensors)[2 * depth :], bound)[:2]
    return (y.transpose(0, 1), *end)


def torch_scan_and_read(depth, bound, *tensors):
    """The torch loops' composition that scan_read_recorded computes in one pass: the reads and the end states."""
    out = KeyScan.apply(depth, bound, *tensors[: 2 * depth + 4])
    path, end = out[:depth], out[depth : 2 * depth]
    zs, ds = out[2 * depth : 3 * depth - 1], out[3 * depth - 1 :]
    subs = tensors[-3].shape[0] // tensors[2 * depth].shape[0]
    hs, ds = ([to_subchunks(x, subs).flatten(0, 1) for x in xs] for xs in ([tensors[2 * depth], *map(F.silu, zs)], ds))
    return (read_chunks(path, hs, ds, tensors[-3], {"G": tensors[-2], "BBC": tensors[-1]}), *end)


@needs_native
@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("subs,widths", [(2, (8, 16, 32, 8)), (1, (6, 12, 6)), (4, (16, 16))])
def test_compiled_scan_and_reads_equal_the_torch_loops_forward_and_backward(dtype, subs, widths, clip):
    # the loss sums the reads, so their upstream gradient is a broadcast tensor with zero strides
    case = scan_case(dtype, c=8 if subs < 4 else 16, subs=subs, widths=widths)
    depth, tol = len(widths) - 1, 1e-12 if dtype == torch.float64 else 1e-5  # relative to each largest entry
    g = torch.Generator().manual_seed(1)
    probes = None
    bound = 0.0
    if clip:  # a bound at the median key gradient: both branches of the clip's backward run
        _, _, _, zs, ds, _ = native.scan_read_recorded(*pairs_major(case), 0.0)
        hs = [pairs_major(case)[2], *map(F.silu, zs)]
        norms = sum(h.pow(2).sum(-1) * d.pow(2).sum(-1) for h, d in zip(hs, ds, strict=True)).sqrt()
        bound = norms.median().item() * 1.001
        scales = native.scan_read_recorded(*pairs_major(case), bound)[-1]
        assert (scales < 1).any() and (scales == 1).any()

    def run(fn):
        nonlocal probes
        leaves = [t.clone().requires_grad_(True) for t in itertools.chain(*case[:2], case[2:])]
        outs = fn(depth, bound, *leaves)
        probes = probes or [torch.randn(o.shape, generator=g, dtype=torch.float64).to(dtype) for o in outs[1:]]
        loss = outs[0].sum() + sum((o * p).sum() for o, p in zip(outs[1:], probes, strict=True))
        return outs, torch.autograd.grad(loss, leaves)

    (expected, expected_grads), (got, got_grads) = run(torch_scan_and_read), run(compiled_scan_and_read)
    for e, a in zip((*expected, *expected_grads), (*got, *got_grads), strict=True):
        assert torch.isfinite(e).all() and rel_err(a, e) < tol
    y, end = native.scan_read(*pairs_major(case), bound)  # inference: the same reads, nothing recorded
    assert rel_err(y.transpose(0, 1), expected[0]) < tol
    assert all(rel_err(a, e) < tol for a, e in zip(end, expected[1:], strict=True))


@needs_native
@pytest.mark.parametrize("regime", ["mild", "strong decay", "momentum off"])
def test_compiled_gate_coefficients_and_their_backward_equal_chunk_coefficients(regime):
    # strong decay drives the log ratios past the clamp at -80, where no gradient passes
    g = torch.Generator().manual_seed(4)
    scale = 30.0 if regime == "strong decay" else 1.0
    log_eta = F.logsigmoid(scale * torch.randn(5, 3, 16, generator=g, dtype=torch.float64))
    if regime == "momentum off":
        log_eta = torch.full_like(log_eta, NO_MOMENTUM_LOG)
    log_keep = F.logsigmoid(-2 * scale * torch.randn(5, 3, 16, generator=g, dtype=torch.float64))
    theta = 0.2 * torch.sigmoid(torch.randn(5, 3, 16, generator=g, dtype=torch.float64))
    gates = [t.requires_grad_(True) for t in (log_eta, log_keep, theta)]
    expected = chunk_coefficients(*gates)
    got = dict(zip(("G", "BBC", "mix", "write"), native.coefficients(*gates), strict=True))
    probes = {k: torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in expected.items()}

    def grads(co):
        return torch.autograd.grad(sum((co[k] * probes[k]).sum() for k in probes), gates)

    for k in expected:
        assert rel_err(got[k], expected[k]) < 1e-12, k
    for e, a in zip(grads(expected), grads(got), strict=True):  # with momentum off, log eta's is exactly 0
        assert (a - e).abs().max() <= 1e-10 * e.abs().max()


def twin_layers(dtype, **config):
    """The same layer twice, on the torch ops and on the compiled code."""
    layers = []
    for kernel in ("torch", "native"):
        torch.manual_seed(0)
        layers.append(NeuralMemory(24, MemoryConfig(n_heads=3, kernel=kernel, **config)).to(dtype))
    return layers


@needs_native
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("conv_kernel,n,threads", [(4, 9, 2), (4, 2, 3), (1, 5, 1)])
def test_compiled_conv_norms_and_output_gate_equal_the_torch_ops_forward_and_backward(dtype, conv_kernel, n,
                                                                                        threads):
    # n = 2 is shorter than the conv tail; one head's q is exactly zero, where the norm's clamp holds
    layers = twin_layers(dtype, conv_kernel=conv_kernel)
    g = torch.Generator().manual_seed(3)
    x, tail, y = (torch.randn(*shape, generator=g, dtype=dtype) for shape in
                  ((2, n, 24), (2, conv_kernel - 1, 72), (2, 3, n, 8)))
    tail[..., 8:16] = 0
    for layer in layers:
        with torch.no_grad():
            layer.qkv.weight[8:16] = 0
            layer.conv.bias[8:16] = 0
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    results, probes = [], None
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for layer in layers:
            leaves = [t.clone().requires_grad_(True) for t in (x, tail, y)]
            tail, p, logits = layer.projections(leaves[0], {"conv": leaves[1]})
            outs, new_tail = list(layer.project(tail, p, logits)), layer.tail_after(tail, p)
            outs.append(layer.finish(leaves[2], leaves[0]))
            probes = probes or [torch.randn(o.shape, generator=g, dtype=dtype) for o in outs]
            loss = sum((o * p).sum() for o, p in zip(outs, probes, strict=True)) + new_tail.sum()
            params = [layer.qkv.weight, layer.conv.weight, layer.conv.bias, layer.out_norm, layer.out_gate.weight]
            results.append([*outs, new_tail, *torch.autograd.grad(loss, leaves + params)])
    finally:
        torch.set_num_threads(previous)
    assert results[0][0][:, 1].abs().max() == 0  # the zero head
    for e, a in zip(*results, strict=True):
        assert torch.isfinite(e).all() and (e.numel() == 0 or rel_err(a, e) < tol)


def written(layer, x, state, grad):
    """A write of x after `state` (cloned to leaves): its reads, end state and, with grad, the gradients of a
    loss that reads all of them, with respect to x, the state and the layer's parameters."""
    state = {**state, **{k: [t.detach().clone().requires_grad_(grad) for t in state[k]]
                         for k in ("weights", "momentum", "anchor")}}
    x = x.clone().requires_grad_(grad)
    with torch.set_grad_enabled(grad):
        y, new = layer.write(x, state)
    outs = [y, *new["weights"], *new["momentum"], *new["anchor"]]
    if not grad:
        return outs, y
    probes = [torch.randn(o.shape, generator=torch.Generator().manual_seed(i), dtype=o.dtype)
              for i, o in enumerate(outs)]
    loss = sum((o * p).sum() for o, p in zip(outs, probes, strict=True)) + new["weights"][0].pow(2).sum()
    leaves = [x, *state["weights"], *state["momentum"], *state["anchor"], *layer.parameters()]
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    return outs + [g if g is not None else torch.zeros_like(t) for g, t in zip(grads, leaves, strict=True)], y


@needs_native
@pytest.mark.parametrize("grad", [True, False], ids=["training", "inference"])
@pytest.mark.parametrize("n,offset,config", [
    (64, 0, {}),  # a MAC segment: four whole chunks
    (64, 0, {"chunk": 32, "read_chunk": 16, "depth": 3}),  # sub-chunks
    (5, 0, {}),  # one partial chunk
    (5, 3, {"chunk": 8}),  # the rest of a chunk begun in the call before: its anchor carried
    (32, 0, {"momentum": False, "forgetting": False, "clip": 0.0, "depth": 1}),
])
def test_one_call_write_equals_the_torch_ops_values_and_gradients(n, offset, config, grad):
    # CompiledWrite: conv, gates, coefficients and scan in one C call each way, taken by a write that is one
    # group of chunks; held in float64 to the torch ops of the same layer, every output and every gradient
    layers = twin_layers(torch.float64, **config)
    gen = torch.Generator().manual_seed(4)
    before, x = (torch.randn(2, size, 24, generator=gen, dtype=torch.float64) for size in (offset, n))
    results = []
    for layer in layers:
        state = layer.initial_state(2, torch.float64)
        with torch.no_grad():
            if offset:
                _, state = layer.write(before, state)
        outs, y = written(layer, x, state, grad)
        results.append(outs)
    if grad:
        assert "CompiledWriteBackward" in node_names(y)
    for e, a in zip(*results, strict=True):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10 * max(e.abs().max().item(), 1e-3))


@needs_native
@pytest.mark.parametrize("continued", [False, True])
def test_one_call_write_passes_gradcheck(continued):
    from models.memory.compiled import CompiledWrite

    case = SmallWrite(continued, seed=6)
    channels, rnd = 3 * case.heads * case.dh, case.rnd
    inputs = [rnd(case.batch, case.kernel - 1, channels), rnd(case.batch, case.n, channels),
              rnd(case.kernel, channels), rnd(channels), rnd(case.batch, case.n, 3 * case.heads)]
    assert torch.autograd.gradcheck(lambda *t: CompiledWrite.apply(case.spec, *t), (*inputs, *case.states()))


@needs_native
def test_one_call_write_refuses_tensors_of_other_shapes():
    spec = native.WriteSpec(m=2, c=4, subs=1, heads=2, max_lr=0.5, momentum=True, forgetting=True, bound=0.0)
    weights = [torch.zeros(1, 2, 3, 3)]
    with pytest.raises(ValueError, match=r"compiled memory write: logits \(1, 8, 5\) \(expected \(1, 8, 6\)\)"):
        native.write_forward(spec, torch.zeros(1, 3, 18), torch.zeros(1, 8, 18), torch.zeros(4, 18), torch.zeros(18),
                             torch.zeros(1, 8, 5), weights, weights, weights, recording=False)


@needs_native
def test_compiled_conv_norms_and_output_gate_pass_gradcheck():
    g = torch.Generator().manual_seed(5)
    tail, p, weight, bias = (torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=True)
                             for shape in ((2, 2, 12), (2, 5, 12), (3, 12), (12,)))
    assert torch.autograd.gradcheck(lambda *t: native.conv_activate_normalise(*t, 2), (tail, p, weight, bias))
    y, weight, logits = (torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=True)
                         for shape in ((2, 2, 5, 3), (3,), (2, 5, 6)))
    assert torch.autograd.gradcheck(lambda *t: native.norm_gate(*t, 1e-6), (y, weight, logits))


@needs_native
def test_compiled_loops_give_the_same_bits_on_any_number_of_threads():
    # six (batch, head) pairs over 1, 4 and 6 threads: uneven shares, every pair computed exactly once
    states, anchor, *rest = pairs_major(scan_case(torch.float64))
    case = [states, anchor, *(t.contiguous() for t in rest)]
    k, v, write, mix, q, G, BBC = case[2:]
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 4, 6):
            torch.set_num_threads(n)
            y, _, path, zs, ds, scales = native.scan_read_recorded(*case, 2.0)
            grads = native.scan_read_backward(anchor, k, write, mix, path, zs, ds, q, G, BBC,
                                              torch.ones_like(y), [p[:, -1] for p in path], scales, 2.0)
            flat = [y, *path, *zs, *ds, scales, *itertools.chain(*(g if isinstance(g, list) else [g] for g in grads))]
            results.append(torch.cat([t.flatten() for t in flat]))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(r, results[0]) for r in results[1:])


@needs_native
def test_every_entry_point_of_the_library_is_declared_for_both_dtypes():
    # ctypes passes undeclared arguments as 32-bit ints and reads results as such: an undeclared size function
    # once returned the size of the wrong record, and the write ran past its end
    lib = native.library()
    for suffix in native.SCALARS:
        for name, signature in native.SIGNATURES.items():
            fn = getattr(lib, f"{name}_{suffix}")
            assert fn.argtypes is not None and len(fn.argtypes) == len(signature.replace(" ", "")), (name, suffix)
        size = getattr(lib, f"write_record_size_{suffix}")
        assert size.restype is ctypes.c_int64 and len(size.argtypes) == len(native.RECORD_SIZE.replace(" ", ""))


@needs_native
def test_compiled_code_refuses_tensors_of_other_shapes_instead_of_reading_out_of_bounds():
    with pytest.raises(ValueError, match=r"pairs-major layout .*write \(6, 12, 2, 1, 4\) \(expected \(3, 12"):
        native.scan_read(*scan_case(torch.float32, pairs=12, chunks=3), 0.0)  # chunk-major: [m, P, ...]
    with pytest.raises(ValueError, match=r"conv and norms: weight \(4, 70\) \(expected \(4, 72\)\)"):
        native.conv_activate_normalise(torch.zeros(2, 3, 72), torch.zeros(2, 5, 72), torch.zeros(4, 70),
                                            torch.zeros(72), 3)
    with pytest.raises(ValueError, match=r"norm and gate: logits \(2, 5, 16\) \(expected \(2, 5, 24\)\)"):
        native.norm_gate(torch.zeros(2, 3, 5, 8), torch.ones(8), torch.zeros(2, 5, 16), 1e-6)


@needs_native
def test_compiled_loops_leave_the_callers_subnormal_handling_alone():
    # flushes subnormals inside, on its own threads only
    native.scan_read(*pairs_major(scan_case(torch.float32)), 0.0)
    tiny = torch.tensor([1e-39], dtype=torch.float32)
    assert (tiny * 1.5).item() > 0


@pytest.mark.parametrize("kernel", KERNELS)
def test_a_nan_reaches_the_outputs_and_gradients_so_divergence_is_seen(kernel):
    # the compiled loops are built with -ffast-math, which lets a compiler assume there are no NaNs
    layer = NeuralMemory(32, MemoryConfig(chunk=4, kernel=kernel))
    x = torch.randn(1, 20, 32)
    x[0, 5, 3] = float("nan")
    with torch.no_grad():
        assert torch.isnan(layer(x)[0][0, 8:]).all()
    x.requires_grad_(True)
    layer(x)[0].sum().backward()
    assert torch.isnan(x.grad).any()


def test_native_kernel_without_a_compiler_says_what_to_use_instead(monkeypatch):
    monkeypatch.setattr(native, "library", lambda: None)
    with pytest.raises(RuntimeError, match="'auto' or 'torch'"):
        use_native("native", torch.zeros(2))
    assert not use_native("auto", torch.zeros(2))


def test_a_failed_build_reports_the_compiler_error_and_falls_back_to_the_torch_loop(monkeypatch, tmp_path):
    broken = tmp_path / "broken.cpp"
    broken.write_text("this is not C++\n")
    monkeypatch.setenv("TITANS_BENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(native, "SOURCE", broken)
    with pytest.raises(RuntimeError, match="failed"):
        native.build()
    native.library.cache_clear()
    try:
        with pytest.warns(UserWarning, match="slower torch loop"):
            assert native.library() is None
        assert not use_native("auto", torch.zeros(2))
    finally:
        monkeypatch.undo()
        native.library.cache_clear()


@pytest.mark.parametrize("path,grad", [("chunked", True), ("chunked", False), ("reference", True)])
def test_layer_streams_in_random_pieces_like_one_call(path, grad):
    # without grad the compiled scan reads the queries as it goes (no stored path): the pieces then take that
    # route and the whole call the recording one, so the two are checked against each other as well
    chunked, ref = layer_pair(chunk=8)
    layer = chunked if path == "chunked" else ref
    x = torch.randn(2, 70, 32, dtype=torch.float64)
    whole = layer(x)[0]
    gen = torch.Generator().manual_seed(1)
    cuts = sorted(set(torch.randint(1, 70, (9,), generator=gen).tolist()) | {0, 1, 3, 70})
    state, out = None, []
    with torch.set_grad_enabled(grad):
        for a, b in itertools.pairwise(cuts):
            y, state = layer(x[:, a:b], state)
            out.append(y)
    torch.testing.assert_close(torch.cat(out, 1), whole, rtol=1e-10, atol=1e-10)


def test_seed_rule_as_written_ascends_while_corrected_and_titans_stay_bounded():
    weights, mom, q, k, v, log_eta, log_keep, theta = scan_inputs(1, n=40)
    k, v = k[..., :1, :].expand_as(k), v[..., :1, :].expand_as(v)  # one association, stated 40 times
    losses = {}
    for rule in ("seed", "seed_corrected", "titans"):
        diag = {key: [] for key in ("inner_loss", "grad_norm", "surprise_norm", "surprise_entropy", "memory_norm")}
        reference_scan(weights, mom, weights, 0, 1, q, k, v, log_eta, log_keep, theta, rule=rule, seed_gamma=0.1,
                       diagnostics=diag)
        losses[rule] = torch.stack(diag["inner_loss"], -1)
    first = losses["seed"][..., 0]
    assert (losses["seed"][..., -1] > 10 * first).all()  # gradient ascent: the loss runs away
    assert (losses["seed_corrected"].amax(-1) < 10 * first).all()  # descends, but alpha ~ 0.5 makes it oscillate
    assert (losses["titans"][..., -10:].mean(-1) < first).all()


def test_diagnostics_are_per_token_and_per_head():
    layer = NeuralMemory(32, MemoryConfig(chunk=4))
    diag = {key: [] for key in ("inner_loss", "grad_norm", "surprise_norm", "surprise_entropy", "memory_norm")}
    layer(torch.randn(2, 10, 32), diagnostics=diag)
    for key, values in diag.items():
        assert len(values) == 10 and values[0].shape == (2, 4), key
        assert torch.isfinite(torch.stack(values)).all()


def test_causal_depthwise_conv_equals_conv1d_with_left_padding():
    conv = CausalDepthwiseConv(6, 4).double()
    u = torch.randn(2, 3 + 20, 6, dtype=torch.float64)  # three steps of history in front
    expected = F.conv1d(u.transpose(1, 2), conv.weight.t().unsqueeze(1), conv.bias, groups=6).transpose(1, 2)
    torch.testing.assert_close(conv(u), expected, rtol=1e-12, atol=1e-12)


def test_causal_depthwise_conv_backward_passes_gradcheck():
    conv = CausalDepthwiseConv(3, 4).double()
    u = torch.randn(2, 3 + 7, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda u, w, b: ShiftedProducts.apply(u, w, b), (u, conv.weight, conv.bias))


def test_long_inputs_streamed_in_blocks_equal_one_block():
    torch.manual_seed(5)
    blocked = NeuralMemory(32, MemoryConfig(chunk=4, block=7)).double()  # blocks cut chunks apart
    whole = NeuralMemory(32, MemoryConfig(chunk=4, block=10_000)).double()
    whole.load_state_dict(blocked.state_dict())
    x = torch.randn(2, 45, 32, dtype=torch.float64)
    (y, state), (y_ref, state_ref) = blocked(x), whole(x)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    for a, b in zip(state["weights"] + state["momentum"], state_ref["weights"] + state_ref["momentum"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("bad", [dict(rule="hebbian"), dict(path="fast"), dict(kernel="cuda"), dict(depth=0),
                                 dict(chunk=0), dict(block=0)])
def test_bad_memory_config_names_what_is_valid(bad):
    with pytest.raises(ValueError):
        MemoryConfig(**bad)


def counted_flops(kernel: str, n: int, train: bool, **config) -> tuple[int, set[str]]:
    """FlopCounterMode's total over a NeuralMemory forward in inference, or a training step's forward and
    backward, and the operators it counted."""
    torch.manual_seed(0)
    layer = NeuralMemory(32, MemoryConfig(kernel=kernel, **config))
    x = torch.randn(2, n, 32, requires_grad=train)
    with FlopCounterMode(display=False) as counter, torch.set_grad_enabled(train):
        y = layer(x)[0]
        if train:
            y.square().sum().backward()
    return counter.get_total_flops(), {str(op) for op, flops in counter.get_flop_counts()["Global"].items() if flops}


@needs_native
@pytest.mark.parametrize("train", [False, True], ids=["inference", "forward+backward"])
@pytest.mark.parametrize("n,config", [(64, {}), (37, {"depth": 3, "chunk": 32, "read_chunk": 8}),
                                      (45, {"depth": 1, "chunk": 8, "clip": 0.0})])
def test_flop_counter_counts_the_compiled_operators_as_the_torch_path_it_times(n, config, train):
    # the compiled run is counted on its own operators (their FLOP formulas), not on a torch fallback
    torch_flops, _ = counted_flops("torch", n, train, **config)
    native_flops, ops = counted_flops("native", n, train, **config)
    scan = "titans_bench.scan_read_recorded" if train else "titans_bench.scan_read"
    assert {scan, "titans_bench.coefficients"} <= ops and ("titans_bench.scan_read_backward" in ops) == train
    assert native_flops == torch_flops


def operator_cases():
    """Each compiled operator with small fp64 inputs: the forwards with gradients wanted (autograd registered) or
    not (scan_read, inference only), the backwards on what their forwards give."""
    g = torch.Generator().manual_seed(6)

    def rnd(*shape, grad=True):
        return torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_(grad)

    states, anchor, *rest = pairs_major(scan_case(torch.float64))
    scan = [[t.clone().requires_grad_(True) for t in states], [t.clone().requires_grad_(True) for t in anchor],
            *(t.contiguous().requires_grad_(True) for t in rest)]
    detached = [[t.detach() for t in scan[0]], [t.detach() for t in scan[1]], *(t.detach() for t in scan[2:])]
    y, end, path, zs, ds, scales = native.scan_read_recorded(*detached, 0.3)
    anchor, (k, _, write, mix, q, G, BBC) = detached[1], detached[2:]
    gates = [rnd(3, 4, 8) for _ in range(3)]
    co = [t.detach() for t in native.coefficients(*gates)]
    conv = [rnd(2, 2, 12), rnd(2, 5, 12), rnd(3, 12), rnd(12)]
    gate = [rnd(2, 2, 5, 3), rnd(3), rnd(2, 5, 6)]
    ops = torch.ops.titans_bench
    return [
        (ops.scan_read_recorded, (*scan, 0.3)), (ops.scan_read, (*detached, 0.0)), (ops.coefficients, gates),
        (ops.conv_activate_normalise, (*conv, 2)), (ops.norm_gate, (*gate, 1e-6)),
        (ops.scan_read_backward, (anchor, k, write, mix, path, zs, ds, q, G, BBC, rnd(*y.shape, grad=False),
                                  [rnd(*e.shape, grad=False) for e in end], scales, 0.3)),
        (ops.coefficients_backward, (*(t.detach() for t in gates), *(rnd(*c.shape, grad=False) for c in co))),
        (ops.conv_activate_normalise_backward, (*(t.detach() for t in conv), [rnd(2, 2, 5, 2, grad=False)] * 3)),
        (ops.norm_gate_backward, (*(t.detach() for t in gate), 1e-6, rnd(2, 5, 6, grad=False))),
    ]


@needs_native
def test_compiled_operators_pass_torchs_operator_checks():
    # schema, shape functions against the real outputs, autograd registration, tracing with dynamic shapes
    for op, args in operator_cases():
        assert set(torch.library.opcheck(op, args).values()) == {"SUCCESS"}, op
