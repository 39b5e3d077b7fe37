"""Tier-2 compile cases: an MoE layer traced with ``torch.compile(fullgraph=True)``, forward and backward,
against eager and against the reference's autograd (all ranks simulated in one process)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from deep_ep_ops import Buffer, ops, reference

HIDDEN, INTER, EXPERTS, TOPK = 32, 16, 8, 2
_GROUPS: dict[str, dist.ProcessGroup] = {}


def second_group() -> dist.ProcessGroup:
    """A second group over the same ranks, made once per process (``new_group`` is collective)."""
    if "second" not in _GROUPS:
        _GROUPS["second"] = dist.new_group(list(range(dist.get_world_size())))
    return _GROUPS["second"]


class MoE(torch.nn.Module):
    """Gate, then this rank's local SwiGLU experts; weights are identical on every rank (seeded)."""

    def __init__(self, rank: int, world: int, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        local = EXPERTS // world
        self.gate = torch.nn.Parameter(torch.randn(HIDDEN, EXPERTS, generator=g) * HIDDEN ** -0.5)
        w1 = torch.randn(EXPERTS, HIDDEN, 2 * INTER, generator=g) * HIDDEN ** -0.5
        w2 = torch.randn(EXPERTS, INTER, HIDDEN, generator=g) * INTER ** -0.5
        self.w1 = torch.nn.Parameter(w1[rank * local:(rank + 1) * local].clone())
        self.w2 = torch.nn.Parameter(w2[rank * local:(rank + 1) * local].clone())

    def route(self, x):
        weights, idx = (x @ self.gate).softmax(dim=-1).topk(TOPK, dim=-1)
        return idx, weights

    def experts(self, recv_x, recv_idx, recv_w):
        """Weighted expert outputs per received row; dense over rows, so shapes stay symbolic."""
        out = torch.zeros_like(recv_x)
        for i in range(self.w1.shape[0]):
            weight = (recv_w * (recv_idx == i)).sum(dim=1, keepdim=True)
            gate_h, up = (recv_x @ self.w1[i]).chunk(2, dim=-1)
            out = out + weight * ((torch.nn.functional.silu(gate_h) * up) @ self.w2[i])
        return out

    def forward_buffer(self, buf: Buffer, x):
        """As DeepEP users write it, against the Buffer facade."""
        idx, w = self.route(x)
        per_rank, _, per_expert, in_rank, _ = buf.get_dispatch_layout(idx, EXPERTS)
        recv_x, recv_idx, recv_w, _, handle, _ = buf.dispatch(
            x, topk_idx=idx, topk_weights=w, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
            num_tokens_per_expert=per_expert)
        return buf.combine(self.experts(recv_x, recv_idx, recv_w), handle)[0]

    def forward_ops(self, group_name: str, x, comm_seq):
        """Against the raw ops, threading ``comm_seq``."""
        idx, w = self.route(x)
        layout = ops.get_dispatch_layout(idx, EXPERTS, group_name)
        out = ops.dispatch(x, layout.is_token_in_rank, EXPERTS, group_name, topk_idx=idx, topk_weights=w,
                           num_tokens_per_expert=layout.num_tokens_per_expert, comm_seq=comm_seq)
        y, _, comm_seq = ops.combine(self.experts(out.recv_x, out.recv_topk_idx, out.recv_topk_weights), out.handle,
                                     group_name, comm_seq=comm_seq)
        return y, comm_seq


def _tokens(step: int, rank: int) -> int:
    return 3 + (5 * step + 3 * rank) % 11


def _x(step: int, rank: int) -> torch.Tensor:
    return torch.randn(_tokens(step, rank), HIDDEN, generator=torch.Generator().manual_seed(100 * step + rank))


def _grads(layer: MoE, x: torch.Tensor, out: torch.Tensor):
    loss = out.square().sum()
    return torch.autograd.grad(loss, [x, layer.gate, layer.w1, layer.w2])


def _reference_grads(step: int, world: int):
    """Output and gradients of Σ_r loss_r with every rank simulated: per-rank gate copies, experts
    owned by their rank, plain torch autograd through the reference dispatch/combine."""
    layers = [MoE(r, world) for r in range(world)]
    xs = [_x(step, r).requires_grad_() for r in range(world)]
    routes = [layer.route(x) for layer, x in zip(layers, xs)]
    d = reference.dispatch(xs, [r[0] for r in routes], [r[1] for r in routes], EXPERTS)
    y = [layers[r].experts(d[r].recv_x, d[r].recv_topk_idx, d[r].recv_topk_weights) for r in range(world)]
    outs = [c[0] for c in reference.combine(y, d)]
    sum(o.square().sum() for o in outs).backward()
    return [(outs[r].detach(), (xs[r].grad, layers[r].gate.grad, layers[r].w1.grad, layers[r].w2.grad))
            for r in range(world)]


def _counting(backend: str):
    calls = []
    inner = torch._dynamo.lookup_backend(backend)

    def compile_fn(gm, example_inputs):
        calls.append(len(gm.graph.nodes))
        return inner(gm, example_inputs)

    return compile_fn, calls


def _close(name, got, want, tol=1e-5):
    torch.testing.assert_close(got, want, rtol=tol, atol=tol, msg=lambda m: f"{name}: {m}")


def compile_moe(rank: int, world: int, backend: str, api: str, steps: int = 5) -> dict:
    """Eager vs compiled vs reference over ``steps`` steps; returns compile and graph-break counts."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    layer = MoE(rank, world)
    buf = Buffer(dist.group.WORLD, timeout_s=120)
    group_name = dist.group.WORLD.group_name

    def run(x):
        if api == "buffer":
            return layer.forward_buffer(buf, x)
        return layer.forward_ops(group_name, x, torch.zeros(1, dtype=torch.int64))[0]

    compile_fn, calls = _counting(backend)
    compiled = torch.compile(run, fullgraph=True, backend=compile_fn)
    try:
        for step in range(steps):
            x = _x(step, rank).requires_grad_()
            out_e = run(x)
            grads_e = _grads(layer, x, out_e)
            torch._dynamo.decorators.mark_unbacked(x, 0)
            out_c = compiled(x)
            grads_c = _grads(layer, x, out_c)
            _close("output", out_c, out_e)
            for name, gc, ge in zip(("x", "gate", "w1", "w2"), grads_c, grads_e):
                _close(f"grad {name}", gc, ge)
            if step == 0:
                out_r, grads_r = _reference_grads(step, world)[rank]
                _close("output vs reference", out_e, out_r)
                for name, ge, gr in zip(("x", "gate", "w1", "w2"), grads_e, grads_r):
                    _close(f"grad {name} vs reference", ge, gr)
    finally:
        buf.destroy()
    breaks = sum(torch._dynamo.utils.counters["graph_break"].values())
    return {"compiles": len(calls), "graph_breaks": breaks}


def compile_two_groups(rank: int, world: int, backend: str) -> dict:
    """The same layer compiled twice in one program, with two Buffers on two different groups."""
    torch._dynamo.reset()
    layer = MoE(rank, world)
    buffers = [Buffer(dist.group.WORLD, timeout_s=120), Buffer(second_group(), timeout_s=120)]
    compiled = [torch.compile(lambda x, b=b: layer.forward_buffer(b, x), fullgraph=True, backend=backend)
                for b in buffers]
    try:
        for step in range(2):
            x = _x(step, rank)
            want = layer.forward_buffer(buffers[0], x)
            for fn in compiled:
                _close("two groups", fn(x), want)
    finally:
        for b in buffers:
            b.destroy()
    return {"groups": [b.group_name for b in buffers]}


def opcheck_all(rank: int, world: int) -> dict[str, list[dict]]:
    """opcheck of every op in lockstep on every rank; failures are returned, not raised, so that a
    failing rank does not leave its peers waiting in a collective."""
    from opcheck_samples import samples

    from test_opcheck import overload, utils_for

    results: dict[str, list[dict]] = {}
    for name, arg_list in sorted(samples(dist.group.WORLD.group_name, rank).items()):
        results[name] = [{k: str(v) for k, v in torch.library.opcheck(
            overload(name), args, test_utils=utils_for(name), raise_exception=False).items()} for args in arg_list]
    return results


def compile_layer_dynamic(rank: int, world: int, steps: int = 2) -> dict:
    """A layer whose graph is the same on every world size (one dense FFN applied to every received row,
    so no parameter shape depends on the group), through the Buffer, inductor, ``mark_dynamic`` on the
    token dim, against eager.

    Run on one world size and then on another in fresh processes that share one inductor cache
    directory: a graph whose output shapes depend on the group size must not be served to the other size.
    """
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(0)
    gate = torch.randn(HIDDEN, EXPERTS, generator=g)
    ffn = torch.randn(HIDDEN, HIDDEN, generator=g) * HIDDEN ** -0.5
    buf = Buffer(dist.group.WORLD, timeout_s=120)

    def layer(x):
        w, idx = (x @ gate).softmax(dim=-1).topk(TOPK, dim=-1)
        per_rank, _, per_expert, in_rank, _ = buf.get_dispatch_layout(idx, EXPERTS)
        recv_x, _, recv_w, _, handle, _ = buf.dispatch(x, topk_idx=idx, topk_weights=w, num_tokens_per_rank=per_rank,
                                                       is_token_in_rank=in_rank, num_tokens_per_expert=per_expert)
        return buf.combine((recv_x @ ffn) * recv_w.sum(dim=1, keepdim=True), handle)[0]

    compiled = torch.compile(layer, fullgraph=True, backend="inductor")
    try:
        for step in range(steps):
            x = _x(step, rank)
            torch._dynamo.mark_dynamic(x, 0)
            _close(f"step {step}", compiled(x), layer(x))
    finally:
        buf.destroy()
    return {"world": world}
