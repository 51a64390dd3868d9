"""MAC's default path (input-only work hoisted out of the segment chain) against the segment-by-segment
reference, in fp64 on random inputs: outputs, gradients, carried state, streams cut at random points."""

import pytest
import torch
from helpers import SmallWrite, graph_nodes, needs_native, node_names

import models

N = 150  # 2 segments and a part at the default segment 64

CONFIGS = [
    {},
    {"segment": 16, "memory.chunk": 4},
    {"segment": 24},  # chunks of 16 that straddle segment boundaries
    {"segment": 5, "memory.chunk": 2, "n_persistent": 0},
    {"attention": "naive", "n_persistent": 1},
    {"memory.path": "reference", "segment": 32, "memory.chunk": 8},
    {"memory.n_heads": 2, "segment": 16, "memory.chunk": 4},  # the memory's own heads, not the attention's 4
]
# heads of 15 channels: rotary leaves the last channel of each head unrotated, which the hoisted path's signed
# permutation of h's key rows must do too
ODD_HEADS = {"d_model": 60, "segment": 16, "memory.chunk": 4}


def pair(**overrides):
    torch.manual_seed(0)
    fast = models.build("mac", **overrides).double()
    reference = models.build("mac", mac_path="segment_loop", **overrides).double()
    reference.load_state_dict(fast.state_dict())
    return fast, reference


def streamed(model, x, cuts):
    state, ys = None, []
    for a, b in zip(cuts, cuts[1:], strict=False):
        y, state = model(x[:, a:b], state)
        ys.append(y)
    return torch.cat(ys, dim=1), state


def random_cuts(n, pieces, seed):
    g = torch.Generator().manual_seed(seed)
    return [0, *sorted(torch.randperm(n - 1, generator=g)[: pieces - 1].add(1).tolist()), n]


def assert_states_equal(a, b):
    for block_a, block_b in zip(a, b, strict=True):
        assert block_a["offset"] == block_b["offset"]
        for key in ("weights", "momentum", "anchor"):
            for t_a, t_b in zip(block_a["memory"][key], block_b["memory"][key], strict=True):
                torch.testing.assert_close(t_a, t_b, rtol=1e-9, atol=1e-9)
        for t_a, t_b in zip(block_a["cache"] or (), block_b["cache"] or (), strict=True):
            torch.testing.assert_close(t_a, t_b, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("overrides", [*CONFIGS, ODD_HEADS], ids=str)
def test_hoisted_path_equals_the_segment_loop_in_outputs_and_gradients(overrides):
    fast, reference = pair(**overrides)
    width = overrides.get("d_model", 64)
    x = torch.randn(2, N, width, dtype=torch.float64)
    weight = torch.randn(2, N, width, dtype=torch.float64)
    grads = []
    for model in (fast, reference):
        xi = x.clone().requires_grad_()
        y, state = model(xi)
        (y * weight).sum().backward()
        grads.append((y.detach(), state, xi.grad, {k: p.grad for k, p in model.named_parameters()}))
    (y_f, state_f, gx_f, gp_f), (y_r, state_r, gx_r, gp_r) = grads
    torch.testing.assert_close(y_f, y_r, rtol=1e-9, atol=1e-9)
    assert_states_equal(state_f, state_r)
    torch.testing.assert_close(gx_f, gx_r, rtol=1e-9, atol=1e-9)
    assert gp_f.keys() == gp_r.keys()
    for name in gp_f:  # rounding scales with a gradient's largest entry (thousands for some weights)
        scale = max(1.0, gp_r[name].abs().max().item()) if gp_r[name].numel() else 1.0
        torch.testing.assert_close(gp_f[name], gp_r[name], rtol=1e-9, atol=1e-9 * scale, msg=name)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("overrides", CONFIGS[:3], ids=str)
def test_hoisted_path_streamed_in_random_pieces_equals_the_reference_in_one_call(overrides, seed):
    fast, reference = pair(**overrides)
    x = torch.randn(2, N, 64, dtype=torch.float64)
    with torch.no_grad():
        whole, state_r = reference(x)
        pieces, state_f = streamed(fast, x, random_cuts(N, 6, seed))
        # and the reference cut the same way, continued by the hoisted path: their states are interchangeable
        cuts = random_cuts(N, 3, seed + 100)
        _, state = streamed(reference, x[:, : cuts[1]], [0, cuts[1]])
        mixed, _ = fast(x[:, cuts[1] :], state)
    torch.testing.assert_close(pieces, whole, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(mixed, whole[:, cuts[1] :], rtol=1e-9, atol=1e-9)
    assert_states_equal(state_f, state_r)


def test_hoisted_path_gradients_through_a_carried_state_equal_the_reference():
    """Training on a stream continued from a state (a cut inside a segment): gradients reach the first piece."""
    fast, reference = pair(segment=16, **{"memory.chunk": 4})
    x = torch.randn(2, 60, 64, dtype=torch.float64)
    grads = []
    for model in (fast, reference):
        xi = x.clone().requires_grad_()
        y, _ = streamed(model, xi, [0, 23, 60])
        y.square().sum().backward()
        grads.append((xi.grad, [p.grad for p in model.parameters()]))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-9, atol=1e-9)
    for g_f, g_r in zip(grads[0][1], grads[1][1], strict=True):
        torch.testing.assert_close(g_f, g_r, rtol=1e-9, atol=1e-9)


def test_unknown_mac_path_names_the_valid_ones():
    with pytest.raises(ValueError, match="hoisted, segment_loop"):
        models.build("mac", mac_path="fast")


@pytest.mark.parametrize("n", [40, 64, 150])
def test_memory_write_then_finish_equals_the_memory_layer(n):
    """MAC writes its memory segment by segment (NeuralMemory.write) and finishes all the reads in one call:
    the same outputs and state as the layer's own forward, in fp64."""
    torch.manual_seed(0)
    memory = models.build("mac", segment=16, **{"memory.chunk": 4}).double().stack.blocks[0].mixer.memory
    x = torch.randn(2, n, 64, dtype=torch.float64)
    expected, state_expected = memory(x)
    reads, state = [], memory.initial_state(2, x.dtype)
    for piece in x.split(16, dim=1):
        read, state = memory.write(piece, state)
        reads.append(read)
    torch.testing.assert_close(memory.finish(torch.cat(reads, dim=-2), x), expected, rtol=1e-9, atol=1e-9)
    assert state["offset"] == state_expected["offset"]
    torch.testing.assert_close(state["conv"], state_expected["conv"], rtol=1e-9, atol=1e-9)
    # the anchor counts only inside a chunk: at a chunk boundary the next write anchors afresh
    for key in ("weights", "momentum", "anchor") if state["offset"] else ("weights", "momentum"):
        for t, t_expected in zip(state[key], state_expected[key], strict=True):
            torch.testing.assert_close(t, t_expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("depth,dh,attention_heads", [(2, 4, 2), (1, 4, 4), (3, 5, 2)],
                         ids=["depth 2", "depth 1, the memory's own heads", "depth 3, odd heads"])
@pytest.mark.parametrize("compiled", [False, pytest.param(True, marks=needs_native)], ids=["torch", "compiled"])
def test_memory_read_backward_passes_gradcheck(depth, dh, attention_heads, compiled):
    """MAC's read in the chain has a hand-written backward (MemoryRead), its memory part in torch ops or in one
    C call each way: every input's gradient, the memory weights' included, against finite differences; an odd
    head width leaves a channel unrotated, and the attention may have other heads than the memory."""
    from models.layers import rotary_tables
    from models.mac import MemoryRead

    g = torch.Generator().manual_seed(7)
    b, heads, c, hidden = 2, 2, 3, 6
    widths = [dh] + [hidden] * (depth - 1) + [dh]

    def rand(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=g, dtype=torch.float64)).requires_grad_()

    cos, sin = rotary_tables(0, c, heads * dh // attention_heads, 10000.0, torch.float64, torch.device("cpu"))
    inputs = (rand(b, heads, c, dh), torch.rand(b, c, heads * dh, generator=g, dtype=torch.float64).requires_grad_(),
              rand(dh), *(rand(heads * dh, heads * dh, scale=0.3) for _ in range(3)))
    weights = [rand(b, heads, a, w, scale=0.5) for a, w in zip(widths, widths[1:], strict=False)]
    assert torch.autograd.gradcheck(lambda *t: MemoryRead.apply(attention_heads, compiled, *t[:6], cos, sin, *t[6:]),
                                    (*inputs, *weights))


@needs_native
def test_each_segment_of_the_chain_records_few_autograd_nodes():
    """The chain's cost guard that does not time anything: at a segment's size, autograd's per-node bookkeeping
    costs more than the arithmetic, so a segment of one block may add at most 14 nodes to a training graph (10
    now: the read, the attention and its inputs, the write; 27 with the write as torch ops around the compiled
    memory, 106 when most ops were nodes of their own; each step down shortened MAC's 16K training step)."""
    from models.mac import MemoryAsContext
    from models.titans import TitansConfig

    torch.manual_seed(0)
    block = MemoryAsContext(TitansConfig())
    nodes = [len(graph_nodes(block(torch.randn(1, n, 64, requires_grad=True))[0])) for n in (128, 192, 256)]
    assert nodes[1] - nodes[0] == nodes[2] - nodes[1] <= 14, nodes


def twin_blocks(dtype=torch.float64, **memory):
    """The same MAC block twice: its memory on the compiled code (SegmentWrite, the compiled MemoryRead) and on
    the torch ops (NeuralMemory.write and the read's torch ops, the references)."""
    from models.mac import MemoryAsContext
    from models.memory import MemoryConfig
    from models.titans import TitansConfig

    blocks = []
    for kernel in ("native", "torch"):
        torch.manual_seed(0)
        blocks.append(MemoryAsContext(TitansConfig(memory=MemoryConfig(kernel=kernel, **memory))).to(dtype))
    return blocks


@needs_native
@pytest.mark.parametrize("grad", [True, False], ids=["training", "inference"])
@pytest.mark.parametrize("sizes,memory", [
    ((64, 64), {}),  # two segments of four whole chunks
    ((32, 64), {"chunk": 32, "read_chunk": 16, "depth": 3}),  # sub-chunks
    ((5, 3), {"chunk": 8}),  # a partial chunk, then its rest (anchor carried)
    ((16, 16), {"momentum": False, "forgetting": False, "clip": 0.0, "depth": 1}),
])
def test_segment_write_equals_the_torch_ops_values_and_gradients(sizes, memory, grad):
    # MemoryAsContext.write (output projection, write norm, the memory written) twice in a chain, the second
    # reading the first's conv tail and state: every output, and the gradients of the heads a, the start state
    # and every parameter, against the torch ops in float64
    blocks = twin_blocks(**memory)
    gen = torch.Generator().manual_seed(2)
    a = [torch.randn(2, n, 64, generator=gen, dtype=torch.float64) for n in sizes]
    start = blocks[0].memory.initial_state(2, torch.float64)  # moved off the initial weights, as leaves
    for key in ("weights", "momentum"):
        start[key] = [(t.detach() + 0.1 * torch.randn(t.shape, generator=gen, dtype=torch.float64)).requires_grad_(grad)
                      for t in start[key]]
    start["anchor"] = start["weights"]
    results = []
    for block in blocks:
        leaves = [t.clone().requires_grad_(grad) for t in a]
        weights_t = block.write_weights(torch.float64)
        state, outs = start, []
        with torch.set_grad_enabled(grad):
            for piece in leaves:
                y, normed, read, state = block.write(piece, state, weights_t)
                outs += [y, normed, read]
        outs += [*state["weights"], *state["momentum"], state["conv"]]
        if grad:
            assert ("SegmentWriteBackward" in node_names(outs[-2])) == (block.memory.config.kernel == "native")
            loss = sum((o * torch.randn(o.shape, generator=torch.Generator().manual_seed(i), dtype=o.dtype)).sum()
                       for i, o in enumerate(outs))
            params = list(block.parameters())
            inputs = [*leaves, *start["weights"], *start["momentum"], *params]
            outs += [g if g is not None else torch.zeros_like(t) for g, t in
                     zip(torch.autograd.grad(loss, inputs, allow_unused=True), inputs, strict=True)]
        results.append(outs)
    for compiled, reference in zip(*results, strict=True):
        assert torch.isfinite(compiled).all()
        torch.testing.assert_close(compiled, reference, rtol=1e-10,
                                   atol=1e-10 * max(reference.abs().max().item(), 1e-3))


@needs_native
def test_compiled_mac_block_equals_the_torch_ops_on_captured_training_inputs():
    # the memory layer and input captured from training (tests/fixtures) in a MAC block: its read and write in
    # the chain at the magnitudes training reached, outputs and every gradient against the torch ops, in float64
    from pathlib import Path

    case = torch.load(Path(__file__).parent / "fixtures" / "memory_inner_loop_explodes_fp32.pt")
    config = {k: v for k, v in case["config"].items() if k != "kernel"}
    results = []
    for block in twin_blocks(**config):
        missing = block.memory.load_state_dict(case["state_dict"], strict=False).missing_keys
        assert missing == ["retrieve_q.weight"]  # an LMM's memory reads with its own queries; MAC's stay as built
        block.double()
        x = case["x"].double().requires_grad_(True)
        y, state = block(x)  # a whole segment, then 4 tokens of the next
        loss = y.pow(2).sum() + sum(w.pow(2).sum() for w in state["memory"]["weights"])
        results.append([y, *torch.autograd.grad(loss, [x, *block.parameters()])])
    names = ["y", "x", *(n for n, _ in block.named_parameters())]
    for name, compiled, reference in zip(names, *results, strict=True):
        assert torch.isfinite(reference).all() and reference.abs().max() > 0, name
        torch.testing.assert_close(compiled, reference, rtol=1e-9, atol=1e-9 * reference.abs().max().item(), msg=name)


@needs_native
@pytest.mark.parametrize("continued", [False, True])
def test_segment_write_passes_gradcheck(continued):
    from models.mac import SegmentWrite

    case = SmallWrite(continued, seed=8)
    d, rnd = case.heads * case.dh, case.rnd
    inputs = [rnd(case.batch, case.n, d), rnd(d, d, scale=0.5), rnd(d), *(rnd(d, d, scale=0.5) for _ in range(3)),
              rnd(d, 3 * case.heads, scale=0.5), rnd(3 * case.heads), rnd(case.batch, case.kernel - 1, 3 * d),
              rnd(case.kernel, 3 * d), rnd(3 * d)]
    assert torch.autograd.gradcheck(lambda *t: SegmentWrite.apply(case.spec, 1e-6, *t), (*inputs, *case.states()))
