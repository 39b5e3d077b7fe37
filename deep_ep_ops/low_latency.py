"""Kernels of the low-latency ops: static shapes, no host sync, no data-dependent allocation.

Dispatch packs one ``[payload | scales | local expert | source token]`` row per token, gathers the send
buffer through the plan of ``_ll_plan`` (one bounded chunk per destination) and moves it with the
backend's ``bounded slots`` level, which reports how many rows of each chunk are real. The receiver sorts
the real rows into ``[L, R*M, H]``. Combine is the inverse: the expert side rebuilds each source's chunk
from ``layout_range``, and the source side reads its own plan back for the weighted fp32 sum.

The handshake is validated on the device (``torch._assert_async``): an expert id out of range on any
rank fails every rank, without a host sync. A rank whose local work fails still joins it.
"""

from __future__ import annotations

import dataclasses
import weakref
from typing import NamedTuple

import torch

from meta_kernels import checks

from . import _handshake, _registry, _waits, layout
from ._ll_plan import Plan, combine_send_rows, packed_positions, send_plan, send_source, sort_received
from ._schemas import lib
from ._wire import RowFormat, dense, dtype_code


#: The settings every rank must agree on in a low-latency dispatch (and in fused_deep_moe, which adds its own).
SETTINGS_HEAD = [("num_max_dispatch_tokens_per_rank", int), ("num_experts", int), ("hidden", int), ("num_topk", int),
                 ("num_shared_expert_ranks", int), ("wire_format", int), ("x_dtype", int)]
LowLatencySettings = NamedTuple("LowLatencySettings", [*SETTINGS_HEAD, ("round_scale", int), ("use_ue8m0", int)])


def _agree(ctx, op: str, seq: int, settings: tuple, topk_idx: torch.Tensor, num_experts: int, device) -> None:
    """The header exchange, validated on the device (no host sync, graph-capturable); expert ids out of
    range fail every rank.

    The status words name the first bad id (token, slot, value) from device arithmetic alone. When the
    device assertion fires on CPU, where it is synchronous, every rank reads the received rows back and
    raises the same detailed error as the normal-mode ops; on accelerators the peers of a rank with bad
    input raise the fixed message of the assertion.
    """
    rows = _handshake.header(ctx, op, seq, settings, device=device)
    if topk_idx.numel():
        bad = ((topk_idx < -1) | (topk_idx >= num_experts)).flatten()
        first = bad.to(torch.int8).argmax()
        k = topk_idx.shape[1]
        _handshake.set_status(rows, torch.stack([bad.any() * _handshake.STATUS_EXPERT_OUT_OF_RANGE, first // k,
                                                 first % k, topk_idx.flatten()[first]]))
    received = _handshake.exchange(ctx, op, seq, rows)
    what = ", ".join(type(settings)._fields[:5]) + " and the wire format (and topk_idx values in [-1, num_experts))"
    try:
        _handshake.validate_on_device(received, rows[0], op, what)
    except RuntimeError:
        if torch.device(device).type == "cpu":
            _handshake.validate(ctx, op, seq, received, type(settings))
        raise


@dataclasses.dataclass
class DispatchState:
    pending: object
    fmt: RowFormat
    num_local_experts: int
    cap: int
    seq: int
    expert_token_nums_type: int
    plan: Plan
    received: tuple | None = None


def dispatch_send(x, topk_idx, m, num_experts, group_name, num_ranks, rank, use_fp8, round_scale, use_ue8m0,
                  quant_mode, num_shared, expert_token_nums_type, op: str = "low_latency_dispatch", check=None,
                  settings_type: type = LowLatencySettings, settings_tail: tuple = ()) -> DispatchState:
    """Checks and local work (quantization, send plan, send buffer), handshake, and the start of the exchange.

    ``op``, ``check`` (extra checks), ``settings_type`` and ``settings_tail`` (its fields after
    :data:`SETTINGS_HEAD`, default ``(round_scale, use_ue8m0)``) let ``fused_deep_moe`` reuse it under its
    own name.
    """
    ctx = _registry.get(group_name)
    seq = ctx.next_seq(op, x.shape[0])
    fmt_name = layout.wire_format(use_fp8, quant_mode)

    def prepare():
        checks.check_group(op, group_name, num_ranks=(num_ranks, ctx.num_ranks), rank=(rank, ctx.rank))
        checks.check_low_latency_dispatch(x, topk_idx, m, num_experts, num_ranks, use_fp8, round_scale, use_ue8m0,
                                          quant_mode, num_shared, expert_token_nums_type, op=op)
        if check is not None:
            check()
        if fmt_name == "int8":
            data, scales = ctx.kernels.quantize_int8(x, 0.0)
        elif fmt_name == "fp8":
            data, scales = ctx.kernels.quantize_fp8(x, round_scale, use_ue8m0)
        else:
            data, scales = x, None
        fields = [("x", data.dtype, data.shape[1])]
        if scales is not None:
            fields.append(("scales", scales.dtype, 1 if scales.dim() == 1 else scales.shape[1]))
        fmt = RowFormat(fields + [("meta", torch.int32, 2)])
        plan = send_plan(topk_idx, num_experts, num_ranks, rank, m, num_shared)
        n = x.shape[0]
        # One packed row per token plus an all-zero row for padding; the send buffer is then a single
        # gather through the plan, and only the per-slot meta differs between copies of a token.
        token_rows = torch.zeros(n + 1, fmt.row_bytes, dtype=torch.uint8, device=x.device)
        fmt.pack(n, x.device, out=token_rows[:n], x=data, **({"scales": scales} if scales is not None else {}))
        source, meta = send_source(plan, n)
        return fmt, plan, token_rows, source, meta.view(torch.uint8)

    fmt, plan, token_rows, source, meta = _handshake.run_checks(ctx, op, seq, settings_type, x.device, prepare)
    tail = settings_tail or (int(round_scale), int(use_ue8m0))
    settings = settings_type(m, num_experts, x.shape[1], topk_idx.shape[1], num_shared,
                             layout.WIRE_FORMATS.index(fmt_name), dtype_code(x.dtype), *tail)
    _agree(ctx, op, seq, settings, topk_idx, num_experts, x.device)
    num_local_experts = layout.num_local_experts(num_experts, num_ranks, rank, num_shared)
    cap = plan.caps[rank]
    pending = ctx.transport.exchange_slots(token_rows, source, plan.caps, plan.counts, [cap] * num_ranks, patch=meta,
                                           patch_offset=fmt.fields["meta"][0])
    return DispatchState(pending, fmt, num_local_experts, cap, seq, expert_token_nums_type, plan)


def received(ctx, state, op: str):
    """The exchanged ``(rows, recv_counts)`` of ``state``, waited for once (a receive half may run again,
    e.g. in opcheck)."""
    if state.received is None:
        state.received = _waits.wait(ctx, state.pending, op, state.seq)
    return state.received


def sorted_received(ctx, state: DispatchState, op: str):
    """``(received rows, their ReceivedRows)`` of a dispatch."""
    recv, recv_counts = received(ctx, state, op)
    expert = state.fmt.view(recv, "meta")[:, 0]
    return recv, sort_received(expert, recv_counts, state.cap, state.num_local_experts, ctx.num_ranks)


def dispatch_recv(ctx, state: DispatchState, outputs) -> None:
    """Waits for the exchange and fills ``outputs`` (see ``_shapes.low_latency_dispatch_outputs``)."""
    packed, packed_scales, count, src_info, layout_range = outputs
    recv, sorted_rows = sorted_received(ctx, state, "low_latency_dispatch")
    fmt, num_local_experts, rows = state.fmt, state.num_local_experts, packed.shape[1]
    dest = packed_positions(sorted_rows, num_local_experts, rows)
    # Byte-wise row copies: no float8 kernels needed, and word-sized moves are fast.
    ctx.kernels.scatter_rows(packed.view(num_local_experts * rows, -1), dest, fmt.field_bytes(recv, "x"))
    if "scales" in fmt.fields:
        ctx.kernels.scatter_rows(packed_scales.view(num_local_experts * rows, -1), dest,
                                 fmt.field_bytes(recv, "scales"))
    src_info.fill_(-1)
    src_info.view(-1).index_copy_(0, dest, torch.where(sorted_rows.expert < num_local_experts,
                                                       fmt.view(recv, "meta")[:, 1], -1))
    counts = sorted_rows.counts
    begin = torch.cumsum(counts, 1) - counts
    layout_range.copy_((begin << 32) | counts)
    count.copy_(layout.expert_counts_output(counts.sum(1).to(torch.int32), state.expert_token_nums_type))


def _outputs(x, state: DispatchState, num_ranks: int, m: int, use_fp8: bool, quant_mode: str, use_ue8m0: bool):
    fmt_name = layout.wire_format(use_fp8, quant_mode)
    return layout.low_latency_dispatch_outputs(x, state.num_local_experts, num_ranks, m, fmt_name, use_ue8m0)


def low_latency_dispatch(x, topk_idx, num_max_dispatch_tokens_per_rank, num_experts, group_name, num_ranks, rank,
                         use_fp8=True, round_scale=False, use_ue8m0=False, quant_mode="none",
                         num_shared_expert_ranks=0, expert_token_nums_type=1, comm_seq=None):
    state = dispatch_send(x, topk_idx, num_max_dispatch_tokens_per_rank, num_experts, group_name, num_ranks, rank,
                          use_fp8, round_scale, use_ue8m0, quant_mode, num_shared_expert_ranks, expert_token_nums_type)
    outputs = _outputs(x, state, num_ranks, num_max_dispatch_tokens_per_rank, use_fp8, quant_mode, use_ue8m0)
    dispatch_recv(_registry.get(group_name), state, outputs)
    return (*outputs, _handshake.next_comm_seq(comm_seq, x))


@dataclasses.dataclass
class CombineState:
    pending: object
    plan: Plan
    topk_weights: torch.Tensor
    dtype: torch.dtype
    seq: int
    received: tuple | None = None


def combine_send(x, topk_idx, topk_weights, src_info, layout_range, m, num_experts, group_name, num_ranks, rank,
                 num_shared) -> CombineState:
    ctx = _registry.get(group_name)
    op = "low_latency_combine"
    seq = ctx.next_seq(op, x.shape[0])

    def prepare():
        checks.check_group(op, group_name, num_ranks=(num_ranks, ctx.num_ranks), rank=(rank, ctx.rank))
        checks.check_low_latency_combine(x, topk_idx, topk_weights, src_info, layout_range, m, num_experts,
                                         num_ranks, rank, num_shared)
        num_local_experts, rows, hidden = x.shape
        cap = layout.chunk_caps(num_ranks, m, topk_idx.shape[1], num_experts, num_shared)[rank]
        positions = combine_send_rows(layout_range, cap, rows).flatten()
        send = dense(x).reshape(num_local_experts * rows, hidden).view(torch.uint8)
        return cap, send, positions, send_plan(topk_idx, num_experts, num_ranks, rank, m, num_shared)

    cap, send, positions, plan = _handshake.run_checks(ctx, op, seq, LowLatencySettings, x.device, prepare)
    settings = LowLatencySettings(m, num_experts, x.shape[2], topk_idx.shape[1], num_shared, 0, dtype_code(x.dtype),
                                  0, 0)
    _agree(ctx, op, seq, settings, topk_idx, num_experts, x.device)
    # Each source gets back as many rows as it sent here, in the order it sent them.
    counts = (layout_range & 0xFFFFFFFF).sum(0)
    pending = ctx.transport.exchange_slots(send, positions, [cap] * num_ranks, counts, plan.caps)
    return CombineState(pending, plan, topk_weights, x.dtype, seq)


def combine_recv(ctx, state: CombineState, out: torch.Tensor) -> None:
    """Waits for the expert outputs and writes the weighted sum into ``out`` ``[N, H]``."""
    recv, _ = received(ctx, state, "low_latency_combine")
    out.copy_(ctx.kernels.weighted_reduce(recv.view(state.dtype), state.plan.slot, state.topk_weights))


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
    outputs = _outputs(x, state, num_ranks, num_max_dispatch_tokens_per_rank, use_fp8, quant_mode, use_ue8m0)
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
    _registry.impl(lib, _name, _kernel)
