"""Routing arithmetic and output shapes shared by every op (a leaf module: it imports only torch).

Which rank owns an expert, the dispatch layout, the low-latency chunk capacities, and the output shapes
that the fake kernels of ``meta_kernels`` and the real kernels share, so that they can never disagree.

Vocabulary: ``R`` ranks, ``E`` routed experts, ``L = E // R`` local experts; expert ``e`` lives on rank
``e // L`` with local id ``e % L``. With ``S`` shared-expert ranks (``MOE_SHARED_EXPERT_RANK_NUM``, low-latency
and fused ops only) ranks ``0..S-1`` host one shared expert each, routed experts spread over the other
``R - S`` ranks (``L = E // (R - S)``, expert ``e`` on rank ``S + e // L``), and token ``t`` of rank ``s``
also visits the shared rank ``(s + t) % S``.
"""

from __future__ import annotations

import torch


def num_local_experts(num_experts: int, num_ranks: int, rank: int, num_shared_expert_ranks: int = 0) -> int:
    """Local experts hosted by ``rank`` (1 on a shared-expert rank)."""
    if rank < num_shared_expert_ranks:
        return 1
    return num_experts // (num_ranks - num_shared_expert_ranks)


def expert_rank(topk_idx: torch.Tensor, num_local_experts: int, num_shared_expert_ranks: int = 0) -> torch.Tensor:
    """Owning rank of every selected expert; ``-1`` where ``topk_idx`` is ``-1``.

    Args:
        topk_idx: int64 ``[num_tokens, num_topk]`` global expert ids.
        num_local_experts: local experts per routed rank.
        num_shared_expert_ranks: ``S``; routed experts start at rank ``S``.

    Returns:
        int64 ``[num_tokens, num_topk]``.
    """
    owner = torch.div(topk_idx, num_local_experts, rounding_mode="floor") + num_shared_expert_ranks
    return torch.where(topk_idx >= 0, owner, torch.full_like(owner, -1))


def token_in_rank(rank_of_slot: torch.Tensor, num_ranks: int) -> torch.Tensor:
    """bool ``[num_tokens, num_ranks]``: the token selects at least one expert on that rank."""
    n = rank_of_slot.shape[0]
    # Unused slots scatter into a spare column that is dropped, so they never clear a real entry.
    column = torch.where(rank_of_slot >= 0, rank_of_slot, torch.full_like(rank_of_slot, num_ranks))
    hit = torch.zeros(n, num_ranks + 1, dtype=torch.bool, device=rank_of_slot.device)
    hit.scatter_(1, column, True)
    return hit[:, :num_ranks].contiguous()


def get_dispatch_layout(
    topk_idx: torch.Tensor, num_experts: int, num_ranks: int, num_ranks_per_node: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Local layout computation behind ``deepep::get_dispatch_layout`` (see its docstring in ``ops``)."""
    num_local_experts = num_experts // num_ranks
    is_token_in_rank = token_in_rank(expert_rank(topk_idx, num_local_experts), num_ranks)
    num_tokens_per_rank = is_token_in_rank.sum(dim=0, dtype=torch.int32)
    num_nodes = num_ranks // num_ranks_per_node
    in_node = is_token_in_rank.view(-1, num_nodes, num_ranks_per_node).any(dim=2)
    num_tokens_per_rdma_rank = in_node.sum(dim=0, dtype=torch.int32)
    valid = topk_idx >= 0
    slot_expert = torch.where(valid, topk_idx, torch.full_like(topk_idx, num_experts)).flatten()
    num_tokens_per_expert = torch.zeros(num_experts + 1, dtype=torch.int32, device=topk_idx.device)
    num_tokens_per_expert.index_add_(0, slot_expert, torch.ones_like(slot_expert, dtype=torch.int32))
    return num_tokens_per_rank, num_tokens_per_rdma_rank, num_tokens_per_expert[:num_experts], is_token_in_rank


def align_up(counts: torch.Tensor, alignment: int) -> torch.Tensor:
    """Rounds every count up to a multiple of ``alignment``."""
    if alignment <= 1:
        return counts
    return (counts + alignment - 1) // alignment * alignment


def expert_counts_output(counts: torch.Tensor, expert_token_nums_type: int) -> torch.Tensor:
    """Per-expert counts as the op returns them: counts (type 1) or inclusive prefix sums (type 0)."""
    if expert_token_nums_type == 0:
        return counts.cumsum(0).to(counts.dtype)
    return counts


#: Low-latency wire formats, in their handshake code order.
WIRE_FORMATS = ("bf16", "fp8", "int8")


def wire_format(use_fp8: bool, quant_mode: str) -> str:
    """The low-latency wire format: ``int8`` (``quant_mode="int8"``), else ``fp8`` or ``bf16``."""
    return "int8" if quant_mode == "int8" else ("fp8" if use_fp8 else "bf16")


def chunk_caps(num_ranks: int, m: int, num_topk: int, num_experts: int, num_shared: int) -> list[int]:
    """Low-latency rows one source can send each rank: ``M`` to a shared-expert rank, ``M * min(K, L)`` else."""
    num_local_experts = num_experts // (num_ranks - num_shared)
    return [m if d < num_shared else m * min(num_topk, num_local_experts) for d in range(num_ranks)]


def low_latency_dispatch_outputs(x: torch.Tensor, num_local_experts: int, num_ranks: int, m: int, fmt_name: str,
                                 use_ue8m0: bool, empty=None) -> tuple[torch.Tensor, ...]:
    """``(packed_recv_x [L, R*M, H], packed_recv_x_scales, packed_recv_count [L], src_info [L, R*M],
    layout_range [L, R])``, uninitialized; ``empty(shape, dtype)`` allocates the first two (default
    ``x.new_empty``)."""
    rows, hidden = num_ranks * m, x.shape[1]
    empty = empty or (lambda shape, dtype: x.new_empty(shape, dtype=dtype))
    data_dtype = {"bf16": x.dtype, "fp8": torch.float8_e4m3fn, "int8": torch.int8}[fmt_name]
    if fmt_name == "fp8":
        scales = empty((num_local_experts, rows, hidden // (512 if use_ue8m0 else 128)),
                       torch.int32 if use_ue8m0 else torch.float32)
    elif fmt_name == "int8":
        scales = empty((num_local_experts, rows), torch.float32)
    else:
        scales = x.new_empty((num_local_experts, rows, 0), dtype=torch.float32)
    return (empty((num_local_experts, rows, hidden), data_dtype), scales,
            x.new_empty((num_local_experts,), dtype=torch.int32),
            x.new_empty((num_local_experts, rows), dtype=torch.int32),
            x.new_empty((num_local_experts, num_ranks), dtype=torch.int64))


def normal_recv_payload(x: torch.Tensor, x_scales: torch.Tensor | None, quant_mode: str,
                        num_recv) -> tuple[torch.Tensor, torch.Tensor]:
    """``(recv_x, recv_x_scales)`` of a normal dispatch receiving ``num_recv`` rows, uninitialized."""
    if quant_mode == "int8":
        return x.new_empty((num_recv, x.shape[1]), dtype=torch.int8), x.new_empty((num_recv,), dtype=torch.float32)
    scales = (x.new_empty((num_recv, x_scales.shape[1]), dtype=x_scales.dtype) if x_scales is not None
              else x.new_empty((num_recv, 0), dtype=torch.float32))
    return x.new_empty((num_recv, x.shape[1])), scales
