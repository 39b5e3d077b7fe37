"""Sample inputs for ``torch.library.opcheck`` of every ``torch.ops.deepep`` overload, on any group.

Deterministic (seeded) so that every rank of a multi-rank test builds the same shapes and calls the
same ops in the same order. Differentiable inputs require grad so that the autograd tests run.
"""

from __future__ import annotations

import torch
from torch.distributed.distributed_c10d import _resolve_process_group


def _routing(num_tokens: int, num_experts: int, num_topk: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    idx = torch.rand(num_tokens, num_experts, generator=g).topk(num_topk, dim=1).indices
    idx[0, -1] = -1
    return idx, torch.rand(num_tokens, num_topk, generator=g)


def samples(group_name: str, rank: int = 0) -> dict[str, list[tuple]]:
    """``"op.overload"`` → list of argument tuples."""
    num_experts, hidden = 8, 16
    g = group_name
    r = _resolve_process_group(group_name).size()
    idx, w = _routing(6 + rank, num_experts, 2, seed=rank)
    layout = torch.ops.deepep.get_dispatch_layout(idx, num_experts, g, r, r)
    x = torch.randn(idx.shape[0], hidden, generator=torch.Generator().manual_seed(rank), requires_grad=True)
    w = w.requires_grad_()
    seq = torch.zeros(1, dtype=torch.int64)
    out = torch.ops.deepep.dispatch(x.detach(), None, idx, w.detach(), layout[3], layout[2], num_experts, g, r)
    handle = [out[5], out[6], out[7], out[8], layout[3], out[9]]
    recv_x = out[0].clone().requires_grad_()
    recv_w = out[3].clone().requires_grad_()
    worst = torch.ops.deepep.dispatch(x.detach(), None, idx, None, layout[3], layout[2], num_experts, g, r, 1, 64)
    worst_handle = [worst[5], worst[6], worst[7], worst[8], layout[3], worst[9]]
    bias = torch.randn(x.shape[0], hidden, requires_grad=True)
    ll = _low_latency_samples(group_name, rank)
    return {**ll, **_fused_samples(group_name, rank), **_compute_samples(),
        "get_dispatch_layout.default": [(idx, num_experts, g, r, r)],
        "dispatch.default": [
            (x, None, idx, w, layout[3], layout[2], num_experts, g, r, 2, 0, "none", 1, seq),
            (x, None, idx, None, layout[3], layout[2], num_experts, g, r, 1, 64, "none", 0),
            # opcheck sums every output into one accumulator, which fails when the first output is the
            # int8 recv_x and later ones are float, so this sample has no requires_grad inputs.
            (x.detach().bfloat16(), None, idx, w.detach(), layout[3], None, num_experts, g, r, 1, 0, "int8"),
        ],
        "dispatch.cached": [(x, None, w, handle, g, r, seq), (x, None, None, worst_handle, g, r)],
        "combine.default": [(recv_x, handle, recv_w, bias, None, g, r, seq),
                            (worst[0].clone().requires_grad_(), worst_handle, None, None, None, g, r)],
    }


def _low_latency_samples(group_name: str, rank: int) -> dict[str, list[tuple]]:
    """Low-latency ops are inference-only: no input requires grad.

    Their padding rows are undefined, as in DeepEP, so these samples fill every slot (every token selects
    every expert and ``num_tokens == M``): then every output element is defined and opcheck can compare
    eager with compiled outputs. Padding, ``-1`` slots and the other semantics are tier-2 tests.
    """
    num_ranks = _resolve_process_group(group_name).size()
    m, hidden = 4, 512
    num_experts = 2 * num_ranks
    g = torch.Generator().manual_seed(10 + rank)
    idx = torch.stack([torch.randperm(num_experts, generator=g) for _ in range(m)])
    w = torch.rand(m, num_experts, generator=g)
    x = torch.randn(m, hidden, generator=g).bfloat16()
    seq = torch.zeros(1, dtype=torch.int64)
    grp = (group_name, num_ranks, rank)
    out = torch.ops.deepep.low_latency_dispatch(x, idx, m, num_experts, *grp, False)
    y = torch.randn(out[0].shape, generator=g).bfloat16()
    sent = torch.ops.deepep.low_latency_dispatch_send(x, idx, m, num_experts, *grp, False)
    comb_sent = torch.ops.deepep.low_latency_combine_send(y, idx, w, out[3], out[4], m, num_experts, *grp)
    return {
        "low_latency_dispatch.default": [
            (x, idx, m, num_experts, *grp, False),
            (x, idx, m, num_experts, *grp, True, False, False, "none", 0, 1, seq),
            (x, idx, m, num_experts, *grp, True, True, True, "none", 0, 0),
            (x, idx, m, num_experts, *grp, False, False, False, "int8"),
        ],
        "low_latency_dispatch_send.default": [(x, idx, m, num_experts, *grp, True, False, False, "none", 0, 1, seq)],
        "low_latency_dispatch_recv.default": [(*[t.clone() for t in sent[:5]], sent[5], group_name)],
        "low_latency_combine.default": [(y, idx, w, out[3], out[4], m, num_experts, *grp, 0, seq)],
        "low_latency_combine_send.default": [(y, idx, w, out[3], out[4], m, num_experts, *grp)],
        "low_latency_combine_recv.default": [(comb_sent[0].clone(), comb_sent[1], group_name)],
    }


def _fused_samples(group_name: str, rank: int) -> dict[str, list[tuple]]:
    from deep_ep_ops import make_fused_weights

    num_ranks = _resolve_process_group(group_name).size()
    m, hidden, inter, num_experts = 4, 256, 64, 2 * num_ranks
    g = torch.Generator().manual_seed(20 + rank)
    idx, w = _routing(3, num_experts, 2, seed=30 + rank)
    x = torch.randn(3, hidden, generator=g).bfloat16()
    w13 = torch.randn(2, 2 * inter, hidden, generator=g) * 0.05
    w2 = torch.randn(2, hidden, inter, generator=g) * 0.05
    return {"fused_deep_moe.default": [
        (x, idx, w, *make_fused_weights(w13, w2, 1), m, num_experts, group_name, num_ranks, rank),
        (x, idx, w, *make_fused_weights(w13, w2, 0), m, num_experts, group_name, num_ranks, rank, 0, 0,
         torch.zeros(1, dtype=torch.int64)),
    ]}


def _compute_samples() -> dict[str, list[tuple]]:
    """The private compute ops (deep_ep_ops.compute): local, no communication."""
    g = torch.Generator().manual_seed(40)
    rows = torch.randn(6, 256, generator=g).bfloat16()
    index = torch.tensor([5, 0, 0, 3])
    token = torch.tensor([1, 0, 1, 2, 2, 0])
    slot = torch.tensor([[0, 6], [2, 3], [6, 6]])
    w = torch.rand(3, 2, generator=g)
    bias = torch.randn(3, 256, generator=g)
    return {
        "_gather_rows.default": [(rows, index), (rows.view(torch.uint8), index)],
        "_scatter_rows.default": [(torch.zeros(6, 256).bfloat16(), index[:2], rows[:2])],
        "_combine_reduce.default": [(rows, token, 3, bias, None, torch.bfloat16), (rows.float(), token, 4, None,
                                                                                   None, torch.float32)],
        "_weighted_reduce.default": [(rows, slot, w), (rows, slot, w[:, :1])],
        "_permute_rows.default": [(torch.zeros(6, 256).bfloat16(), index[:2], rows, index[2:])],
        "_ll_plan.default": [(torch.tensor([[0, 5], [3, 3], [-1, 7]]), 8, 2, 0, 4, 0),
                             (torch.tensor([[0, 5], [3, 3]]), 6, 4, 1, 2, 1)],
        "_ll_sort.default": [(torch.tensor([[1, 0], [0, 1], [-1, -1], [0, 0], [1, 2], [0, 0]], dtype=torch.int32),
                              torch.tensor([2, 1, 0]), 2, 2, 6)],
        "_ll_combine_rows.default": [(torch.tensor([[2, (2 << 32) | 1], [1, 0]]), 4, 6)],
        "_dispatch_layout.default": [(torch.tensor([[0, 5], [3, 3], [-1, 7]]), 8, 2, 1),
                                     (torch.tensor([[0, 5], [3, -1]]), 8, 4, 2)],
        "_quantize_int8.default": [(rows, 0.0), (rows.float(), 1e-12)],
        "_quantize_fp8.default": [(rows, False, False), (torch.randn(2, 512, generator=g), True, True)],
        **_shm_samples(),
    }


def _shm_samples() -> dict[str, list[tuple]]:
    """The shared-memory copy loops on one rank: its own segment only, so every row is a local copy."""
    from deep_ep_ops.transports import _shm_engine

    base, ring_bytes, slot_bytes = _shm_engine.ring_base(1), 1 << 16, 1 << 16
    rings = [torch.zeros(_shm_engine.ring_segment_bytes(1, ring_bytes), dtype=torch.uint8)]
    slots = [torch.zeros(_shm_engine.slot_segment_bytes(1, slot_bytes), dtype=torch.uint8)]
    header = torch.arange(9, dtype=torch.int64).view(1, 9)
    slot_geometry = [_shm_engine.slot_base(1), slot_bytes, 128]
    src = torch.arange(48, dtype=torch.uint8).view(3, 16)
    rows = torch.randn(3, 8)
    zeros = torch.zeros(2, dtype=torch.int64)
    return {
        "_shm_ring_copy.default": [(rings, [base, ring_bytes], zeros.clone(), zeros.clone(), src,
                                    torch.tensor([2, 0]), [2], torch.empty(2, 16, dtype=torch.uint8), [2], 0, 1.0)],
        "_shm_ring_combine.default": [(rings, [base, ring_bytes], zeros.clone(), torch.zeros(5, dtype=torch.int64),
                                       rows, [3], [3], torch.ones(3, 1, dtype=torch.bool), None, None,
                                       torch.empty(3, 8), 0, 1.0)],
        "_shm_slots_send.default": [(slots, slot_geometry, 1, src, None, None, 0, header, [3], [2], 0,
                                     torch.zeros(1, dtype=torch.int64), 1.0)],
        "_shm_slots_recv.default": [(slots, slot_geometry, 1, src, None, None, 0, header, [3], [2],
                                     torch.empty(3, 16, dtype=torch.uint8), torch.full((1,), -1),
                                     torch.empty_like(header), [3], 0, 1.0)],
        **_whole_op_samples(),
    }


def _whole_op_samples() -> dict[str, list[tuple]]:
    """The whole-op native calls of the shm backend on one rank (its own segments only)."""
    from deep_ep_ops import _handshake
    from deep_ep_ops.transports import _shm_engine, _shm_normal

    ring_bytes, slot_bytes = 1 << 16, 1 << 16
    rings = [torch.zeros(_shm_engine.ring_segment_bytes(1, ring_bytes), dtype=torch.uint8)]
    slots = [torch.zeros(_shm_engine.slot_segment_bytes(1, slot_bytes), dtype=torch.uint8)]
    ring_geometry, slot_geometry = [_shm_engine.ring_base(1), ring_bytes], [_shm_engine.slot_base(1), slot_bytes, 256]
    x, idx, w = torch.randn(3, 16).bfloat16(), torch.tensor([[0, 1], [1, -1], [1, 0]]), torch.rand(3, 2)
    header = _handshake.header_row("low_latency_dispatch", 1, (4, 2, 16, 2, 0, 0, 0, 0, 0), [0], [-1])
    width = len(header)
    ll_outputs = (torch.empty(2, 4, 16).bfloat16(), torch.empty(2, 4, 0), torch.empty(2, dtype=torch.int32),
                  torch.empty(2, 4, dtype=torch.int32), torch.empty(2, 1, dtype=torch.int64))
    layout_range = torch.tensor([[2], [(2 << 32) | 3]])
    normal_header = _handshake.header_row("dispatch", 1, (2, 16, 0, -1, -1, 0, 2, 2, 0), [0], [-1])
    normal_header[_shm_normal.OFFER_WORD] = 1
    config = [9, 1 << 20, 2, 0, 1, 1]
    combine_header = _handshake.header_row("combine", 1, (16, 0, 2, 0), [0], [-1])
    combine_header[_shm_normal.OFFER_WORD] = 1
    cached_header = _handshake.header_row("cached_dispatch", 1, (16, 0, -1, -1, 2, 0), [0], [-1])
    cached_header[_shm_normal.OFFER_WORD] = 1
    scratch_words = 1 + 2 * 3 + width
    matrix_scratch = torch.zeros(scratch_words, dtype=torch.int64)
    matrix_scratch[0] = 3
    outputs = [torch.empty(3, 16).bfloat16(), torch.empty(3, 0), torch.empty(3, 2, dtype=torch.int64),
               torch.empty(3, 2), torch.zeros(2, dtype=torch.int32), torch.empty(1, 1, dtype=torch.int32),
               torch.empty(1, 1, dtype=torch.int32), torch.zeros(1, 1, dtype=torch.int32),
               torch.empty(3, dtype=torch.int32), torch.empty(3, 1, dtype=torch.int32)]
    return {
        "_shm_ll_dispatch.default": [(slots, slot_geometry, 1, header, x, None, idx, [40, 32, 0, 0, 32], 4, 2, 0, 0,
                                      1, *ll_outputs, torch.empty(1, width, dtype=torch.int64),
                                      torch.zeros(1, dtype=torch.int64), 1.0)],
        "_shm_ll_combine.default": [(slots, slot_geometry, 2, header, torch.randn(2, 4, 16).bfloat16(), layout_range,
                                     idx, w, 4, 2, 0, 0, torch.empty(3, 16).bfloat16(),
                                     torch.empty(1, width, dtype=torch.int64), torch.zeros(1, dtype=torch.int64),
                                     1.0)],
        "_shm_dispatch_agree.default": [(rings, ring_geometry, torch.zeros(2, dtype=torch.int64), normal_header, x,
                                         None, idx, w, torch.ones(3, 1, dtype=torch.bool), config, 0,
                                         torch.zeros(scratch_words, dtype=torch.int64), 1.0)],
        "_shm_dispatch_rows.default": [(rings, ring_geometry, torch.zeros(2, dtype=torch.int64), x, None, idx, w,
                                        torch.ones(3, 1, dtype=torch.bool), config, 0, outputs, matrix_scratch, 1.0)],
        "_shm_cached_agree.default": [(rings, ring_geometry, torch.zeros(2, dtype=torch.int64), cached_header, x, None,
                                       w, torch.tensor([[3]], dtype=torch.int32), 3,
                                       torch.ones(3, 1, dtype=torch.bool), [6, 1 << 20], 0,
                                       torch.zeros(scratch_words, dtype=torch.int64), 1.0)],
        "_shm_combine_agree.default": [(rings, ring_geometry, torch.zeros(2, dtype=torch.int64), combine_header, x,
                                        w, None, None, torch.tensor([[3]], dtype=torch.int32),
                                        torch.ones(3, 1, dtype=torch.bool), [4, 1 << 20], 0,
                                        torch.zeros(scratch_words, dtype=torch.int64), 1.0)],
        "_shm_combine_rows.default": [(rings, ring_geometry, torch.zeros(2, dtype=torch.int64), x, w, None, None,
                                       torch.ones(3, 1, dtype=torch.bool), [4, 1 << 20], 0,
                                       [torch.empty(3, 16).bfloat16(), torch.empty(3, 2),
                                        torch.empty(3, 40, dtype=torch.uint8)], matrix_scratch.clone(), 1.0)],
    }
