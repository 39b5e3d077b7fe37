"""Typed raw ops: thin functions over ``torch.ops.deepep.*`` that return named tuples.

The schemas (``deep_ep_ops/_schemas.py``) stay the op contract that compiled graphs record; these
functions only name the outputs, take keyword arguments, and fill in the facts of the group that the
schemas carry (``num_ranks``, ``rank``, ``num_ranks_per_node``). ``group`` is a ``ProcessGroup`` or its
``group_name``. Everything here traces under ``torch.compile(fullgraph=True)``.

Example::

    from deep_ep_ops import ops

    layout = ops.get_dispatch_layout(topk_idx, num_experts, group)
    out = ops.dispatch(x, layout.is_token_in_rank, num_experts, group, topk_idx=topk_idx,
                       topk_weights=topk_weights, num_tokens_per_expert=layout.num_tokens_per_expert)
    y = experts(out.recv_x, out.recv_topk_idx, out.recv_topk_weights)
    combined_x = ops.combine(y, out.handle, group).combined_x
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist

from . import _registry


class Layout(NamedTuple):
    """``get_dispatch_layout``: counts of one rank's routing."""

    num_tokens_per_rank: torch.Tensor  # [R] int32, distinct tokens with an expert on each rank
    num_tokens_per_rdma_rank: torch.Tensor  # [num_nodes] int32, distinct tokens with an expert on each node
    num_tokens_per_expert: torch.Tensor  # [E] int32, selections per expert
    is_token_in_rank: torch.Tensor  # [N, R] bool


class Handle(NamedTuple):
    """The normal-mode handle: DeepEP V1's intranode 6-tuple of tensors (one channel)."""

    rank_prefix_matrix: torch.Tensor  # [R, R] int32, column r: prefix sums of the rows each rank sends r
    channel_prefix_matrix: torch.Tensor  # [R, 1] int32, rows this rank sends each rank
    recv_channel_prefix_matrix: torch.Tensor  # [R, 1] int32, zeros (one channel)
    recv_src_idx: torch.Tensor  # [n] int32, source token of each received row (-1 padding)
    is_token_in_rank: torch.Tensor  # [N, R] bool
    send_head: torch.Tensor  # [N, R] int32, position of each token among the rows sent to each rank, -1 if none


class DispatchResult(NamedTuple):
    recv_x: torch.Tensor  # [n, H] (int8 with quant_mode="int8")
    recv_x_scales: torch.Tensor  # [n, S] FP8 scales, [n] INT8 scales, or an empty [n, 0]
    recv_topk_idx: torch.Tensor  # [n, K] int64 local expert ids, -1 elsewhere ([n, 0] without topk_idx)
    recv_topk_weights: torch.Tensor  # [n, K] float32, 0 elsewhere ([n, 0] without topk_weights)
    num_recv_tokens_per_expert: torch.Tensor  # [L] int32 (aligned; prefix sums with expert_token_nums_type=0)
    handle: Handle
    comm_seq: torch.Tensor  # [1] int64, the comm_seq to pass to the next communicating op


class CachedDispatchResult(NamedTuple):
    recv_x: torch.Tensor
    recv_x_scales: torch.Tensor
    recv_topk_weights: torch.Tensor
    comm_seq: torch.Tensor


class CombineResult(NamedTuple):
    combined_x: torch.Tensor  # [N, H]
    combined_topk_weights: torch.Tensor  # [N, K] float32 ([N, 0] without topk_weights)
    comm_seq: torch.Tensor


class LowLatencyHandle(NamedTuple):
    src_info: torch.Tensor  # [L, R*M] int32, source token of each row
    layout_range: torch.Tensor  # [L, R] int64, (begin << 32) | count per source rank


class LowLatencyDispatchResult(NamedTuple):
    packed_recv_x: torch.Tensor  # [L, R*M, H]
    packed_recv_x_scales: torch.Tensor  # [L, R*M, H/128] f32, [L, R*M, H/512] int32 (UE8M0), [L, R*M] (INT8), or empty
    packed_recv_count: torch.Tensor  # [L] int32
    handle: LowLatencyHandle
    comm_seq: torch.Tensor


class LowLatencySent(NamedTuple):
    """The send half of a low-latency op: outputs to be filled by the receive half, and its token."""

    outputs: tuple[torch.Tensor, ...]
    recv_token: torch.Tensor
    comm_seq: torch.Tensor


class FusedResult(NamedTuple):
    output: torch.Tensor  # [N, H] bf16
    ep_recv_count: torch.Tensor  # [L*R] int32, [i*R + s] = tokens rank s sent to local expert i
    comm_seq: torch.Tensor


class GroupFacts(NamedTuple):
    group_name: str
    num_ranks: int
    rank: int
    num_ranks_per_node: int


@torch.compiler.assume_constant_result
def group_facts(group: dist.ProcessGroup | str) -> GroupFacts:
    """The facts of ``group`` that op schemas carry. Under torch.compile they are read when tracing (the
    group's context may be created then) and recorded in the graph as constants."""
    name = group if isinstance(group, str) else group.group_name
    ctx = _registry.get(name)
    return GroupFacts(name, ctx.num_ranks, ctx.rank, ctx.num_ranks_per_node)


def bytes_sent(group, reset: bool = False) -> dict[str, int]:
    """Bytes this rank has sent inside its node and across nodes on ``group`` (see ``Buffer.get_bytes_sent``)."""
    counters = _registry.get(group if isinstance(group, str) else group.group_name).transport.bytes_sent
    out = dict(counters)
    if reset:
        counters.update(intra_node=0, inter_node=0)
    return out


def get_dispatch_layout(topk_idx: torch.Tensor, num_experts: int, group) -> Layout:
    """Counts tokens per rank, node and expert for a routing (local compute, no communication)."""
    g = group_facts(group)
    return Layout(*torch.ops.deepep.get_dispatch_layout(topk_idx, num_experts, g.group_name, g.num_ranks,
                                                        g.num_ranks_per_node))


def dispatch(x: torch.Tensor, is_token_in_rank: torch.Tensor, num_experts: int, group, *,
             x_scales: torch.Tensor | None = None, topk_idx: torch.Tensor | None = None,
             topk_weights: torch.Tensor | None = None, num_tokens_per_expert: torch.Tensor | None = None,
             expert_alignment: int = 1, num_worst_tokens: int = 0, quant_mode: str = "none",
             expert_token_nums_type: int = 1, comm_seq: torch.Tensor | None = None) -> DispatchResult:
    """Sends each token once to every rank that owns one of its experts (normal mode).

    Args:
        x: ``[N, H]`` bf16/fp16/fp32, or float8_e4m3fn with ``x_scales [N, H/128]`` float32.
        is_token_in_rank: bool ``[N, R]`` from :func:`get_dispatch_layout`.
        num_experts: ``E``, divisible by the group size.
        topk_idx: int64 ``[N, K]`` global expert ids, ``-1`` for unused slots.
        topk_weights: float32 ``[N, K]``.
        num_tokens_per_expert: ``[E]`` from :func:`get_dispatch_layout` (needed without ``topk_idx``).
        expert_alignment, num_worst_tokens, quant_mode, expert_token_nums_type: see the op table (README).
        comm_seq: ``[1]`` int64 from the previous communicating op, to order communication as data.

    Returns:
        :class:`DispatchResult`; rows ordered by (source rank, source token).
    """
    g = group_facts(group)
    out = torch.ops.deepep.dispatch(x, x_scales, topk_idx, topk_weights, is_token_in_rank, num_tokens_per_expert,
                                    num_experts, g.group_name, g.num_ranks, expert_alignment, num_worst_tokens,
                                    quant_mode, expert_token_nums_type, comm_seq)
    handle = Handle(out[5], out[6], out[7], out[8], is_token_in_rank, out[9])
    return DispatchResult(*out[:5], handle, out[10])


def cached_dispatch(x: torch.Tensor, handle, group, *, x_scales: torch.Tensor | None = None,
                    topk_weights: torch.Tensor | None = None,
                    comm_seq: torch.Tensor | None = None) -> CachedDispatchResult:
    """Dispatch along a previous dispatch's layout (``handle``), without a count exchange."""
    g = group_facts(group)
    return CachedDispatchResult(*torch.ops.deepep.dispatch.cached(x, x_scales, topk_weights, list(handle),
                                                                  g.group_name, g.num_ranks, comm_seq))


def combine(x: torch.Tensor, handle, group, *, topk_weights: torch.Tensor | None = None,
            bias_0: torch.Tensor | None = None, bias_1: torch.Tensor | None = None,
            comm_seq: torch.Tensor | None = None) -> CombineResult:
    """Sums each token's rows back on its source rank (fp32 accumulation, one rounding)."""
    g = group_facts(group)
    return CombineResult(*torch.ops.deepep.combine(x, list(handle), topk_weights, bias_0, bias_1, g.group_name,
                                                   g.num_ranks, comm_seq))


def _ll_dispatch_args(x, topk_idx, m, num_experts, group, use_fp8, round_scale, use_ue8m0, quant_mode,
                      num_shared_expert_ranks, expert_token_nums_type, comm_seq):
    g = group_facts(group)
    return (x, topk_idx, m, num_experts, g.group_name, g.num_ranks, g.rank, use_fp8, round_scale, use_ue8m0,
            quant_mode, num_shared_expert_ranks, expert_token_nums_type, comm_seq)


def low_latency_dispatch(x: torch.Tensor, topk_idx: torch.Tensor, num_max_dispatch_tokens_per_rank: int,
                         num_experts: int, group, *, use_fp8: bool = True, round_scale: bool = False,
                         use_ue8m0: bool = False, quant_mode: str = "none", num_shared_expert_ranks: int = 0,
                         expert_token_nums_type: int = 1,
                         comm_seq: torch.Tensor | None = None) -> LowLatencyDispatchResult:
    """One row per (token, selected expert) into the static ``[L, R*M, H]`` layout (decode)."""
    out = torch.ops.deepep.low_latency_dispatch(*_ll_dispatch_args(
        x, topk_idx, num_max_dispatch_tokens_per_rank, num_experts, group, use_fp8, round_scale, use_ue8m0,
        quant_mode, num_shared_expert_ranks, expert_token_nums_type, comm_seq))
    return LowLatencyDispatchResult(out[0], out[1], out[2], LowLatencyHandle(out[3], out[4]), out[5])


def low_latency_dispatch_send(x: torch.Tensor, topk_idx: torch.Tensor, num_max_dispatch_tokens_per_rank: int,
                              num_experts: int, group, *, use_fp8: bool = True, round_scale: bool = False,
                              use_ue8m0: bool = False, quant_mode: str = "none", num_shared_expert_ranks: int = 0,
                              expert_token_nums_type: int = 1,
                              comm_seq: torch.Tensor | None = None) -> LowLatencySent:
    """The send half of :func:`low_latency_dispatch`; :func:`low_latency_dispatch_recv` fills the outputs."""
    out = torch.ops.deepep.low_latency_dispatch_send(*_ll_dispatch_args(
        x, topk_idx, num_max_dispatch_tokens_per_rank, num_experts, group, use_fp8, round_scale, use_ue8m0,
        quant_mode, num_shared_expert_ranks, expert_token_nums_type, comm_seq))
    return LowLatencySent(tuple(out[:5]), out[5], out[6])


def low_latency_dispatch_recv(sent: LowLatencySent, group) -> LowLatencyDispatchResult:
    """Completes a :func:`low_latency_dispatch_send`: fills and returns its outputs."""
    torch.ops.deepep.low_latency_dispatch_recv(*sent.outputs, sent.recv_token, group_facts(group).group_name)
    packed, scales, count, src_info, layout_range = sent.outputs
    return LowLatencyDispatchResult(packed, scales, count, LowLatencyHandle(src_info, layout_range), sent.comm_seq)


def _ll_combine_args(x, topk_idx, topk_weights, handle, m, num_experts, group, num_shared_expert_ranks, comm_seq):
    g = group_facts(group)
    return (x, topk_idx, topk_weights, handle[0], handle[1], m, num_experts, g.group_name, g.num_ranks, g.rank,
            num_shared_expert_ranks, comm_seq)


def low_latency_combine(x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor, handle,
                        num_max_dispatch_tokens_per_rank: int, num_experts: int, group, *,
                        num_shared_expert_ranks: int = 0,
                        comm_seq: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted fp32 sum of the experts' rows back on the source rank: ``(combined_x [N, H], comm_seq)``."""
    return tuple(torch.ops.deepep.low_latency_combine(*_ll_combine_args(
        x, topk_idx, topk_weights, handle, num_max_dispatch_tokens_per_rank, num_experts, group,
        num_shared_expert_ranks, comm_seq)))


def low_latency_combine_send(x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor, handle,
                             num_max_dispatch_tokens_per_rank: int, num_experts: int, group, *,
                             num_shared_expert_ranks: int = 0,
                             comm_seq: torch.Tensor | None = None) -> LowLatencySent:
    """The send half of :func:`low_latency_combine`; :func:`low_latency_combine_recv` fills ``combined_x``."""
    combined, token, seq = torch.ops.deepep.low_latency_combine_send(*_ll_combine_args(
        x, topk_idx, topk_weights, handle, num_max_dispatch_tokens_per_rank, num_experts, group,
        num_shared_expert_ranks, comm_seq))
    return LowLatencySent((combined,), token, seq)


def low_latency_combine_recv(sent: LowLatencySent, group) -> torch.Tensor:
    """Completes a :func:`low_latency_combine_send` and returns ``combined_x``."""
    torch.ops.deepep.low_latency_combine_recv(sent.outputs[0], sent.recv_token, group_facts(group).group_name)
    return sent.outputs[0]


def fused_deep_moe(x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor,
                   gmm1_permuted_weight: torch.Tensor, gmm1_permuted_weight_scale: torch.Tensor,
                   gmm2_weight: torch.Tensor, gmm2_weight_scale: torch.Tensor, num_max_dispatch_tokens_per_rank: int,
                   num_experts: int, group, *, quant_mode: int = 1, num_shared_expert_ranks: int = 0,
                   comm_seq: torch.Tensor | None = None) -> FusedResult:
    """Low-latency dispatch, SwiGLU grouped FFN (layout of ``deep_ep_ops.ffn``) and weighted combine in one op."""
    g = group_facts(group)
    return FusedResult(*torch.ops.deepep.fused_deep_moe(
        x, topk_idx, topk_weights, gmm1_permuted_weight, gmm1_permuted_weight_scale, gmm2_weight, gmm2_weight_scale,
        num_max_dispatch_tokens_per_rank, num_experts, g.group_name, g.num_ranks, g.rank, quant_mode,
        num_shared_expert_ranks, comm_seq))
