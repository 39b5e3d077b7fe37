"""Tier-2 fused_deep_moe cases: the fused op against the unfused chain of public ops, the reference,
and a float32 MoE computed without any quantization.

Tolerances: fused and unfused run the same expert math on the same rows in the same order, so they must
be bitwise equal, and so must the reference. Against the unquantized fp32 MoE the error comes from the INT8
activations (per token, ``amax/127``), the INT8 weights (per output channel) and the bf16 outputs. The
bound is a relative L2 error ``||out - ref|| / ||ref|| < 4e-2`` for W8A8 and ``< 1e-2`` for bf16 weights
(bf16 rounding of the expert outputs and of the result).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist

from cases_normal import assert_same, env
from cases_low_latency import LLCase, make_inputs
from deep_ep_ops import Buffer, make_fused_weights, reference
from benchmarks._chains import unfused_deep_moe


@dataclasses.dataclass(frozen=True)
class FusedCase:
    base: LLCase = LLCase(tokens=(6,), m=8, hidden=256, num_experts=8, num_topk=3)
    intermediate: int = 128
    quant_mode: int = 1

    def __str__(self):
        return f"{self.base}-I{self.intermediate}-q{self.quant_mode}"


def expert_weights(case: FusedCase, num_experts: int, seed: int = 7):
    """Float ``w13 [E, 2I, H]`` and ``w2 [E, H, I]`` of every routed expert, plus one shared expert."""
    g = torch.Generator().manual_seed(seed)
    h, i = case.base.hidden, case.intermediate
    w13 = torch.randn(num_experts + 1, 2 * i, h, generator=g) * h ** -0.5
    w2 = torch.randn(num_experts + 1, h, i, generator=g) * i ** -0.5
    return w13, w2


def local_weights(case: FusedCase, world: int, rank: int):
    """This rank's experts (the shared expert on a shared-expert rank), in the fused layout."""
    w13, w2 = expert_weights(case, case.base.num_experts)
    shared = case.base.shared
    if rank < shared:
        sl = slice(case.base.num_experts, case.base.num_experts + 1)
    else:
        local = case.base.num_experts // (world - shared)
        sl = slice((rank - shared) * local, (rank - shared + 1) * local)
    return make_fused_weights(w13[sl], w2[sl], case.quant_mode), (w13[sl], w2[sl])


def dense_moe(x, idx, w, w13, w2, shared_expert: int | None) -> torch.Tensor:
    """The MoE output in float32 with unquantized weights ``w13`` ``[E', 2I, H]`` and ``w2`` ``[E', H, I]``:
    every slot's expert (duplicate ids count per slot), plus expert ``shared_expert`` for every token when
    given."""
    xf = x.float()

    def ffn(e, rows):
        gate_up = rows @ w13[e].t()
        i = gate_up.shape[1] // 2
        return (torch.nn.functional.silu(gate_up[:, :i]) * gate_up[:, i:]) @ w2[e].t()

    out = torch.zeros_like(xf)
    for k in range(idx.shape[1]):
        for e in idx[:, k].unique().tolist():
            if e >= 0:
                rows = (idx[:, k] == e).nonzero().flatten()
                out[rows] += w[rows, k:k + 1] * ffn(e, xf[rows])
    if shared_expert is not None:
        out += ffn(shared_expert, xf)
    return out


def dense_fp32(case: FusedCase, x, idx, w, rank: int) -> torch.Tensor:
    """The MoE output in float32 with the original (unquantized) weights."""
    w13, w2 = expert_weights(case, case.base.num_experts)
    return dense_moe(x, idx, w, w13, w2, case.base.num_experts if case.base.shared else None)


def fused_vs_unfused(rank: int, world: int, case: FusedCase) -> dict:
    base = case.base
    xs, idx, w = make_inputs(base, world)
    with env(MOE_SHARED_EXPERT_RANK_NUM=str(base.shared)):
        buf = Buffer(dist.group.WORLD, low_latency_mode=True, timeout_s=60)
    try:
        weights, _ = local_weights(case, world, rank)
        out, count = buf.fused_deep_moe(xs[rank], idx[rank], w[rank], *weights, base.m, base.num_experts,
                                        quant_mode=case.quant_mode)
        unfused, unfused_count = unfused_deep_moe(buf, xs[rank], idx[rank], w[rank], *weights, base.m,
                                                  base.num_experts, quant_mode=case.quant_mode)
        assert_same("ep_recv_count vs unfused", count, unfused_count)
        assert_same("output vs unfused", out, unfused)
        ref = reference.fused_deep_moe(xs, idx, w, [local_weights(case, world, r)[0] for r in range(world)], base.m,
                                       base.num_experts, case.quant_mode, base.shared)[rank]
        assert_same("output vs reference", out, ref[0])
        assert_same("ep_recv_count vs reference", count, ref[1])
        # ep_recv_count[i * R + s] = tokens rank s sent to local expert i, counted from the routing itself.
        local = count.numel() // world
        for i in range(local):
            for s in range(world):
                e = base.num_experts if rank < base.shared else (rank - base.shared) * local + i
                sent = ((idx[s] == e).any(dim=1).sum() if rank >= base.shared else
                        ((s + torch.arange(idx[s].shape[0])) % max(base.shared, 1) == rank).sum())
                assert int(count[i * world + s]) == int(sent), (i, s, count)
        dense = dense_fp32(case, xs[rank], idx[rank], w[rank], rank)
        err = (out.float() - dense)
        rel = float(err.norm() / dense.norm()) if dense.numel() and dense.norm() > 0 else 0.0
        bound = 4e-2 if case.quant_mode == 1 else 1e-2
        assert rel < bound, f"relative error {rel:.4g} vs the float32 MoE exceeds {bound}"
        return {"rel_err": rel, "mean_abs_diff": float(err.abs().mean()) if err.numel() else 0.0}
    finally:
        buf.destroy()


def compile_fused(rank: int, world: int, backend: str, steps: int = 4) -> dict:
    """``Buffer.fused_deep_moe`` under torch.compile(fullgraph=True): static shapes, one graph over steps."""
    from cases_compile import _counting

    case = FusedCase()
    base = case.base
    buf = Buffer(dist.group.WORLD, low_latency_mode=True, timeout_s=120)
    weights, _ = local_weights(case, world, rank)
    gate = torch.randn(base.hidden, base.num_experts, generator=torch.Generator().manual_seed(3))

    def step(x):
        weights_k, idx = (x.float() @ gate).softmax(dim=-1).topk(base.num_topk, dim=-1)
        return buf.fused_deep_moe(x, idx, weights_k, *weights, base.m, base.num_experts)[0]

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compile_fn, calls = _counting(backend)
    compiled = torch.compile(step, fullgraph=True, backend=compile_fn)
    try:
        for s in range(steps):
            x = torch.randn(6, base.hidden, generator=torch.Generator().manual_seed(50 * s + rank)).bfloat16()
            assert_same(f"step {s}", compiled(x), step(x))
    finally:
        buf.destroy()
    return {"compiles": len(calls), "graph_breaks": sum(torch._dynamo.utils.counters["graph_break"].values())}
