"""The memory's compiled path as few autograd nodes: chunked_scan's (the gate coefficients and the key scan
with its reads, the `native` operators, for every group of chunks of a call) as one node with one
hand-written backward, and NeuralMemory.project's pointwise part (conv, norms, gate activations) as another.

Called through autograd one operator at a time, a call records some thirty nodes (the two operators, the
concatenated states, the per-unit views and slices of every input and output), and at MAC's segment size
(64 tokens, a few hundred per training step at 16K) their bookkeeping costs several times the compiled
arithmetic. Here the forward runs the operators without autograd and saves what their backwards read; the
backward runs the groups in reverse, chaining each group's state gradient into the one before, and returns
the gradients of the inputs as chunked_scan takes them. The operators are called by `native.direct`: past
the dispatcher, or through it while a dispatch mode watches, so FlopCounterMode counts them as before. The
torch loops (`chunked`) stay the reference: tests/test_neural_memory.py holds the two equal, values and
gradients, on random and on captured training inputs.

A call that is one group of chunks (a MAC segment, a block of whole chunks: most calls) takes a shorter way
still, CompiledWrite: the projection's pointwise part and the scan in one C call each way (native.write_forward,
write_backward, composing the same jobs of native_scan.cpp), so that a write costs one node and one crossing
from Python instead of two and six, with no per-operator allocations, views and checks. The two-node path stays
for calls of several groups and for a watching dispatch mode, and the tests hold the two equal.

Layouts (see native_scan.cpp): pairs major, P = batch * heads; a group of `count` chunks of `size` tokens,
each read in `subs` sub-chunks of r = size / subs tokens, takes k, v as [P, count, size, d] and q and the
gates as [P, count subs, r, .], all views of the [B, H, n, .] inputs.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from models.memory import native
from models.memory.rule import NO_MOMENTUM_LOG


class Group(NamedTuple):
    """`count` chunks of `size` tokens from token `start` of the call, read in `subs` sub-chunks each;
    `continued`: the first chunk began in an earlier call and keeps that call's anchor."""

    start: int
    size: int
    count: int
    subs: int
    continued: bool

    @property
    def end(self) -> int:
        return self.start + self.size * self.count


def plan(n: int, offset: int, chunk: int, read_chunk: int) -> list[Group]:
    """A call of n tokens from `offset` in the stream as up to three groups of equal chunks: the rest of a chunk
    begun in an earlier call, the whole chunks, then a trailing partial chunk. A chunk that is a multiple of
    `read_chunk` is read in sub-chunks of that size."""
    groups, start = [], 0
    first = min(n, chunk - offset % chunk) if offset % chunk else 0
    whole = (n - first) // chunk
    for size, count in ((first, 1), (chunk, whole), (n - first - whole * chunk, 1)):
        if size and count:
            subs = size // read_chunk if size > read_chunk and size % read_chunk == 0 else 1
            groups.append(Group(start, size, count, subs, continued=(offset + start) % chunk != 0))
            start += size * count
    return groups


def per_unit(x: Tensor, group: Group, units: int) -> Tensor:
    """The group's tokens of x [B, H, n, ...] as [B H, units, n_group / units, ...], pairs major."""
    return x[:, :, group.start : group.end].flatten(0, 1).unflatten(1, (units, -1))


def split_states(states: list[Tensor], rows: list[int]) -> tuple[list[Tensor], list[Tensor]]:
    """Pairs-major states [B H, 2 R, C] -> weights and momentum [B H, R, C] (views)."""
    return ([s[:, :r] for s, r in zip(states, rows, strict=True)],
            [s[:, r:] for s, r in zip(states, rows, strict=True)])


def from_units(x: Tensor, batch: int, heads: int) -> Tensor:
    """[B H, units, u, ...] -> [B, H, units u, ...]: per_unit's inverse for one group."""
    return x.unflatten(0, (batch, heads)).flatten(2, 3)


def joined(parts: list[Tensor]) -> Tensor:
    """The groups' pieces of one [B, H, n, ...] tensor, in order."""
    return torch.cat(parts, dim=2) if len(parts) > 1 else parts[0]


def forward_groups(weights: list[Tensor], momentum: list[Tensor], anchor: list[Tensor], groups: list[Group],
                   q: Tensor, k: Tensor, v: Tensor, gates: tuple[Tensor, ...], bound: float,
                   saved: list[tuple] | None) -> tuple[Tensor, list[Tensor], list[Tensor], list[Tensor]]:
    """The groups in order; with `saved` a list, each group's scan is recorded and what its backward reads is
    appended. Returns the reads [B, H, n, d_L] and the end weights, momentum and anchor [B H, R, C]."""
    batch, heads = q.shape[:2]
    rows = [w.shape[-2] for w in weights]
    states = [torch.cat([w, s], -2).flatten(0, 1) for w, s in zip(weights, momentum, strict=True)]
    anchor = [a.flatten(0, 1) for a in anchor]
    ys = []
    for group in groups:
        units = group.count * group.subs
        unit_gates = [per_unit(g, group, units) for g in gates]
        G, BBC, mix, write = native.direct(native.coefficients, *unit_gates)
        kc, vc = (per_unit(x, group, group.count) for x in (k, v))
        qc = per_unit(q, group, units)
        anchor = anchor if group.continued else [s[:, :r] for s, r in zip(states, rows, strict=True)]
        if saved is None:
            y, states = native.direct(native.scan_read, states, anchor, kc, vc, write, mix, qc, G, BBC, bound)
        else:
            y, states, path, zs, ds, scales = native.direct(native.scan_read_recorded, states, anchor, kc, vc, write,
                                                                   mix, qc, G, BBC, bound)
            saved.append((unit_gates, anchor, kc, write, mix, qc, G, BBC, path, zs, ds, scales))
        ys.append(from_units(y, batch, heads))
    return joined(ys), *split_states(states, rows), anchor


class CompiledScan(torch.autograd.Function):
    """forward_groups, recorded, as one node. Inputs: depth, bound, the groups, then the tensors (weights,
    momentum, anchor per layer; q, k, v; log_eta, log_keep, theta); outputs: the reads, then the end weights,
    momentum and anchor per layer [B, H, R, C]."""

    @staticmethod
    def forward(ctx, depth: int, bound: float, groups: list[Group], *tensors: Tensor):
        weights, momentum, anchor = (list(tensors[i * depth : (i + 1) * depth]) for i in range(3))
        q, k, v, *gates = tensors[3 * depth :]
        saved: list[tuple] = []
        y, *ends = forward_groups(weights, momentum, anchor, groups, q, k, v, tuple(gates), bound, saved)
        ctx.bound, ctx.groups, ctx.groups_saved = bound, groups, saved
        ctx.shapes, ctx.dtype = [w.shape for w in weights], q.dtype  # [B, H, R, C] per layer
        ctx.set_materialize_grads(False)
        # new tensors: an output that viewed the state or an input would share its storage
        return (y, *(t.unflatten(0, q.shape[:2]).clone() for ts in ends for t in ts))

    @staticmethod
    @once_differentiable
    def backward(ctx, g_y: Tensor | None, *g_out: Tensor | None):
        shapes, saved = ctx.shapes, ctx.groups_saved
        depth, (batch, heads), rows = len(shapes), shapes[0][:2], [shape[-2] for shape in shapes]

        def pairs_major(g: Tensor | None, shape: torch.Size) -> Tensor:  # an output's gradient, zero when unused
            return (g if g is not None else torch.zeros(shape, dtype=ctx.dtype)).flatten(0, 1)

        g_states = [torch.cat([pairs_major(g_out[i], shape), pairs_major(g_out[depth + i], shape)], -2)
                    for i, shape in enumerate(shapes)]
        g_anchor = [pairs_major(g_out[2 * depth + i], shape) for i, shape in enumerate(shapes)]
        pieces: list[list[Tensor]] = []  # per group, in reverse: q, k, v, then the three gates
        for group, (unit_gates, anchor, kc, write, mix, qc, G, BBC, path, zs, ds, scales) in zip(
                reversed(ctx.groups), reversed(saved), strict=True):
            g_y_group = (qc.new_zeros(*qc.shape[:-1], path[-1].shape[-1]) if g_y is None
                         else per_unit(g_y, group, qc.shape[1]))
            g_before, g_first, g_kc, g_vc, g_write, g_mix, g_qc, g_G, g_BBC = native.direct(
                native.scan_read_backward, anchor, kc, write, mix, path, zs, ds, qc, G, BBC, g_y_group, g_states,
                scales, ctx.bound)
            g_anchor = [a + b for a, b in zip(g_first, g_anchor, strict=True)]
            if not group.continued:  # the group was anchored at its start weights
                for g_s, g_an, r in zip(g_before, g_anchor, rows, strict=True):
                    g_s[:, :r] += g_an
                g_anchor = [torch.zeros_like(a) for a in g_anchor]
            g_states = g_before
            g_gates = native.direct(native.coefficients_backward, *unit_gates, g_G, g_BBC, g_mix, g_write)
            pieces.append([from_units(t, batch, heads) for t in (g_qc, g_kc, g_vc, *g_gates)])
        g_weights, g_momentum = split_states(g_states, rows)
        inputs = (t.unflatten(0, (batch, heads)) for t in (*g_weights, *g_momentum, *g_anchor))
        return None, None, None, *inputs, *(joined(list(parts[::-1])) for parts in zip(*pieces, strict=True))


def compiled_scan(weights: list[Tensor], momentum: list[Tensor], anchor: list[Tensor], groups: list[Group],
                  q: Tensor, k: Tensor, v: Tensor, log_eta: Tensor, log_keep: Tensor, theta: Tensor,
                  bound: float) -> tuple[Tensor, list[Tensor], list[Tensor], list[Tensor]]:
    """chunked_scan's compiled path (q, k, v [B, H, n, d]; gates [B, H, n], theta already doubled as the
    loops take it): one autograd node in training, the unrecorded scan otherwise. Returns the reads
    [B, H, n, d_L] and the end weights, momentum and anchor [B, H, R, C]."""
    tensors = (*weights, *momentum, *anchor, q, k, v, log_eta, log_keep, theta)
    depth = len(weights)
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        y, *out = CompiledScan.apply(depth, bound, groups, *tensors)
        return y, *(list(out[i * depth : (i + 1) * depth]) for i in range(3))  # type: ignore[return-value]
    y, *ends = forward_groups(weights, momentum, anchor, groups, q, k, v, (log_eta, log_keep, theta), bound, None)
    return y, *([t.unflatten(0, q.shape[:2]) for t in ts] for ts in ends)  # type: ignore[return-value]


class CompiledWrite(torch.autograd.Function):
    """NeuralMemory.write after the linear projections, for a call that is one group of chunks (a MAC segment, a
    block of whole chunks): the conv and norms, the gate activations, the coefficients and the recorded scan in
    one C call (native.write_forward), the backward in another, the intermediates in one record. The same
    arithmetic as CompiledProjection then CompiledScan (the jobs of native_scan.cpp they call, composed), in
    one node and one crossing each way instead of two nodes and six operator calls with their tensors'
    allocation, views and checks: at a 64-token segment those cost more than the arithmetic. Inputs: the spec,
    the conv tail, the projections p, the conv weight and bias, the gate logits (contiguous), then the weights,
    momentum and anchor per layer; outputs: the reads, then the end weights and momentum per layer."""

    @staticmethod
    def forward(ctx, spec: native.WriteSpec, tail: Tensor, p: Tensor, conv_w: Tensor, conv_b: Tensor,
                logits: Tensor, *states: Tensor):
        depth = len(states) // 3
        weights, momentum, anchor = (list(states[i * depth : (i + 1) * depth]) for i in range(3))
        y, end_weights, end_momentum, record = native.write_forward(spec, tail, p, conv_w, conv_b, logits, weights,
                                                                    momentum, anchor, recording=True)
        ctx.spec = spec
        ctx.save_for_backward(tail, p, conv_w, conv_b, logits, *anchor, record.main, *record.parts)
        ctx.set_materialize_grads(False)
        return y, *end_weights, *end_momentum

    @staticmethod
    @once_differentiable
    def backward(ctx, g_y: Tensor | None, *g_end: Tensor | None):
        tail, p, conv_w, conv_b, logits, *saved = ctx.saved_tensors
        depth, spec = len(saved) // 4, ctx.spec  # anchor, then the record: its main part and 3 depth - 1 parts
        anchor, record = saved[:depth], native.Record(saved[depth], saved[depth + 1 :])
        if g_y is None:
            g_y = p.new_zeros(p.shape[0], spec.heads, p.shape[1], anchor[-1].shape[-1])
        g_end = [g if g is None else g.contiguous() for g in g_end]
        *grads, g_weights, g_momentum, g_anchor = native.write_backward(spec, tail, p, conv_w, conv_b, logits, anchor,
                                                                       record, g_y, g_end[:depth], g_end[depth:])
        return None, *grads, *g_weights, *g_momentum, *g_anchor


def compiled_write(spec: native.WriteSpec, tail: Tensor, p: Tensor, conv_w: Tensor, conv_b: Tensor, logits: Tensor,
                   weights: list[Tensor], momentum: list[Tensor],
                   anchor: list[Tensor]) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    """CompiledWrite in training, the unrecorded write otherwise. Returns the reads [B, H, N, d_L] and the end
    weights and momentum [B, H, R, C] per layer."""
    inputs = [t.contiguous() for t in (tail, p, conv_w, conv_b, logits)]  # the C code indexes contiguous tensors
    weights, momentum, anchor = ([t.contiguous() for t in ts] for ts in (weights, momentum, anchor))
    if torch.is_grad_enabled() and any(t.requires_grad for t in (*inputs, *weights, *momentum, *anchor)):
        y, *ends = CompiledWrite.apply(spec, *inputs, *weights, *momentum, *anchor)
        return y, list(ends[: len(weights)]), list(ends[len(weights) :])
    y, end_weights, end_momentum, _ = native.write_forward(spec, *inputs, weights, momentum, anchor, recording=False)
    return y, end_weights, end_momentum


class CompiledProjection(torch.autograd.Function):
    """NeuralMemory.project's pointwise part as one node: the compiled conv, SiLU and q/k norms
    (native.conv_activate_normalise) and the gate activations theta = max_lr sigmoid(.), log eta =
    logsigmoid(.) and log(1 - alpha) = logsigmoid(-.), with their backward. Autograd through the operator
    and the gate ops records a dozen nodes per call. Inputs: the conv tail [B, K - 1, 3 D], the
    projections p [B, N, 3 D], the conv weight and bias, the gate logits [B, N, 3 H] (theta, eta, alpha per
    head), then heads, max_lr and whether momentum and forgetting are on. Outputs q, k, v [B, H, N, dh] and
    the gates log_eta, log_keep, theta [B, H, N]."""

    @staticmethod
    def forward(ctx, tail: Tensor, p: Tensor, weight: Tensor, bias: Tensor, logits: Tensor, heads: int,
                max_lr: float, momentum: bool, forgetting: bool):
        q, k, v = native.direct(native.conv_activate_normalise, tail, p, weight, bias, heads)
        ctx.save_for_backward(tail, p, weight, bias, logits)
        ctx.heads, ctx.max_lr, ctx.momentum, ctx.forgetting = heads, max_lr, momentum, forgetting
        ctx.set_materialize_grads(False)
        return q, k, v, *gate_activations(logits, heads, max_lr, momentum, forgetting)

    @staticmethod
    @once_differentiable
    def backward(ctx, g_q, g_k, g_v, g_log_eta, g_log_keep, g_theta):
        tail, p, weight, bias, logits = ctx.saved_tensors
        batch, n = p.shape[:2]
        shape = (batch, ctx.heads, n, p.shape[-1] // (3 * ctx.heads))
        grads = [g if g is not None else p.new_zeros(shape) for g in (g_q, g_k, g_v)]
        g_tail, g_p, g_weight, g_bias = native.direct(native.conv_activate_normalise_backward, tail, p, weight,
                                                      bias, grads)
        s_theta, s_eta, s_alpha = gate_logits(torch.sigmoid(logits), ctx.heads)
        g_gates = torch.zeros(3, batch, ctx.heads, n, dtype=p.dtype)  # [3, B, H, N], as gate_logits lays them out
        if g_theta is not None:
            g_gates[0] = g_theta * ctx.max_lr * s_theta * (1 - s_theta)
        if g_log_eta is not None and ctx.momentum:
            g_gates[1] = g_log_eta * (1 - s_eta)  # d logsigmoid(x) / dx = sigmoid(-x)
        if g_log_keep is not None and ctx.forgetting:
            g_gates[2] = -g_log_keep * s_alpha
        g_logits = g_gates.permute(1, 3, 0, 2).reshape(logits.shape)
        return g_tail, g_p, g_weight, g_bias, g_logits, None, None, None, None


def gate_logits(logits: Tensor, heads: int) -> Tensor:
    """[B, N, 3 H] (theta, eta, alpha per head) -> [3, B, H, N], a view."""
    batch, n = logits.shape[:2]
    return logits.view(batch, n, 3, heads).permute(2, 0, 3, 1)


def gate_activations(logits: Tensor, heads: int, max_lr: float, momentum: bool,
                     forgetting: bool) -> tuple[Tensor, Tensor, Tensor]:
    """The gates from their logits [B, N, 3 H]: log eta (momentum; NO_MOMENTUM_LOG when off), log(1 - alpha)
    (forgetting; 0 when off) and theta, [B, H, N] each."""
    theta_l, eta_l, alpha_l = gate_logits(logits, heads)
    log_eta = F.logsigmoid(eta_l) if momentum else torch.full_like(eta_l, NO_MOMENTUM_LOG)
    log_keep = F.logsigmoid(-alpha_l) if forgetting else torch.zeros_like(alpha_l)
    return log_eta, log_keep, max_lr * torch.sigmoid(theta_l)
