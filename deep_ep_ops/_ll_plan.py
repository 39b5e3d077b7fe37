"""Where low-latency rows go: the sender's plan and the receiver's sorting (pure index arithmetic).

Send plan: each distinct (token, expert) selection takes one row of a fixed-capacity chunk per
destination (``M * min(K, L)`` rows, or ``M`` for a shared-expert rank), ordered by (local expert, token).
Duplicate ids in a token share their first slot's row. The receiver sorts the real rows of every chunk into
``[L, R*M, H]`` (per expert: source rank, then source token). Everything here runs on the device without a
host read, so the low-latency ops stay graph-capturable.
"""

from __future__ import annotations

import dataclasses

import torch

from .layout import chunk_caps


@dataclasses.dataclass
class Plan:
    """Where each selection of this rank's tokens goes.

    ``slot [N, K (+1 shared)]`` is its row in the send buffer (and in combine's receive buffer), ``total``
    (one past the end) for none; ``local_expert`` its local expert id at the destination; ``caps`` the chunk
    capacities per destination; ``counts`` int64 ``[R]`` the real rows per destination chunk.
    """

    slot: torch.Tensor
    local_expert: torch.Tensor
    caps: list[int]
    total: int
    counts: torch.Tensor


def send_plan(topk_idx: torch.Tensor, num_experts: int, num_ranks: int, rank: int, m: int, num_shared: int) -> Plan:
    n, k = topk_idx.shape
    num_local_experts = num_experts // (num_ranks - num_shared)
    device = topk_idx.device
    # Ids out of range count as unused here, so that planning never fails: the handshake then fails
    # every rank (see low_latency._agree).
    valid = (topk_idx >= 0) & (topk_idx < num_experts)
    first = (topk_idx.unsqueeze(2) == topk_idx.unsqueeze(1)).to(torch.int8).argmax(dim=2)
    is_first = first == torch.arange(k, device=device)
    dest = torch.where(valid, num_shared + torch.div(topk_idx, num_local_experts, rounding_mode="floor"), -1)
    local_expert = torch.where(valid, topk_idx % num_local_experts, 0)
    entry = valid & is_first
    if num_shared:
        tokens = torch.arange(n, device=device)
        dest = torch.cat([dest, ((rank + tokens) % num_shared).unsqueeze(1)], dim=1)
        local_expert = torch.cat([local_expert, torch.zeros(n, 1, dtype=local_expert.dtype, device=device)], dim=1)
        entry = torch.cat([entry, torch.ones(n, 1, dtype=torch.bool, device=device)], dim=1)
    caps = chunk_caps(num_ranks, m, k, num_experts, num_shared)
    total = sum(caps)
    span = max(num_local_experts, 1) * m
    token = torch.arange(n, device=device).unsqueeze(1)
    key = torch.where(entry, dest * span + local_expert * m + token, num_ranks * span).flatten()
    dest_or_end = torch.where(entry, dest, num_ranks).flatten()
    order = torch.argsort(key, stable=True)
    per_dest = torch.zeros(num_ranks + 1, dtype=torch.int64, device=device)
    per_dest.index_add_(0, dest_or_end, torch.ones_like(dest_or_end))
    starts = torch.cumsum(per_dest, 0) - per_dest
    pos = torch.empty_like(order)
    pos[order] = torch.arange(order.numel(), device=device) - starts[dest_or_end[order]]
    # Chunk starts from arange arithmetic (no host-to-device copy, so the plan can be graph-captured).
    d = torch.arange(num_ranks + 1, device=device)
    offsets = m * torch.clamp(d, max=num_shared) + caps[-1] * torch.clamp(d - num_shared, min=0)
    slot = torch.where(entry, offsets[dest.clamp(min=0)] + pos.view(dest.shape), total)
    dup = valid & ~is_first
    routed = torch.where(dup, slot[:, :k].gather(1, first), slot[:, :k])
    slot = torch.cat([routed, slot[:, k:]], dim=1)
    return Plan(slot, local_expert, caps, total, per_dest[:num_ranks])


def send_source(plan: Plan, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For every send row: the token it copies (``num_tokens`` for padding) and its ``[local expert,
    token]`` metadata (``-1`` for padding), as ``(int64 [total], int32 [total, 2])``."""
    device = plan.slot.device
    cols = plan.slot.shape[1]
    slots = plan.slot.flatten()
    token = torch.arange(num_tokens, device=device).repeat_interleave(cols)
    source = torch.full((plan.total + 1,), num_tokens, dtype=torch.int64, device=device)
    source.index_copy_(0, slots, token)
    meta = torch.full((plan.total + 1, 2), -1, dtype=torch.int32, device=device)
    meta.index_copy_(0, slots, torch.stack([plan.local_expert.flatten(), token], dim=1).to(torch.int32))
    return source[:plan.total], meta[:plan.total]


@dataclasses.dataclass
class ReceivedRows:
    """Where a dispatch's received rows belong. ``rows`` are the rows looked at (indices into the received
    buffer); per row of ``rows``: ``expert`` (``L`` for one that is not real) and ``pos``, its position within
    its expert; ``order`` sorts ``rows`` by expert (stable, so in (source rank, token) order within an
    expert); ``counts [L, R]`` real rows per (local expert, source rank)."""

    rows: torch.Tensor
    expert: torch.Tensor
    counts: torch.Tensor
    order: torch.Tensor
    pos: torch.Tensor


def rows_to_sort(recv_counts: torch.Tensor, cap: int, num_ranks: int, compact: bool) -> torch.Tensor:
    """The received rows to look at: only the real ones (``compact``, on CPU, where a data-dependent size
    costs nothing and the cost then follows the tokens sent), else every row of every chunk (static)."""
    if not compact:
        return torch.arange(num_ranks * cap, device=recv_counts.device)
    j = torch.arange(cap, device=recv_counts.device)
    return (j < recv_counts.unsqueeze(1)).flatten().nonzero().flatten()


def sort_received(local_expert: torch.Tensor, rows: torch.Tensor, recv_counts: torch.Tensor, cap: int,
                  num_local_experts: int, num_ranks: int) -> ReceivedRows:
    """Sorts received rows (``cap`` per source chunk, the first ``recv_counts[s]`` real).

    Args:
        local_expert: int ``[n]`` local expert id of each of ``rows`` (anything for a row that is not real).
        rows: int64 ``[n]`` indices into the received buffer (see :func:`rows_to_sort`).
        recv_counts: int64 ``[R]`` real rows in each source's chunk.
    """
    device = rows.device
    source = torch.div(rows, cap, rounding_mode="floor")
    real = (rows - source * cap < recv_counts[source]) & (local_expert >= 0) & (local_expert < num_local_experts)
    expert = torch.where(real, local_expert.long(), num_local_experts)
    per_pair = torch.zeros((num_local_experts + 1) * num_ranks, dtype=torch.int64, device=device)
    per_pair.index_add_(0, expert * num_ranks + source, torch.ones_like(source))
    per_pair = per_pair.view(num_local_experts + 1, num_ranks)
    order = torch.argsort(expert, stable=True)
    per_expert = per_pair.sum(1)
    pos = torch.empty_like(order)
    pos[order] = torch.arange(order.numel(), device=device) - (torch.cumsum(per_expert, 0) - per_expert)[expert[order]]
    return ReceivedRows(rows, expert, per_pair[:num_local_experts], order, pos)


def packed_positions(sorted_rows: ReceivedRows, num_local_experts: int, rows: int) -> torch.Tensor:
    """Each received row's flat position in ``[L, rows]``. Rows that are not real go to padding
    positions, the q-th one to the q-th free position, so that every write index is distinct."""
    per_expert = sorted_rows.counts.sum(1)
    valid = sorted_rows.expert < num_local_experts
    free = rows - per_expert
    free_end = torch.cumsum(free, 0)
    q = torch.cumsum((~valid).to(torch.int64), 0) - 1
    pad_expert = torch.searchsorted(free_end, q, right=True).clamp(max=num_local_experts - 1)
    pad_row = per_expert[pad_expert] + q - (free_end - free)[pad_expert]
    return torch.where(valid, sorted_rows.expert * rows + sorted_rows.pos, pad_expert * rows + pad_row)


def combine_send_rows(layout_range: torch.Tensor, cap: int, rows: int) -> torch.Tensor:
    """The expert side of combine: for each source ``s``, the flat ``[L * rows]`` positions of its rows in
    the order it sent them (local expert, then token), padded to ``cap`` (int64 ``[R, cap]``)."""
    num_local_experts = layout_range.shape[0]
    counts = (layout_range & 0xFFFFFFFF).t()  # [R, L]
    begin = (layout_range >> 32).t()
    cum = torch.cumsum(counts, 1)
    j = torch.arange(cap, device=layout_range.device).expand(counts.shape[0], cap).contiguous()
    expert = torch.searchsorted(cum, j, right=True)
    valid = expert < num_local_experts
    expert = expert.clamp(max=num_local_experts - 1)
    offset = j - (cum - counts).gather(1, expert)
    return torch.where(valid, expert * rows + begin.gather(1, expert) + offset, 0)
