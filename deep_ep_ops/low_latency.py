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
from ._ll_plan import Plan, packed_positions, rows_to_sort, sort_received
from ._schemas import lib
from ._wire import RowFormat, dense, dtype_code


#: The settings every rank must agree on in a low-latency dispatch (and in fused_deep_moe, which adds its own).
SETTINGS_HEAD = [("num_max_dispatch_tokens_per_rank", int), ("num_experts", int), ("hidden", int), ("num_topk", int),
                 ("num_shared_expert_ranks", int), ("wire_format", int), ("x_dtype", int)]
LowLatencySettings = NamedTuple("LowLatencySettings", [*SETTINGS_HEAD, ("round_scale", int), ("use_ue8m0", int)])


def _agree(ctx, op: str, seq: int, settings: tuple, topk_idx: torch.Tensor, num_experts: int, device) -> None:
    """The header exchange; expert ids out of range fail every rank.

    On CPU it is validated on the host, where reading costs nothing, and every rank raises the same
    detailed error. On accelerators it is validated on the device (no host sync, graph-capturable): the
    status words name the first bad id (token, slot, value) from device arithmetic alone, and the peers of
    a rank with bad input raise the fixed message of the assertion while that rank raises the detailed one.
    """
    if not static_shapes(torch.device(device)):
        status = _handshake.expert_id_status(topk_idx, num_experts)
        _handshake.agree(ctx, op, seq, settings, status=status)
        return
    rows = _handshake.header(ctx, op, seq, settings, device=device)
    if topk_idx.numel():
        bad = ((topk_idx < -1) | (topk_idx >= num_experts)).flatten()
        first = bad.to(torch.int8).argmax()
        k = topk_idx.shape[1]
        _handshake.set_status(rows, torch.stack([bad.any() * _handshake.STATUS_EXPERT_OUT_OF_RANGE, first // k,
                                                 first % k, topk_idx.flatten()[first]]))
    received = _handshake.exchange(ctx, op, seq, rows)
    what = ", ".join(type(settings)._fields[:5]) + " and the wire format (and topk_idx values in [-1, num_experts))"
    _handshake.validate_on_device(received, rows[0], op, what)


def _start(ctx, op: str, seq: int, settings_type: type, device, prepare, settings, topk_idx, num_experts: int,
           exchange):
    """The op's local work, the agreement with its peers, and the start of its slot exchange.

    ``prepare()`` does the checks and the local work; ``settings()`` gives the settings every rank must agree
    on; ``exchange(prepared, header)`` starts the exchange. On a backend whose slots carry the op's header
    (one-sided, ``Transport.carries_headers``) the handshake travels with the rows, so no round trip comes
    before them: a rank whose local work fails sends its failed header alone, then raises, and its peers raise
    the same error when they read it (:func:`received`). Elsewhere the handshake runs first (:func:`_agree`),
    since a two-sided exchange of mismatched sizes must never start.
    """
    if not ctx.transport.carries_headers:
        prepared = _handshake.run_checks(ctx, op, seq, settings_type, device, prepare)
        _agree(ctx, op, seq, settings(), topk_idx, num_experts, device)
        return exchange(prepared, None)
    try:
        prepared = prepare()
    except Exception as exc:  # noqa: BLE001  (whatever went wrong locally, the peers must hear of it)
        message = _handshake.describe(op, exc)
        header = _handshake.failed_header(ctx, op, seq, message, settings_type)
        none = [0] * ctx.num_ranks
        ctx.transport.exchange_slots(torch.empty(0, 8, dtype=torch.uint8), None, none,
                                     torch.zeros(ctx.num_ranks, dtype=torch.int64), none, header=header)
        raise RuntimeError(f"{message} (on rank {ctx.rank})") from exc
    status = _handshake.expert_id_status(topk_idx, num_experts)
    return exchange(prepared, _handshake.header(ctx, op, seq, settings(), status=status or _handshake.STATUS_OK))


@dataclasses.dataclass
class DispatchState:
    pending: object
    fmt: RowFormat
    num_local_experts: int
    cap: int
    seq: int
    expert_token_nums_type: int
    plan: Plan
    settings_type: type
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
        plan, source, meta = _plan(ctx, topk_idx, num_experts, num_ranks, rank, m, num_shared)
        n = x.shape[0]
        # One packed row per token plus an all-zero row for padding; the send buffer is then a single
        # gather through the plan, and only the per-slot meta differs between copies of a token.
        token_rows = torch.zeros(n + 1, fmt.row_bytes, dtype=torch.uint8, device=x.device)
        fmt.pack(n, x.device, out=token_rows[:n], x=data, **({"scales": scales} if scales is not None else {}))
        return fmt, plan, token_rows, source, meta.view(torch.uint8)

    def settings():
        tail = settings_tail or (int(round_scale), int(use_ue8m0))
        return settings_type(m, num_experts, x.shape[1], topk_idx.shape[1], num_shared,
                             layout.WIRE_FORMATS.index(fmt_name), dtype_code(x.dtype), *tail)

    def exchange(prepared, header):
        fmt, plan, token_rows, source, meta = prepared
        cap = plan.caps[rank]
        pending = ctx.transport.exchange_slots(token_rows, source, plan.caps, plan.counts, [cap] * num_ranks,
                                               patch=meta, patch_offset=fmt.fields["meta"][0], header=header)
        num_local_experts = layout.num_local_experts(num_experts, num_ranks, rank, num_shared)
        return DispatchState(pending, fmt, num_local_experts, cap, seq, expert_token_nums_type, plan, settings_type)

    return _start(ctx, op, seq, settings_type, x.device, prepare, settings, topk_idx, num_experts, exchange)


def _plan(ctx, topk_idx, num_experts: int, num_ranks: int, rank: int, m: int, num_shared: int):
    """``(Plan, source, meta)``: the send plan (see ``_ll_plan``) through the group's kernels."""
    slot, counts, source, meta = ctx.kernels.ll_plan(topk_idx, num_experts, num_ranks, rank, m, num_shared)
    caps = layout.chunk_caps(num_ranks, m, topk_idx.shape[1], num_experts, num_shared)
    return Plan(slot, None, caps, sum(caps), counts), source, meta


def received(ctx, state, op: str):
    """The exchanged ``(rows, recv_counts)`` of ``state``, waited for once (a receive half may run again,
    e.g. in opcheck)."""
    if state.received is None:
        recv, recv_counts, recv_header = _waits.wait(ctx, state.pending, op, state.seq)
        if recv_header is not None:  # the handshake came with the rows: check it before using them
            _handshake.validate(ctx, op, state.seq, recv_header, state.settings_type)
        state.received = recv, recv_counts
    return state.received


def static_shapes(device: torch.device) -> bool:
    """Whether a receive must keep every shape static (accelerators, for graph capture): then it handles every
    row of every chunk, sending the ones that are not real to padding. On CPU it handles only the real rows,
    so that its cost follows the tokens sent, not ``M``."""
    return device.type != "cpu"


def sorted_received(ctx, state: DispatchState, op: str, rows_per_expert: int):
    """``(received rows, order, dest, counts [L, R], token)`` of a dispatch: received rows ``order[i]`` goes to
    flat position ``dest[i]`` of ``[L, rows_per_expert]`` and came from source token ``token[i]`` (``-1`` for a
    row that is not real); ``counts`` are the real rows per (local expert, source rank)."""
    recv, recv_counts = received(ctx, state, op)
    meta = state.fmt.view(recv, "meta")
    if not static_shapes(recv.device):
        order, dest, counts = ctx.kernels.ll_sort(meta, recv_counts, state.cap, state.num_local_experts,
                                                  rows_per_expert)
        return recv, order, dest, counts, meta[:, 1].index_select(0, order)
    rows = rows_to_sort(recv_counts, state.cap, ctx.num_ranks, compact=False)
    s = sort_received(meta[:, 0], rows, recv_counts, state.cap, state.num_local_experts, ctx.num_ranks)
    token = torch.where(s.expert < state.num_local_experts, meta[:, 1], -1)
    return recv, rows, packed_positions(s, state.num_local_experts, rows_per_expert), s.counts, token


def dispatch_recv(ctx, state: DispatchState, outputs) -> None:
    """Waits for the exchange and fills ``outputs`` (see ``layout.low_latency_dispatch_outputs``)."""
    packed, packed_scales, count, src_info, layout_range = outputs
    fmt, num_local_experts, rows = state.fmt, state.num_local_experts, packed.shape[1]
    recv, order, dest, counts, token = sorted_received(ctx, state, "low_latency_dispatch", rows)
    # Byte-wise row copies: no float8 kernels needed, and word-sized moves are fast.
    for name, out in (("x", packed), ("scales", packed_scales)):
        if name in fmt.fields:
            ctx.kernels.permute_rows(out.view(num_local_experts * rows, -1), dest, fmt.field_bytes(recv, name), order)
    src_info.fill_(-1)
    src_info.view(-1).index_copy_(0, dest, token)
    begin = torch.cumsum(counts, 1) - counts
    layout_range.copy_((begin << 32) | counts)
    count.copy_(layout.expert_counts_output(counts.sum(1).to(torch.int32), state.expert_token_nums_type))


def _outputs(ctx, x, state: DispatchState, num_ranks: int, m: int, use_fp8: bool, quant_mode: str,
             use_ue8m0: bool):
    """The outputs of a dispatch; the large ones (``[L, R*M, H]``) from the output pool on CPU, so that
    writing the received rows into them costs no page faults."""
    fmt_name = layout.wire_format(use_fp8, quant_mode)
    empty = ctx.outputs.empty if x.device.type == "cpu" else None
    return layout.low_latency_dispatch_outputs(x, state.num_local_experts, num_ranks, m, fmt_name, use_ue8m0, empty)


def low_latency_dispatch(x, topk_idx, num_max_dispatch_tokens_per_rank, num_experts, group_name, num_ranks, rank,
                         use_fp8=True, round_scale=False, use_ue8m0=False, quant_mode="none",
                         num_shared_expert_ranks=0, expert_token_nums_type=1, comm_seq=None):
    state = dispatch_send(x, topk_idx, num_max_dispatch_tokens_per_rank, num_experts, group_name, num_ranks, rank,
                          use_fp8, round_scale, use_ue8m0, quant_mode, num_shared_expert_ranks, expert_token_nums_type)
    ctx = _registry.get(group_name)
    outputs = _outputs(ctx, x, state, num_ranks, num_max_dispatch_tokens_per_rank, use_fp8, quant_mode, use_ue8m0)
    dispatch_recv(ctx, state, outputs)
    return (*outputs, _handshake.next_comm_seq(comm_seq, x))


@dataclasses.dataclass
class CombineState:
    pending: object
    plan: Plan
    topk_weights: torch.Tensor
    dtype: torch.dtype
    seq: int
    settings_type: type = LowLatencySettings
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
        positions = ctx.kernels.ll_combine_rows(layout_range, cap, rows).flatten()
        send = dense(x).reshape(num_local_experts * rows, hidden).view(torch.uint8)
        return cap, send, positions, _plan(ctx, topk_idx, num_experts, num_ranks, rank, m, num_shared)[0]

    def settings():
        return LowLatencySettings(m, num_experts, x.shape[2], topk_idx.shape[1], num_shared, 0, dtype_code(x.dtype),
                                  0, 0)

    def exchange(prepared, header):
        cap, send, positions, plan = prepared
        # Each source gets back as many rows as it sent here, in the order it sent them.
        counts = (layout_range & 0xFFFFFFFF).sum(0)
        pending = ctx.transport.exchange_slots(send, positions, [cap] * num_ranks, counts, plan.caps, header=header)
        return CombineState(pending, plan, topk_weights, x.dtype, seq)

    return _start(ctx, op, seq, LowLatencySettings, x.device, prepare, settings, topk_idx, num_experts, exchange)


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
    ctx = _registry.get(group_name)
    outputs = _outputs(ctx, x, state, num_ranks, num_max_dispatch_tokens_per_rank, use_fp8, quant_mode, use_ue8m0)
    return (*outputs, _hold(ctx, state), _handshake.next_comm_seq(comm_seq, x))


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
        if hasattr(state, "drain"):  # a backend's own exchange (transports/_shm_low_latency)
            state.drain(ctx)
        else:
            received(ctx, state, "clean_low_latency_buffer")
    return len(states)


for _name, _kernel in (("low_latency_dispatch", low_latency_dispatch),
                       ("low_latency_dispatch_send", low_latency_dispatch_send),
                       ("low_latency_dispatch_recv", low_latency_dispatch_recv),
                       ("low_latency_combine", low_latency_combine),
                       ("low_latency_combine_send", low_latency_combine_send),
                       ("low_latency_combine_recv", low_latency_combine_recv)):
    _registry.impl(lib, _name, _kernel)
