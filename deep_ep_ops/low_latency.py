"""Kernels of the low-latency ops: static shapes, no host sync, no data-dependent allocation.

Send plan: each distinct (token, expert) selection takes one row of a fixed-capacity chunk per
destination (``M * min(K, L)`` rows, or ``M`` for a shared-expert rank), ordered by (local expert, token).
Duplicate ids in a token share their first slot's row. Dispatch sends
``[payload | scales | local expert | source token]`` byte rows in one static exchange. The receiver sorts
them into ``[L, R*M, H]`` (per expert: source rank, then source token), writing invalid slots into
padding positions so that every write index is distinct. Combine is the inverse: the expert side
rebuilds its chunks from ``layout_range``, and the source side reads its own send plan back for the
weighted fp32 sum.

The handshake is validated on the device (``torch._assert_async``): an expert id out of range on any
rank fails every rank, without a host sync. A rank whose static checks fail still joins it.
"""

from __future__ import annotations

import dataclasses
import weakref

import torch

from meta_kernels import checks

from . import _handshake, _registry, _waits, layout, quant
from ._schemas import lib
from ._wire import RowFormat, dtype_code, put_rows, take_rows

_CFG = ["num_max_dispatch_tokens_per_rank", "num_experts", "hidden", "num_topk", "num_shared_expert_ranks",
        "wire format", "x dtype", "round_scale", "use_ue8m0"]


def wire_format(use_fp8: bool, quant_mode: str) -> str:
    return "int8" if quant_mode == "int8" else ("fp8" if use_fp8 else "bf16")


def chunk_caps(num_ranks: int, m: int, num_topk: int, num_experts: int, num_shared: int) -> list[int]:
    """Rows each rank receives from one source: ``M`` on shared ranks, ``M * min(K, L)`` elsewhere."""
    local = num_experts // (num_ranks - num_shared)
    return [m if d < num_shared else m * min(num_topk, local) for d in range(num_ranks)]


@dataclasses.dataclass
class Plan:
    """Where each selection of this rank's tokens goes: ``slot [N, K (+1 shared)]`` is its row in the
    send buffer (and in combine's receive buffer); ``total`` (one past the end) for none."""

    slot: torch.Tensor
    local: torch.Tensor
    caps: list[int]
    total: int


def send_plan(topk_idx: torch.Tensor, num_experts: int, num_ranks: int, rank: int, m: int, num_shared: int) -> Plan:
    n, k = topk_idx.shape
    local_n = num_experts // (num_ranks - num_shared)
    device = topk_idx.device
    # Ids out of range count as unused here, so that planning never fails: the handshake then fails
    # every rank on the device (see _agree).
    valid = (topk_idx >= 0) & (topk_idx < num_experts)
    first = (topk_idx.unsqueeze(2) == topk_idx.unsqueeze(1)).to(torch.int8).argmax(dim=2)
    is_first = first == torch.arange(k, device=device)
    dest = torch.where(valid, num_shared + torch.div(topk_idx, local_n, rounding_mode="floor"), -1)
    local = torch.where(valid, topk_idx % local_n, 0)
    entry = valid & is_first
    if num_shared:
        tokens = torch.arange(n, device=device)
        dest = torch.cat([dest, ((rank + tokens) % num_shared).unsqueeze(1)], dim=1)
        local = torch.cat([local, torch.zeros(n, 1, dtype=local.dtype, device=device)], dim=1)
        entry = torch.cat([entry, torch.ones(n, 1, dtype=torch.bool, device=device)], dim=1)
    caps = chunk_caps(num_ranks, m, k, num_experts, num_shared)
    total = sum(caps)
    span = max(local_n, 1) * m
    token = torch.arange(n, device=device).unsqueeze(1)
    key = torch.where(entry, dest * span + local * m + token, num_ranks * span).flatten()
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
    return Plan(slot, local, caps, total)


def _agree(ctx, op: str, seq: int, cfg: list[int], topk_idx: torch.Tensor, num_experts: int, device,
           cfg_names: list[str] = _CFG) -> None:
    """The header exchange, validated on the device (no host sync, graph-capturable); expert ids out of
    range fail every rank.

    The status words name the first bad id (token, slot, value) from device arithmetic alone. When the
    device assertion fires on CPU, where it is synchronous, every rank reads the received rows back and
    raises the same detailed error as the normal-mode ops; on accelerators the peers of a rank with bad
    input raise the fixed message of the assertion.
    """
    rows = _handshake.header(ctx, op, seq, cfg, device=device)
    if topk_idx.numel():
        bad = ((topk_idx < -1) | (topk_idx >= num_experts)).flatten()
        first = bad.to(torch.int8).argmax()
        k = topk_idx.shape[1]
        rows[:, 3:7] = torch.stack([bad.any() * _handshake.STATUS_EXPERT_OUT_OF_RANGE, first // k, first % k,
                                    topk_idx.flatten()[first]])
    received = _handshake.exchange(ctx, op, seq, rows)
    what = ", ".join(cfg_names[:5]) + " and the wire format"
    try:
        _handshake.validate_on_device(received, rows[0], op, what + " (and topk_idx values in [-1, num_experts))")
    except RuntimeError:
        if torch.device(device).type == "cpu":
            _handshake.validate(ctx, op, seq, received, cfg_names)
        raise


@dataclasses.dataclass
class DispatchState:
    pending: object
    fmt: RowFormat
    num_local: int
    cap: int
    seq: int
    expert_token_nums_type: int
    plan: Plan
    received: torch.Tensor | None = None


def alloc_dispatch_outputs(x, num_local: int, num_ranks: int, m: int, fmt_name: str, use_ue8m0: bool):
    """Outputs of a dispatch: ``(packed_recv_x, packed_recv_x_scales, packed_recv_count, src_info, layout_range)``."""
    rows, hidden = num_ranks * m, x.shape[1]
    data_dtype = {"bf16": x.dtype, "fp8": torch.float8_e4m3fn, "int8": torch.int8}[fmt_name]
    if fmt_name == "fp8":
        scales = x.new_empty((num_local, rows, hidden // (512 if use_ue8m0 else 128)),
                             dtype=torch.int32 if use_ue8m0 else torch.float32)
    elif fmt_name == "int8":
        scales = x.new_empty((num_local, rows), dtype=torch.float32)
    else:
        scales = x.new_empty((num_local, rows, 0), dtype=torch.float32)
    return (x.new_empty((num_local, rows, hidden), dtype=data_dtype), scales,
            x.new_empty((num_local,), dtype=torch.int32), x.new_empty((num_local, rows), dtype=torch.int32),
            x.new_empty((num_local, num_ranks), dtype=torch.int64))


def dispatch_send(x, topk_idx, m, num_experts, group_name, num_ranks, rank, use_fp8, round_scale, use_ue8m0,
                  quant_mode, num_shared, expert_token_nums_type, op: str = "low_latency_dispatch", check=None,
                  cfg_tail: tuple[int, int] | None = None, cfg_names: list[str] = _CFG) -> DispatchState:
    """Checks and local work (quantization, send plan, send buffer), handshake, and the start of the exchange.

    ``op``, ``check`` (extra checks), ``cfg_tail`` (the last two handshake words) and ``cfg_names`` let
    ``fused_deep_moe`` reuse it under its own name and settings.
    """
    ctx = _registry.get(group_name)
    seq = ctx.next_seq(op, x.shape[0])
    fmt_name = wire_format(use_fp8, quant_mode)

    def prepare():
        checks.check_group(op, group_name, num_ranks=(num_ranks, ctx.num_ranks), rank=(rank, ctx.rank))
        checks.check_low_latency_dispatch(x, topk_idx, m, num_experts, num_ranks, use_fp8, round_scale, use_ue8m0,
                                          quant_mode, num_shared, expert_token_nums_type, op=op)
        if check is not None:
            check()
        data, scales = quant.low_latency_wire(x, fmt_name == "fp8", round_scale, use_ue8m0, quant_mode)
        fields = [("x", data.dtype, data.shape[1])]
        if scales is not None:
            fields.append(("scales", scales.dtype, 1 if scales.dim() == 1 else scales.shape[1]))
        fmt = RowFormat(fields + [("meta", torch.int32, 2)])
        plan = send_plan(topk_idx, num_experts, num_ranks, rank, m, num_shared)
        n, cols = plan.slot.shape
        # One packed row per token plus an all-zero row for empty slots; the send buffer is then a single
        # gather through the inverse of the plan, and only the per-slot meta differs between copies.
        token_rows = torch.zeros(n + 1, fmt.row_bytes, dtype=torch.uint8, device=x.device)
        fmt.pack(n, x.device, out=token_rows[:n], x=data, **({"scales": scales} if scales is not None else {}))
        slots = plan.slot.flatten()
        token = torch.arange(n, device=x.device).repeat_interleave(cols)
        source = torch.full((plan.total + 1,), n, dtype=torch.int64, device=x.device)
        source.index_copy_(0, slots, token)
        meta = torch.full((plan.total + 1, 2), -1, dtype=torch.int32, device=x.device)
        meta.index_copy_(0, slots, torch.stack([plan.local.flatten(), token], dim=1).to(torch.int32))
        send = take_rows(token_rows, source[:plan.total])
        fmt.field_bytes(send, "meta").copy_(meta[:plan.total].view(torch.uint8))
        return fmt, plan, send

    fmt, plan, send = _handshake.run_checks(ctx, op, seq, cfg_names, x.device, prepare)
    tail = (int(round_scale), int(use_ue8m0)) if cfg_tail is None else cfg_tail
    cfg = [m, num_experts, x.shape[1], topk_idx.shape[1], num_shared, ["bf16", "fp8", "int8"].index(fmt_name),
           dtype_code(x.dtype), *tail]
    _agree(ctx, op, seq, cfg, topk_idx, num_experts, x.device, cfg_names)
    num_local = layout.num_local_experts(num_experts, num_ranks, rank, num_shared)
    cap = plan.caps[rank]
    pending = ctx.transport.all_to_all(send, plan.caps, [cap] * num_ranks)
    return DispatchState(pending, fmt, num_local, cap, seq, expert_token_nums_type, plan)


def received(ctx, state, op: str) -> torch.Tensor:
    """The exchanged bytes of ``state``, waited for once (a receive half may run again, e.g. in opcheck)."""
    if state.received is None:
        state.received = _waits.wait(ctx, state.pending, op, state.seq)
    return state.received


@dataclasses.dataclass
class ReceivedRows:
    """Where a dispatch's received rows belong: ``expert`` per row (``L`` for an empty slot), ``counts``
    ``[L, R]`` rows per (local expert, source rank), ``order`` the rows sorted by expert (stable, so in
    (source rank, token) order within an expert) and ``pos`` each row's position within its expert."""

    expert: torch.Tensor
    counts: torch.Tensor
    order: torch.Tensor
    pos: torch.Tensor


def sort_received(state: DispatchState, recv: torch.Tensor, num_ranks: int) -> ReceivedRows:
    num_local, device = state.num_local, recv.device
    expert = state.fmt.view(recv, "meta")[:, 0].long()
    expert = torch.where(expert >= 0, expert, num_local)
    source = torch.arange(recv.shape[0], device=device) // state.cap
    per_pair = torch.zeros((num_local + 1) * num_ranks, dtype=torch.int64, device=device)
    per_pair.index_add_(0, expert * num_ranks + source, torch.ones_like(source))
    per_pair = per_pair.view(num_local + 1, num_ranks)
    order = torch.argsort(expert, stable=True)
    per_expert = per_pair.sum(1)
    pos = torch.empty_like(order)
    pos[order] = torch.arange(order.numel(), device=device) - (torch.cumsum(per_expert, 0) - per_expert)[expert[order]]
    return ReceivedRows(expert, per_pair[:num_local], order, pos)


def dispatch_recv(ctx, state: DispatchState, outputs) -> None:
    """Waits for the exchange and fills ``outputs`` (see :func:`alloc_dispatch_outputs`)."""
    packed, packed_scales, count, src_info, layout_range = outputs
    recv = received(ctx, state, "low_latency_dispatch")
    fmt, num_local = state.fmt, state.num_local
    rows = packed.shape[1]
    sorted_rows = sort_received(state, recv, ctx.num_ranks)
    counts, pos = sorted_rows.counts, sorted_rows.pos
    valid = sorted_rows.expert < num_local
    token = fmt.view(recv, "meta")[:, 1]
    per_expert = counts.sum(1)
    # Invalid rows go to padding positions, the q-th one to the q-th free row, so writes never collide.
    free = rows - per_expert
    free_end = torch.cumsum(free, 0)
    q = torch.cumsum((~valid).to(torch.int64), 0) - 1
    pad_expert = torch.searchsorted(free_end, q, right=True).clamp(max=num_local - 1)
    pad_row = per_expert[pad_expert] + q - (free_end - free)[pad_expert]
    dest = torch.where(valid, sorted_rows.expert * rows + pos, pad_expert * rows + pad_row)
    # Byte-wise row copies: no float8 kernels needed, and word-sized moves are fast.
    put_rows(packed.view(num_local * rows, -1), dest, fmt.field_bytes(recv, "x"))
    if "scales" in fmt.fields:
        put_rows(packed_scales.view(num_local * rows, -1), dest, fmt.field_bytes(recv, "scales"))
    src_info.fill_(-1)
    src_info.view(-1).index_copy_(0, dest, torch.where(valid, token, -1))
    begin = torch.cumsum(counts, 1) - counts
    layout_range.copy_((begin << 32) | counts)
    count.copy_(layout.expert_counts_output(per_expert.to(torch.int32), state.expert_token_nums_type))


def low_latency_dispatch(x, topk_idx, num_max_dispatch_tokens_per_rank, num_experts, group_name, num_ranks, rank,
                         use_fp8=True, round_scale=False, use_ue8m0=False, quant_mode="none",
                         num_shared_expert_ranks=0, expert_token_nums_type=1, comm_seq=None):
    state = dispatch_send(x, topk_idx, num_max_dispatch_tokens_per_rank, num_experts, group_name, num_ranks, rank,
                          use_fp8, round_scale, use_ue8m0, quant_mode, num_shared_expert_ranks, expert_token_nums_type)
    outputs = alloc_dispatch_outputs(x, state.num_local, num_ranks, num_max_dispatch_tokens_per_rank,
                                     wire_format(use_fp8, quant_mode), use_ue8m0)
    dispatch_recv(_registry.get(group_name), state, outputs)
    return (*outputs, _handshake.next_comm_seq(comm_seq, x))


@dataclasses.dataclass
class CombineState:
    pending: object
    plan: Plan
    topk_weights: torch.Tensor
    dtype: torch.dtype
    seq: int
    received: torch.Tensor | None = None


def combine_send(x, topk_idx, topk_weights, src_info, layout_range, m, num_experts, group_name, num_ranks, rank,
                 num_shared) -> CombineState:
    ctx = _registry.get(group_name)
    op = "low_latency_combine"
    seq = ctx.next_seq(op, x.shape[0])

    def prepare():
        checks.check_group(op, group_name, num_ranks=(num_ranks, ctx.num_ranks), rank=(rank, ctx.rank))
        checks.check_low_latency_combine(x, topk_idx, topk_weights, src_info, layout_range, m, num_experts,
                                         num_ranks, rank, num_shared)
        # Expert side: chunk for source s = its rows in the order it sent them (local expert, token).
        num_local, rows, hidden = x.shape
        counts = (layout_range & 0xFFFFFFFF).t()  # [R, L]
        begin = (layout_range >> 32).t()
        cum = torch.cumsum(counts, 1)
        cap = chunk_caps(num_ranks, m, topk_idx.shape[1], num_experts, num_shared)[rank]
        j = torch.arange(cap, device=x.device).expand(num_ranks, cap).contiguous()
        expert = torch.searchsorted(cum, j, right=True)
        valid = expert < num_local
        expert = expert.clamp(max=num_local - 1)
        offset = j - (cum - counts).gather(1, expert)
        flat = torch.where(valid, expert * rows + begin.gather(1, expert) + offset, 0)
        send = take_rows(x.reshape(num_local * rows, hidden), flat.flatten())
        return cap, send, send_plan(topk_idx, num_experts, num_ranks, rank, m, num_shared)

    cap, send, plan = _handshake.run_checks(ctx, op, seq, _CFG, x.device, prepare)
    cfg = [m, num_experts, x.shape[2], topk_idx.shape[1], num_shared, 0, dtype_code(x.dtype), 0, 0]
    _agree(ctx, op, seq, cfg, topk_idx, num_experts, x.device)
    pending = ctx.transport.all_to_all(send, [cap] * num_ranks, plan.caps)
    return CombineState(pending, plan, topk_weights, x.dtype, seq)


def combine_recv(ctx, state: CombineState, out: torch.Tensor) -> None:
    """Waits for the expert outputs and writes the weighted sum into ``out`` ``[N, H]``."""
    recv = received(ctx, state, "low_latency_combine").view(state.dtype)
    plan, k = state.plan, state.topk_weights.shape[1]
    slot = plan.slot
    valid = (slot < plan.total).unsqueeze(-1)
    gathered = take_rows(recv, slot.clamp(max=plan.total - 1).flatten()).view(state.dtype)
    rows = torch.where(valid, gathered.view(*slot.shape, recv.shape[1]).float(), 0.0)
    acc = (state.topk_weights.unsqueeze(-1) * rows[:, :k]).sum(dim=1)
    if slot.shape[1] > k:
        acc = acc + rows[:, k]
    out.copy_(acc)


def low_latency_combine(x, topk_idx, topk_weights, src_info, layout_range, num_max_dispatch_tokens_per_rank,
                        num_experts, group_name, num_ranks, rank, num_shared_expert_ranks=0, comm_seq=None):
    state = combine_send(x, topk_idx, topk_weights, src_info, layout_range, num_max_dispatch_tokens_per_rank,
                         num_experts, group_name, num_ranks, rank, num_shared_expert_ranks)
    out = x.new_empty((topk_idx.shape[0], x.shape[2]))
    combine_recv(_registry.get(group_name), state, out)
    return out, _handshake.next_comm_seq(comm_seq, x)


# --- return_recv_hook: send and receive halves ---------------------------------------------------------

def _hold(ctx, state) -> torch.Tensor:
    """A token for an exchange in flight: a CPU ``[1]`` int64 holding the op's sequence number (reading it
    is never a device sync, and clones of it work). The state is dropped when the token dies."""
    token = torch.tensor([state.seq], dtype=torch.int64)
    ctx.pending[state.seq] = state
    weakref.finalize(token, ctx.pending.pop, state.seq, None)
    return token


def _claim(ctx, token: torch.Tensor, op: str):
    state = ctx.pending.get(int(token.item()))
    if state is None:
        raise RuntimeError(f"deepep::{op}: expected the recv_token returned by a send on group "
                           f"{ctx.group_name!r}, got an unknown one (was clean_low_latency_buffer called?)")
    return state


def low_latency_dispatch_send(x, topk_idx, num_max_dispatch_tokens_per_rank, num_experts, group_name, num_ranks,
                              rank, use_fp8=True, round_scale=False, use_ue8m0=False, quant_mode="none",
                              num_shared_expert_ranks=0, expert_token_nums_type=1, comm_seq=None):
    state = dispatch_send(x, topk_idx, num_max_dispatch_tokens_per_rank, num_experts, group_name, num_ranks, rank,
                          use_fp8, round_scale, use_ue8m0, quant_mode, num_shared_expert_ranks, expert_token_nums_type)
    outputs = alloc_dispatch_outputs(x, state.num_local, num_ranks, num_max_dispatch_tokens_per_rank,
                                     wire_format(use_fp8, quant_mode), use_ue8m0)
    return (*outputs, _hold(_registry.get(group_name), state), _handshake.next_comm_seq(comm_seq, x))


def low_latency_dispatch_recv(packed_recv_x, packed_recv_x_scales, packed_recv_count, src_info, layout_range,
                              recv_token, group_name) -> None:
    ctx = _registry.get(group_name)
    state = _claim(ctx, recv_token, "low_latency_dispatch_recv")
    dispatch_recv(ctx, state, (packed_recv_x, packed_recv_x_scales, packed_recv_count, src_info, layout_range))


def low_latency_combine_send(x, topk_idx, topk_weights, src_info, layout_range, num_max_dispatch_tokens_per_rank,
                             num_experts, group_name, num_ranks, rank, num_shared_expert_ranks=0, comm_seq=None):
    state = combine_send(x, topk_idx, topk_weights, src_info, layout_range, num_max_dispatch_tokens_per_rank,
                         num_experts, group_name, num_ranks, rank, num_shared_expert_ranks)
    return (x.new_empty((topk_idx.shape[0], x.shape[2])), _hold(_registry.get(group_name), state),
            _handshake.next_comm_seq(comm_seq, x))


def low_latency_combine_recv(combined_x, recv_token, group_name) -> None:
    ctx = _registry.get(group_name)
    combine_recv(ctx, _claim(ctx, recv_token, "low_latency_combine_recv"), combined_x)


def drain(group_name: str) -> int:
    """Completes and drops every exchange still in flight on the group (``clean_low_latency_buffer``)."""
    ctx = _registry.get(group_name)
    states = list(ctx.pending.values())
    ctx.pending.clear()
    for state in states:
        received(ctx, state, "clean_low_latency_buffer")
    return len(states)


for _name, _kernel in (("low_latency_dispatch", low_latency_dispatch),
                       ("low_latency_dispatch_send", low_latency_dispatch_send),
                       ("low_latency_dispatch_recv", low_latency_dispatch_recv),
                       ("low_latency_combine", low_latency_combine),
                       ("low_latency_combine_send", low_latency_combine_send),
                       ("low_latency_combine_recv", low_latency_combine_recv)):
    lib.impl(_name, _kernel, "CompositeExplicitAutograd")
