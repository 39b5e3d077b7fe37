"""Tier-2 activation-checkpointing cases: the MoE layer of ``cases_compile`` wrapped in
``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)``, eager and compiled.

Checkpointing drops the layer's activations after the forward and runs the forward again inside the
backward, so dispatch and combine communicate again there. Every rank must recompute the same ops in the
same order (the handshake would fail otherwise), and the recomputed routing, received rows and handle must
be the forward's own, so the gradients are bitwise those of the layer without checkpointing.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.utils.checkpoint import checkpoint

from cases_compile import MoE, _x
from deep_ep_ops import Buffer, _registry


def _layer_fn(layer: MoE, buf: Buffer, api: str):
    group_name = buf.group_name

    def forward(x):
        if api == "buffer":
            return layer.forward_buffer(buf, x)
        return layer.forward_ops(group_name, x, torch.zeros(1, dtype=torch.int64))[0]

    return forward


def _grads(layer: MoE, fn, x: torch.Tensor, compiled: bool):
    x = x.detach().requires_grad_()
    if compiled:  # token counts differ per rank and step: one graph for all of them
        torch._dynamo.decorators.mark_unbacked(x, 0)
    out = fn(x)
    params = [x, layer.gate, layer.w1, layer.w2]
    return (out.detach(), *torch.autograd.grad(out.square().sum(), params))


def checkpoint_moe(rank: int, world: int, backend: str, api: str, steps: int = 2) -> dict:
    """Output and gradients (x, gate, w1, w2) with checkpointing equal those without, bitwise, over ``steps``
    routings; returns the communicating ops each rank ran in the checkpointed steps, in order."""
    torch._dynamo.reset()
    layer = MoE(rank, world)
    buf = Buffer(dist.group.WORLD, timeout_s=120)
    ctx = _registry.get(buf.group_name)
    forward = _layer_fn(layer, buf, api)

    def checkpointed(x):
        return checkpoint(forward, x, use_reentrant=False)

    plain, ckpt = forward, checkpointed
    if backend != "eager":
        plain = torch.compile(forward, fullgraph=True, backend=backend)
        ckpt = torch.compile(checkpointed, fullgraph=True, backend=backend)
    ops_run = []
    try:
        for step in range(steps):
            x = _x(step, rank)
            want = _grads(layer, plain, x, backend != "eager")
            ctx.log = []
            got = _grads(layer, ckpt, x, backend != "eager")
            ops_run.append([(seq - ctx.log[0][0], op) for seq, op, _ in ctx.log])
            ctx.log = None
            for name, g, w in zip(("output", "x", "gate", "w1", "w2"), got, want):
                assert torch.equal(g, w), f"{backend}/{api} step {step}: {name} differs with checkpointing " \
                                          f"(max abs diff {(g - w).abs().max()})"
    finally:
        ctx.log = None
        buf.destroy()
    return {"ops": ops_run}
