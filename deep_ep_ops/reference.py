"""The oracle: every op simulated for all ranks in one process, in plain (differentiable) torch.

Inputs are lists indexed by rank; outputs are lists indexed by rank. This module *defines* the
semantics: every transport and kernel is tested against it, exactly for permutations and within
stated tolerances where reductions or quantization happen. It favours obviousness over speed: it
builds each receiver's rows source by source, where the kernels pack, exchange and unpack bytes.

Normal mode (DESIGN §4): each token goes once to every rank owning at least one of its experts.
``recv_x`` rows are ordered by (source rank, source token); ``recv_topk_idx`` holds local expert ids
(``-1`` for experts elsewhere) and ``recv_topk_weights`` the weights (``0`` for experts elsewhere).
Combine sums each token's rows over the ranks that received it, in fp32, in rank order, starting from
the biases, and rounds once.
"""

from __future__ import annotations

import dataclasses

import torch

from . import quant
from .layout import align_up, expert_counts_output


@dataclasses.dataclass
class Dispatched:
    """One rank's normal-mode dispatch outputs; the last six fields are DeepEP's handle."""

    recv_x: torch.Tensor
    recv_x_scales: torch.Tensor | None
    recv_topk_idx: torch.Tensor | None
    recv_topk_weights: torch.Tensor | None
    num_recv_tokens_per_expert: torch.Tensor
    rank_prefix_matrix: torch.Tensor
    channel_prefix_matrix: torch.Tensor
    recv_channel_prefix_matrix: torch.Tensor
    recv_src_idx: torch.Tensor
    is_token_in_rank: torch.Tensor
    send_head: torch.Tensor

    @property
    def handle(self) -> tuple[torch.Tensor, ...]:
        return (self.rank_prefix_matrix, self.channel_prefix_matrix, self.recv_channel_prefix_matrix,
                self.recv_src_idx, self.is_token_in_rank, self.send_head)


def get_dispatch_layout(topk_idx: torch.Tensor, num_experts: int, num_ranks: int,
                        num_ranks_per_node: int | None = None):
    """Layout of one rank's routing, token by token (see ``deepep::get_dispatch_layout``).

    Returns:
        ``(num_tokens_per_rank [R] int32, num_tokens_per_rdma_rank [num_nodes] int32,
        num_tokens_per_expert [E] int32, is_token_in_rank [N, R] bool)``.
    """
    per_node = num_ranks if num_ranks_per_node is None else num_ranks_per_node
    num_local_experts = num_experts // num_ranks
    n = topk_idx.shape[0]
    is_token_in_rank = torch.zeros(n, num_ranks, dtype=torch.bool)
    num_tokens_per_expert = torch.zeros(num_experts, dtype=torch.int32)
    for t, row in enumerate(topk_idx.tolist()):
        for e in row:
            if e >= 0:
                is_token_in_rank[t, e // num_local_experts] = True
                num_tokens_per_expert[e] += 1
    nodes = is_token_in_rank.view(n, num_ranks // per_node, per_node).any(dim=2)
    return (is_token_in_rank.sum(0).to(torch.int32), nodes.sum(0).to(torch.int32), num_tokens_per_expert,
            is_token_in_rank)


def _payload(x, x_scales, quant_mode: str):
    if quant_mode == "int8":
        return quant.per_token_int8(x)
    return x, x_scales


def _pad(t: torch.Tensor | None, rows: int, value) -> torch.Tensor | None:
    if t is None or rows <= t.shape[0]:
        return t
    tail = torch.full((rows - t.shape[0], *t.shape[1:]), value, dtype=t.dtype)
    return torch.cat([t, tail])


def dispatch(x: list[torch.Tensor], topk_idx: list[torch.Tensor] | None, topk_weights: list[torch.Tensor] | None,
             num_experts: int, *, x_scales: list[torch.Tensor] | None = None,
             is_token_in_rank: list[torch.Tensor] | None = None,
             num_tokens_per_expert: list[torch.Tensor] | None = None, expert_alignment: int = 1,
             num_worst_tokens: int = 0, quant_mode: str = "none", expert_token_nums_type: int = 1) -> list[Dispatched]:
    """Normal-mode dispatch of every rank's tokens (DESIGN §4 ``dispatch``).

    Args:
        x: per rank ``[N_r, H]``.
        topk_idx: per rank int64 ``[N_r, K]`` global expert ids (``-1`` unused), or ``None``.
        topk_weights: per rank float32 ``[N_r, K]``, or ``None``.
        num_experts: ``E``, divisible by the number of ranks.
        x_scales: per rank FP8 scales ``[N_r, S]`` travelling with an FP8 ``x``.
        is_token_in_rank: per rank bool ``[N_r, R]``; derived from ``topk_idx`` when ``None``.
        num_tokens_per_expert: per rank ``[E]``; used for the counts when ``topk_idx`` is ``None``.
        expert_alignment: per-expert counts are rounded up to a multiple of it.
        num_worst_tokens: pad every output to this many rows (``-1`` ids and source indices, zeros elsewhere).
        quant_mode: ``"int8"`` quantizes each token on the sender (eps ``1e-12``).
        expert_token_nums_type: ``0`` returns inclusive prefix sums of the counts.

    Returns:
        One :class:`Dispatched` per rank.
    """
    num_ranks = len(x)
    num_local_experts = num_experts // num_ranks
    if is_token_in_rank is None:
        is_token_in_rank = [get_dispatch_layout(t, num_experts, num_ranks)[3] for t in topk_idx]
    payloads = [_payload(x[s], None if x_scales is None else x_scales[s], quant_mode) for s in range(num_ranks)]
    sent = torch.stack([m.sum(0) for m in is_token_in_rank]).to(torch.int32)  # [src, dst]
    results = []
    for r in range(num_ranks):
        rows_x, rows_s, rows_i, rows_w, rows_src = [], [], [], [], []
        for s in range(num_ranks):
            toks = is_token_in_rank[s][:, r].nonzero().flatten()
            data, scales = payloads[s]
            rows_x.append(data[toks])
            rows_src.append(toks.to(torch.int32))
            if scales is not None:
                rows_s.append(scales[toks])
            if topk_idx is not None:
                ids = topk_idx[s][toks]
                mine = (ids >= r * num_local_experts) & (ids < (r + 1) * num_local_experts)
                rows_i.append(torch.where(mine, ids - r * num_local_experts, torch.full_like(ids, -1)))
                if topk_weights is not None:
                    w = topk_weights[s][toks]
                    rows_w.append(torch.where(mine, w, torch.zeros_like(w)))
        recv_topk_idx = torch.cat(rows_i) if topk_idx is not None else None
        if topk_idx is not None:
            counts = torch.stack([(recv_topk_idx == i).any(dim=1).sum()
                                  for i in range(num_local_experts)]).to(torch.int32)
        else:
            mine = slice(r * num_local_experts, (r + 1) * num_local_experts)
            counts = sum(n[mine].to(torch.int32) for n in num_tokens_per_expert)
        counts = expert_counts_output(align_up(counts, expert_alignment), expert_token_nums_type)
        n_me = is_token_in_rank[r].shape[0]
        order = is_token_in_rank[r].to(torch.int32).cumsum(0) - 1
        send_head = torch.where(is_token_in_rank[r], order, torch.full_like(order, -1)).to(torch.int32)
        rows = max(num_worst_tokens, 0)
        results.append(Dispatched(
            recv_x=_pad(torch.cat(rows_x), rows, 0),
            recv_x_scales=_pad(torch.cat(rows_s), rows, 0) if rows_s else None,
            recv_topk_idx=_pad(recv_topk_idx, rows, -1),
            recv_topk_weights=_pad(torch.cat(rows_w), rows, 0) if rows_w else None,
            num_recv_tokens_per_expert=counts,
            rank_prefix_matrix=sent.cumsum(0).to(torch.int32),
            channel_prefix_matrix=sent[r].view(num_ranks, 1).clone(),
            recv_channel_prefix_matrix=torch.zeros(num_ranks, 1, dtype=torch.int32),
            recv_src_idx=_pad(torch.cat(rows_src), rows, -1),
            is_token_in_rank=is_token_in_rank[r],
            send_head=send_head.view(n_me, num_ranks),
        ))
    return results


def _blocks(d: Dispatched, rank: int):
    """(source rank, first row, row count) of every source block in a receiver's rows."""
    column = d.rank_prefix_matrix[:, rank].tolist()
    begin = 0
    for s, end in enumerate(column):
        yield s, begin, end - begin
        begin = end


def cached_dispatch(x: list[torch.Tensor], dispatched: list[Dispatched], *,
                    x_scales: list[torch.Tensor] | None = None,
                    topk_weights: list[torch.Tensor] | None = None) -> list[tuple]:
    """Dispatch with a previous dispatch's layout: per rank ``(recv_x, recv_x_scales, recv_topk_weights)``.

    Weights travel unmasked (the layout has no expert ids); padding rows of a ``num_worst_tokens``
    layout are zeros.
    """
    out = []
    for r, d in enumerate(dispatched):
        rows = d.recv_src_idx.shape[0]
        parts = {"x": [], "s": [], "w": []}
        for s, _, _ in _blocks(d, r):
            toks = dispatched[s].is_token_in_rank[:, r].nonzero().flatten()
            parts["x"].append(x[s][toks])
            if x_scales is not None:
                parts["s"].append(x_scales[s][toks])
            if topk_weights is not None:
                parts["w"].append(topk_weights[s][toks])
        cat = {k: _pad(torch.cat(v), rows, 0) if v else None for k, v in parts.items()}
        out.append((cat["x"], cat["s"], cat["w"]))
    return out


def combine(x: list[torch.Tensor], dispatched: list[Dispatched], *, topk_weights: list[torch.Tensor] | None = None,
            bias: list[tuple[torch.Tensor | None, torch.Tensor | None]] | None = None,
            num_ranks_per_node: int | None = None) -> list[tuple]:
    """Inverse of :func:`dispatch`: per rank ``(combined_x [N, H], combined_topk_weights [N, K] or None)``.

    ``combined_x[t] = round(bias_0[t] + bias_1[t] + Σ_r x_r[row of t])`` accumulated in fp32 in rank order;
    rows past the valid count of a ``num_worst_tokens`` dispatch are ignored. With ``num_ranks_per_node``
    (the node-aware path, ``transports.hierarchical``) the rows of each node other than the token's own are
    summed first (fp32, rank order) and rounded to the payload's dtype, and the sum takes, in node order, the
    own node's rows one by one and each other node's partial.
    """
    num_ranks = len(x)
    per_node = num_ranks_per_node or num_ranks
    out = []
    for s in range(num_ranks):
        n = dispatched[s].is_token_in_rank.shape[0]
        acc = torch.zeros(n, x[0].shape[1], dtype=torch.float32)
        for b in (bias[s] if bias is not None else ()):
            if b is not None:
                acc = acc + b.float()
        acc_w = torch.zeros(n, topk_weights[0].shape[1]) if topk_weights is not None else None
        for node in range(num_ranks // per_node):
            ranks = range(node * per_node, (node + 1) * per_node)
            if node == s // per_node or num_ranks_per_node is None:
                for r in ranks:
                    acc, acc_w = _add_rows(acc, acc_w, x, topk_weights, dispatched, r, s)
            else:  # one partial sum per (token, node) that has rows there, rounded like the rows it sums
                part, part_w = _add_rows(torch.zeros_like(acc), None if acc_w is None else torch.zeros_like(acc_w),
                                         x, topk_weights, dispatched, ranks, s)
                hit = dispatched[s].is_token_in_rank[:, ranks.start:ranks.stop].any(dim=1).nonzero().flatten()
                acc = acc.index_add(0, hit, part.to(x[0].dtype).float()[hit])
                acc_w = None if acc_w is None else acc_w.index_add(0, hit, part_w[hit])
        out.append((acc.to(x[0].dtype), acc_w))
    return out


def _add_rows(acc, acc_w, x, topk_weights, dispatched, ranks, s):
    """``acc`` (and ``acc_w``) plus the rows ranks ``ranks`` (in order) received from source ``s``."""
    for r in ([ranks] if isinstance(ranks, int) else ranks):
        _, begin, count = list(_blocks(dispatched[r], r))[s]
        toks = dispatched[r].recv_src_idx[begin:begin + count].long()
        acc = acc.index_add(0, toks, x[r][begin:begin + count].float())
        if acc_w is not None:
            acc_w = acc_w.index_add(0, toks, topk_weights[r][begin:begin + count])
    return acc, acc_w


# --- low-latency mode -------------------------------------------------------------------------------

@dataclasses.dataclass
class LowLatencyDispatched:
    """One rank's low-latency dispatch outputs (valid rows only are specified; padding is undefined)."""

    packed_recv_x: torch.Tensor  # [L, R*M, H]
    packed_recv_x_scales: torch.Tensor | None  # fp8: [L, R*M, H/128] (or int32 [.., H/512]); int8: [L, R*M]
    packed_recv_count: torch.Tensor  # [L] int32 (prefix sums with expert_token_nums_type=0)
    src_info: torch.Tensor  # [L, R*M] int32, source token index of each valid row
    layout_range: torch.Tensor  # [L, R] int64, (begin << 32) | count per source rank


def _shared_rank(src_rank: int, token: int, num_shared_expert_ranks: int) -> int:
    return (src_rank + token) % num_shared_expert_ranks


def _experts_of(rank: int, num_experts: int, num_ranks: int, num_shared: int) -> list[int]:
    """Global ids of a rank's local experts; ``-1`` stands for the shared expert of a shared rank."""
    if rank < num_shared:
        return [-1]
    num_local_experts = num_experts // (num_ranks - num_shared)
    first = (rank - num_shared) * num_local_experts
    return list(range(first, first + num_local_experts))


def _selects(topk_idx: torch.Tensor, src_rank: int, expert: int, receiver: int, num_shared: int) -> torch.Tensor:
    """Ascending tokens of ``src_rank`` that send a row to ``expert`` (``-1``: the receiver's shared expert)."""
    if expert == -1:
        tokens = torch.arange(topk_idx.shape[0])
        return tokens[(src_rank + tokens) % num_shared == receiver]
    return (topk_idx == expert).any(dim=1).nonzero().flatten()


def low_latency_dispatch(x: list[torch.Tensor], topk_idx: list[torch.Tensor], num_max_dispatch_tokens_per_rank: int,
                         num_experts: int, *, use_fp8: bool = True, round_scale: bool = False,
                         use_ue8m0: bool = False, quant_mode: str = "none", num_shared_expert_ranks: int = 0,
                         expert_token_nums_type: int = 1) -> list[LowLatencyDispatched]:
    """Low-latency dispatch (DESIGN §4): one row per (token, distinct selected expert), plus one row per
    token for the shared expert of rank ``(src_rank + token) % S`` when ``S`` shared ranks exist.

    Rows of a local expert are ordered by source rank, then source token. Every valid row is the sender's
    quantized token (see ``quant.low_latency_wire``); padding rows are zero here (undefined in the ops).
    """
    num_ranks, m = len(x), num_max_dispatch_tokens_per_rank
    wire = [quant.low_latency_wire(t, use_fp8, round_scale, use_ue8m0, quant_mode) for t in x]
    out = []
    for r in range(num_ranks):
        experts = _experts_of(r, num_experts, num_ranks, num_shared_expert_ranks)
        data0, scales0 = wire[0]
        packed = torch.zeros(len(experts), num_ranks * m, data0.shape[1], dtype=data0.dtype)
        scales = None if scales0 is None else torch.zeros(len(experts), num_ranks * m, *scales0.shape[1:],
                                                          dtype=scales0.dtype)
        src_info = torch.full((len(experts), num_ranks * m), -1, dtype=torch.int32)
        layout_range = torch.zeros(len(experts), num_ranks, dtype=torch.int64)
        for i, e in enumerate(experts):
            begin = 0
            for s in range(num_ranks):
                toks = _selects(topk_idx[s], s, e, r, num_shared_expert_ranks)
                n = toks.numel()
                packed[i, begin:begin + n] = wire[s][0][toks]
                if scales is not None:
                    scales[i, begin:begin + n] = wire[s][1][toks]
                src_info[i, begin:begin + n] = toks.to(torch.int32)
                layout_range[i, s] = (begin << 32) | n
                begin += n
        counts = (layout_range & 0xFFFFFFFF).sum(dim=1).to(torch.int32)
        out.append(LowLatencyDispatched(packed, scales, expert_counts_output(counts, expert_token_nums_type),
                                        src_info, layout_range))
    return out


def low_latency_combine(x: list[torch.Tensor], topk_idx: list[torch.Tensor], topk_weights: list[torch.Tensor],
                        dispatched: list[LowLatencyDispatched], num_experts: int,
                        num_shared_expert_ranks: int = 0) -> list[torch.Tensor]:
    """Low-latency combine: ``combined_x[t] = round(Σ_k w[t,k] · row(t, k) + shared_row(t))``, fp32.

    ``row(t, k)`` is the expert output at the packed position dispatch gave (token ``t``, expert
    ``topk_idx[t, k]``); ``-1`` slots contribute nothing, duplicate ids re-use the same row, and the shared
    expert's row (when ``S > 0``) is added with weight 1.
    """
    num_ranks = len(x)
    s_ranks = num_shared_expert_ranks
    num_local_experts = num_experts // (num_ranks - s_ranks)

    def row(receiver: int, i: int, src: int, token: int) -> torch.Tensor:
        d = dispatched[receiver]
        begin, count = int(d.layout_range[i, src]) >> 32, int(d.layout_range[i, src]) & 0xFFFFFFFF
        block = d.src_info[i, begin:begin + count].tolist()
        return x[receiver][i, begin + block.index(token)].float()

    out = []
    for s in range(num_ranks):
        n, hidden = topk_idx[s].shape[0], x[-1].shape[-1]
        rows = torch.zeros(n, topk_idx[s].shape[1], hidden)
        shared = torch.zeros(n, hidden)
        for t in range(n):
            for k, e in enumerate(topk_idx[s][t].tolist()):
                if e >= 0:
                    rows[t, k] = row(s_ranks + e // num_local_experts, e % num_local_experts, s, t)
            if s_ranks:
                shared[t] = row(_shared_rank(s, t, s_ranks), 0, s, t)
        acc = (topk_weights[s].unsqueeze(-1) * rows).sum(dim=1)
        if s_ranks:
            acc = acc + shared
        out.append(acc.to(x[0].dtype))
    return out


# --- fused dispatch + FFN + combine -------------------------------------------------------------------

def fused_deep_moe(x: list[torch.Tensor], topk_idx: list[torch.Tensor], topk_weights: list[torch.Tensor],
                   weights: list[tuple[torch.Tensor, ...]], num_max_dispatch_tokens_per_rank: int, num_experts: int,
                   quant_mode: int = 1, num_shared_expert_ranks: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``fused_deep_moe`` (DESIGN §4): low-latency dispatch (INT8 wire for ``quant_mode=1``, bf16 for 0),
    :func:`deep_ep_ops.ffn.expert_ffn` on each local expert's rows, low-latency combine.

    Args:
        weights: per rank ``(gmm1, gmm1_scale, gmm2, gmm2_scale)`` of its local experts.

    Returns:
        Per rank ``(output [N, H] bf16, ep_recv_count [L * R] int32)``.
    """
    from .ffn import expert_ffn

    dispatched = low_latency_dispatch(x, topk_idx, num_max_dispatch_tokens_per_rank, num_experts, use_fp8=False,
                                      quant_mode="int8" if quant_mode == 1 else "none",
                                      num_shared_expert_ranks=num_shared_expert_ranks)
    outputs = []
    for d, (gmm1, scale1, gmm2, scale2) in zip(dispatched, weights):
        y = torch.zeros(d.packed_recv_x.shape, dtype=torch.bfloat16)
        for i, n in enumerate((d.layout_range & 0xFFFFFFFF).sum(dim=1).tolist()):
            scales = None if d.packed_recv_x_scales is None else d.packed_recv_x_scales[i, :n]
            y[i, :n] = expert_ffn(d.packed_recv_x[i, :n], scales, gmm1[i], scale1[i], gmm2[i], scale2[i], quant_mode)
        outputs.append(y)
    combined = low_latency_combine(outputs, topk_idx, topk_weights, dispatched, num_experts, num_shared_expert_ranks)
    return [(c, (d.layout_range & 0xFFFFFFFF).flatten().to(torch.int32)) for c, d in zip(combined, dispatched)]
