"""``fused_deep_moe``: low-latency dispatch, grouped W8A8 (or bf16) SwiGLU FFN and weighted combine in one op.

The fused kernel never materializes the ``[L, R*M, H]`` layout. It groups the received rows by expert,
runs :func:`deep_ep_ops.ffn.expert_ffn` on each expert's rows, and writes the outputs back in receive
order, which is exactly the order the combine half sends them in. Expert rows are grouped with
host-side counts: on CPU that reads host memory, not a device. The unfused chain
(``benchmarks/_chains.py``) does the same math through the public low-latency ops and the packed layout.
"""

from __future__ import annotations

import enum
from typing import NamedTuple

import torch

from meta_kernels import checks

from . import _handshake, _registry, ffn, low_latency
from ._schemas import lib

FusedSettings = NamedTuple("FusedSettings", [*low_latency.SETTINGS_HEAD, ("intermediate_2i", int), ("quant_mode", int)])


class FuseMode(enum.IntEnum):
    """DeepEP-Ascend's fusion kernels; both compute the same result here."""

    FUSED_DEEP_MOE = 1
    DISPATCH_FFN_COMBINE = 2


def fused_deep_moe(x, topk_idx, topk_weights, gmm1_permuted_weight, gmm1_permuted_weight_scale, gmm2_weight,
                   gmm2_weight_scale, num_max_dispatch_tokens_per_rank, num_experts, group_name, num_ranks, rank,
                   quant_mode=1, num_shared_expert_ranks=0, comm_seq=None):
    op = "fused_deep_moe"
    ctx = _registry.get(group_name)
    m = num_max_dispatch_tokens_per_rank
    weights = (gmm1_permuted_weight, gmm1_permuted_weight_scale, gmm2_weight, gmm2_weight_scale)
    state = low_latency.dispatch_send(
        x, topk_idx, m, num_experts, group_name, num_ranks, rank, False, False, False,
        "int8" if quant_mode == 1 else "none", num_shared_expert_ranks, 1, op=op,
        check=lambda: checks.check_fused(x, topk_idx, topk_weights, *weights, m, num_experts, num_ranks, rank,
                                         num_shared_expert_ranks, quant_mode),
        settings_type=FusedSettings, settings_tail=(int(gmm1_permuted_weight.shape[-1]), quant_mode))
    # Each expert's rows in (source rank, token) order, as in the packed layout (indices into recv).
    recv, order, _, counts, _ = low_latency.sorted_received(ctx, state, op, num_ranks * m)
    fmt = state.fmt
    ep_recv_count = counts.flatten().to(torch.int32)
    data = fmt.field_bytes(recv, "x")
    dtype = torch.int8 if quant_mode == 1 else x.dtype
    y = torch.empty(recv.shape[0], x.shape[1], dtype=torch.bfloat16, device=x.device)
    begin = 0
    for i, count in enumerate(counts.sum(1).tolist()):
        rows = order[begin:begin + count]
        begin += count
        if count:
            scale = ctx.kernels.gather_rows(fmt.view(recv, "scales"), rows).view(count) if quant_mode == 1 else None
            y_i = ffn.expert_ffn(ctx.kernels.gather_rows(data, rows).view(dtype), scale, gmm1_permuted_weight[i],
                                 gmm1_permuted_weight_scale[i], gmm2_weight[i], gmm2_weight_scale[i], quant_mode)
            ctx.kernels.scatter_rows(y, rows, y_i)
    # Combine half: the outputs are already in the order the sources expect them back, as many rows to
    # each source as it sent.
    pending = ctx.transport.exchange_slots(y.view(torch.uint8), None, [state.cap] * num_ranks, counts.sum(0),
                                           state.plan.caps)
    out = torch.empty(x.shape[0], x.shape[1], dtype=torch.bfloat16, device=x.device)
    low_latency.combine_recv(ctx, low_latency.CombineState(pending, state.plan, topk_weights, torch.bfloat16,
                                                           state.seq, FusedSettings), out)
    return out, ep_recv_count, _handshake.next_comm_seq(comm_seq, x)


_registry.impl(lib, "fused_deep_moe", fused_deep_moe)
