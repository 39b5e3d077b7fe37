"""Kernels of the normal-mode ops (layout, dispatch, cached dispatch, combine) and their autograd.

Every communicating kernel follows the same steps. First the shared checks; a rank whose checks fail
still joins the handshake so that its peers fail with it. Then the handshake (config agreement, data
checks, the ``[R, R]`` traffic matrix). Then the payload rows, gathered per destination, go through the
group's transport as they are, and the received buffer becomes the output; per-row metadata (expert ids,
weights, scales, source index) travels packed in a parallel exchange. Autograd is DeepEP's duality: the backward of dispatch is a combine
with the same handle, and the backward of combine is a cached dispatch.
"""

from __future__ import annotations

import torch

from meta_kernels import checks

from . import _handshake, _registry, _waits, layout, quant
from ._schemas import lib
from ._wire import RowFormat, dense, dtype_code, take_rows

_DISPATCH_CFG = ["num_experts", "hidden", "x dtype", "x_scales columns", "x_scales dtype", "quant_mode",
                 "num_topk (topk_idx)", "num_topk (topk_weights)", "num_worst_tokens"]
_CACHED_CFG = ["hidden", "x dtype", "x_scales columns", "x_scales dtype", "num_topk (topk_weights)",
               "handle (rank_prefix_matrix)"]
_COMBINE_CFG = ["hidden", "x dtype", "num_topk (topk_weights)", "handle (rank_prefix_matrix)"]


def _width(t: torch.Tensor | None) -> int:
    return -1 if t is None else t.shape[1]


def _fingerprint(rank_prefix_matrix: torch.Tensor) -> int:
    """A number that differs, with overwhelming odds, between the handles of two dispatches."""
    flat = rank_prefix_matrix.flatten().long()
    weights = (torch.arange(flat.numel(), device=flat.device) * 2654435761 + 97) % 2147483647
    return int((flat * weights).sum()) % (1 << 62)


def _handshake_or_raise(ctx, op, seq, cfg, cfg_names, send_counts, status, device, expect_counts=None):
    rows = _handshake.header(ctx, op, seq, cfg, send_counts, status or (0, 0, 0, 0), device, expect_counts)
    received = _handshake.exchange(ctx, op, seq, rows)
    _handshake.validate(ctx, op, seq, received, cfg_names)
    return _handshake.send_matrix(received)


def _exchange(ctx, op: str, seq: int, payload: torch.Tensor, meta: list, send_counts, recv_counts):
    """Sends gathered payload rows as they are, with the small per-row metadata packed alongside.

    Two exchanges in flight together: the payload's gathered rows are the send buffer themselves and
    the received buffer becomes the output, so no pack or unpack pass touches the payload. ``meta`` is
    a list of ``(name, dtype, width, rows)``.

    Returns:
        ``(received payload rows, metadata RowFormat, received metadata rows)``.
    """
    sends, recvs = send_counts.tolist(), recv_counts.tolist()
    pending = ctx.transport.all_to_all(payload, sends, recvs)
    fmt = RowFormat([(name, dtype, width) for name, dtype, width, _ in meta])
    meta_pending = None
    if meta:
        packed = fmt.pack(payload.shape[0], payload.device, **{name: rows for name, _, _, rows in meta})
        meta_pending = ctx.transport.all_to_all(packed, sends, recvs)
    received = _waits.wait(ctx, pending, op, seq)
    return received, fmt, None if meta_pending is None else _waits.wait(ctx, meta_pending, op, seq)


def _padded(rows: torch.Tensor, total: int, fill) -> torch.Tensor:
    """``rows`` padded with ``fill`` to ``total`` rows, as a fresh contiguous tensor."""
    out = rows.new_full((total, *rows.shape[1:]), fill) if total > rows.shape[0] else rows.new_empty(rows.shape)
    out[:rows.shape[0]] = rows
    return out


def _payload_out(recv: torch.Tensor, dtype: torch.dtype, total: int) -> torch.Tensor:
    """The received payload as the output: the exchange's own fresh buffer, copied only to pad it."""
    rows = recv.view(dtype)
    return rows if total == rows.shape[0] else _padded(rows, total, 0)


def _meta(fields: list, token: torch.Tensor, **tensors: torch.Tensor | None) -> None:
    """Appends ``(name, dtype, width, gathered rows)`` for each tensor given."""
    for name, t in tensors.items():
        if t is not None:
            fields.append((name, t.dtype, 1 if t.dim() == 1 else t.shape[1], take_rows(t, token)))


def get_dispatch_layout(topk_idx, num_experts, group_name, num_ranks, num_ranks_per_node):
    op = "get_dispatch_layout"
    ctx = _registry.get(group_name)
    checks.check_group(op, group_name, num_ranks=(num_ranks, ctx.num_ranks),
                       num_ranks_per_node=(num_ranks_per_node, ctx.num_ranks_per_node))
    checks.check_layout(topk_idx, num_experts, num_ranks, num_ranks_per_node)
    status = _handshake.expert_id_status(topk_idx, num_experts)
    if status is not None:
        raise RuntimeError(_handshake.expert_out_of_range(op, num_experts, *status[1:]))
    return layout.get_dispatch_layout(topk_idx, num_experts, num_ranks, num_ranks_per_node)


def dispatch(x, x_scales, topk_idx, topk_weights, is_token_in_rank, num_tokens_per_expert, num_experts, group_name,
             num_ranks, expert_alignment=1, num_worst_tokens=0, quant_mode="none", expert_token_nums_type=1,
             comm_seq=None):
    op = "dispatch"
    ctx = _registry.get(group_name)
    seq, rank = ctx.next_seq(op, x.shape[0]), ctx.rank
    local = num_experts // max(num_ranks, 1)

    def prepare():
        checks.check_group(op, group_name, num_ranks=(num_ranks, ctx.num_ranks))
        checks.check_dispatch(x, x_scales, topk_idx, topk_weights, is_token_in_rank, num_tokens_per_expert,
                              num_experts, num_ranks, expert_alignment, num_worst_tokens, quant_mode,
                              expert_token_nums_type)
        status = _handshake.expert_id_status(topk_idx, num_experts)
        if status is None and topk_idx is not None:
            expected = layout.token_in_rank(layout.expert_rank(topk_idx, local), num_ranks)
            wrong = expected != is_token_in_rank
            if bool(wrong.any()):
                t, r = (int(i) for i in wrong.nonzero()[0])
                status = (_handshake.STATUS_LAYOUT_MISMATCH, t, r, int(is_token_in_rank[t, r]))
        data, scales = quant.per_token_int8(x) if quant_mode == "int8" else (x, x_scales)
        _, token = is_token_in_rank.t().nonzero(as_tuple=True)  # destination-major, ascending tokens
        meta = [("src_idx", torch.int32, 1, token.to(torch.int32))]
        _meta(meta, token, scales=scales, topk_idx=topk_idx, topk_weights=topk_weights)
        return status, data, scales, take_rows(data, token), meta

    status, data, scales, payload, meta = _handshake.run_checks(ctx, op, seq, _DISPATCH_CFG, x.device, prepare)
    cfg = [num_experts, x.shape[1], dtype_code(x.dtype), _width(x_scales),
           dtype_code(None if x_scales is None else x_scales.dtype), int(quant_mode == "int8"),
           _width(topk_idx), _width(topk_weights), num_worst_tokens]
    send_counts = is_token_in_rank.sum(0)
    matrix = _handshake_or_raise(ctx, op, seq, cfg, _DISPATCH_CFG, send_counts, status, x.device)
    recv_totals = matrix.sum(0)
    if num_worst_tokens > 0 and bool((recv_totals > num_worst_tokens).any()):
        r = int((recv_totals > num_worst_tokens).nonzero()[0])
        raise RuntimeError(f"deepep::dispatch: expected at most num_worst_tokens={num_worst_tokens} tokens received "
                           f"per rank, got {int(recv_totals[r])} on rank {r}")
    recv, fmt, recv_meta = _exchange(ctx, op, seq, payload, meta, send_counts, matrix[:, rank])

    n = recv.shape[0]
    total = max(n, num_worst_tokens)
    recv_x = _payload_out(recv, data.dtype, total)
    if scales is None:
        recv_x_scales = x.new_empty((total, 0), dtype=torch.float32)
    else:
        recv_x_scales = _padded(fmt.view(recv_meta, "scales"), total, 0)
        if scales.dim() == 1:
            recv_x_scales = recv_x_scales.view(total)
    recv_topk_idx = torch.empty(total, 0, dtype=torch.int64, device=x.device)
    recv_topk_weights = torch.empty(total, 0, dtype=torch.float32, device=x.device)
    if topk_idx is not None:
        ids = fmt.view(recv_meta, "topk_idx")
        mine = (ids >= rank * local) & (ids < (rank + 1) * local)
        local_ids = torch.where(mine, ids - rank * local, torch.full_like(ids, -1))
        recv_topk_idx = _padded(local_ids, total, -1)
        counts = layout.token_in_rank(local_ids, local).sum(0, dtype=torch.int32)
        if topk_weights is not None:
            w = fmt.view(recv_meta, "topk_weights")
            recv_topk_weights = _padded(torch.where(mine, w, torch.zeros_like(w)), total, 0)
    else:
        ones = [1] * num_ranks
        pending = ctx.transport.all_to_all(num_tokens_per_expert.view(num_ranks, local).long(), ones, ones)
        counts = _waits.wait(ctx, pending, op, seq).sum(0).to(torch.int32)
    counts = layout.expert_counts_output(layout.align_up(counts, expert_alignment), expert_token_nums_type)
    order = is_token_in_rank.to(torch.int32).cumsum(0) - 1
    send_head = torch.where(is_token_in_rank, order, torch.full_like(order, -1)).to(torch.int32)
    return (recv_x, recv_x_scales, recv_topk_idx, recv_topk_weights, counts,
            matrix.cumsum(0).to(torch.int32), send_counts.to(torch.int32).view(num_ranks, 1),
            torch.zeros(num_ranks, 1, dtype=torch.int32, device=x.device),
            _padded(fmt.view(recv_meta, "src_idx").view(n), total, -1), send_head, _handshake.next_comm_seq(comm_seq, x))


def _handle_rows_status(valid: int, rows: int):
    """A handle claiming more received rows than there are is corrupt (status for the handshake)."""
    return None if valid <= rows else (_handshake.STATUS_HANDLE_ROWS, valid, rows, 0)


def cached_dispatch(x, x_scales, topk_weights, handle, group_name, num_ranks, comm_seq=None):
    op = "cached_dispatch"
    ctx = _registry.get(group_name)
    seq, rank = ctx.next_seq(op, x.shape[0]), ctx.rank

    def prepare():
        checks.check_group("dispatch", group_name, num_ranks=(num_ranks, ctx.num_ranks))
        checks.check_cached_dispatch(x, x_scales, topk_weights, handle, num_ranks)
        is_token_in_rank = handle[4]
        _, token = is_token_in_rank.t().nonzero(as_tuple=True)
        meta = []
        _meta(meta, token, scales=x_scales, topk_weights=topk_weights)
        column = handle[0][:, rank].long()
        status = _handle_rows_status(int(column[-1]), handle[3].shape[0])
        return status, torch.diff(column, prepend=column.new_zeros(1)), take_rows(x, token), meta

    status, expect, payload, meta = _handshake.run_checks(ctx, op, seq, _CACHED_CFG, x.device, prepare)
    rank_prefix_matrix, _, _, recv_src_idx, is_token_in_rank, _ = handle
    cfg = [x.shape[1], dtype_code(x.dtype), _width(x_scales), dtype_code(None if x_scales is None else x_scales.dtype),
           _width(topk_weights), _fingerprint(rank_prefix_matrix)]
    send_counts = is_token_in_rank.sum(0)
    matrix = _handshake_or_raise(ctx, op, seq, cfg, _CACHED_CFG, send_counts, status, x.device, expect)
    recv, fmt, recv_meta = _exchange(ctx, op, seq, payload, meta, send_counts, matrix[:, rank])
    total = recv_src_idx.shape[0]
    recv_x_scales = (_padded(fmt.view(recv_meta, "scales"), total, 0) if x_scales is not None
                     else x.new_empty((total, 0), dtype=torch.float32))
    recv_topk_weights = (_padded(fmt.view(recv_meta, "topk_weights"), total, 0) if topk_weights is not None
                         else x.new_empty((total, 0), dtype=torch.float32))
    return _payload_out(recv, x.dtype, total), recv_x_scales, recv_topk_weights, _handshake.next_comm_seq(comm_seq, x)


def combine(x, handle, topk_weights, bias_0, bias_1, group_name, num_ranks, comm_seq=None):
    op = "combine"
    ctx = _registry.get(group_name)
    seq, rank = ctx.next_seq(op, x.shape[0]), ctx.rank

    def prepare():
        checks.check_group(op, group_name, num_ranks=(num_ranks, ctx.num_ranks))
        checks.check_combine(x, handle, topk_weights, bias_0, bias_1, num_ranks)
        column = handle[0][:, rank].long()
        valid = int(column[-1])
        meta = [] if topk_weights is None else [("topk_weights", torch.float32, topk_weights.shape[1],
                                                  topk_weights[:valid])]
        return (_handle_rows_status(valid, x.shape[0]), torch.diff(column, prepend=column.new_zeros(1)),
                dense(x[:valid]).contiguous().view(torch.uint8), meta)

    status, per_source, payload, meta = _handshake.run_checks(ctx, op, seq, _COMBINE_CFG, x.device, prepare)
    rank_prefix_matrix, _, _, _, is_token_in_rank, _ = handle
    cfg = [x.shape[1], dtype_code(x.dtype), _width(topk_weights), _fingerprint(rank_prefix_matrix)]
    matrix = _handshake_or_raise(ctx, op, seq, cfg, _COMBINE_CFG, per_source, status, x.device,
                                 is_token_in_rank.sum(0))
    recv, fmt, recv_meta = _exchange(ctx, op, seq, payload, meta, per_source, matrix[:, rank])
    _, token = is_token_in_rank.t().nonzero(as_tuple=True)  # rows arrive destination-major, like dispatch sent them
    num_tokens = is_token_in_rank.shape[0]
    acc = torch.zeros(num_tokens, x.shape[1], dtype=torch.float32, device=x.device)
    for bias in (bias_0, bias_1):
        if bias is not None:
            acc += bias.float()
    rows = recv.view(x.dtype)
    # fp32 accumulation in cache-sized chunks: converting all received rows at once would write (and
    # page-fault) a second, twice as large copy of the payload.
    step = max(1, (1 << 21) // max(1, x.shape[1]))
    for begin in range(0, rows.shape[0], step):
        acc.index_add_(0, token[begin:begin + step], rows[begin:begin + step].float())
    combined_w = x.new_empty((num_tokens, 0), dtype=torch.float32)
    if topk_weights is not None:
        combined_w = torch.zeros(num_tokens, topk_weights.shape[1], device=x.device)
        combined_w.index_add_(0, token, fmt.view(recv_meta, "topk_weights"))
    return acc.to(x.dtype), combined_w, _handshake.next_comm_seq(comm_seq, x)


# --- autograd: dispatch.backward = combine, combine.backward = cached dispatch ------------------------

def _per_input(ctx, grads: tuple) -> tuple:
    """One gradient per input *as passed*: the dispatcher drops trailing arguments equal to their
    defaults before autograd sees them (``setup_context`` gets them filled back in), and autograd
    checks the structure against what was passed, which ``ctx.needs_input_grad`` mirrors."""
    passed = len(ctx.needs_input_grad)
    return grads[:passed] + (None,) * (passed - len(grads))


def _handle_from_dispatch(inputs, output) -> list[torch.Tensor]:
    return [output[5], output[6], output[7], output[8], inputs[4], output[9]]


def _setup_dispatch(ctx, inputs, output):
    x, topk_weights = inputs[0], inputs[3]
    ctx.save_for_backward(*_handle_from_dispatch(inputs, output), output[2])
    ctx.group_name, ctx.num_ranks = inputs[7], inputs[8]
    ctx.x_grad = x.dtype in checks.FLOAT_DTYPES and inputs[11] != "int8"
    ctx.has_weights = topk_weights is not None
    ctx.recv_shape = output[0].shape


def _backward_dispatch(ctx, grad_recv_x, _gs, _gi, grad_recv_topk_weights, *_rest):
    *handle, recv_topk_idx = ctx.saved_tensors
    if grad_recv_x is None:
        grad_recv_x = handle[0].new_zeros(ctx.recv_shape, dtype=torch.float32)
    weights = None
    if ctx.has_weights and grad_recv_topk_weights is not None:
        # Slots whose expert lives elsewhere were zeroed by dispatch: no gradient from this rank.
        weights = torch.where(recv_topk_idx >= 0, grad_recv_topk_weights, torch.zeros_like(grad_recv_topk_weights))
    grad_x, grad_w, _ = torch.ops.deepep.combine(grad_recv_x, handle, weights, None, None, ctx.group_name,
                                                 ctx.num_ranks)
    grads = (grad_x if ctx.x_grad else None, None, None, grad_w if weights is not None else None)
    return _per_input(ctx, grads)


def _setup_cached(ctx, inputs, output):
    ctx.save_for_backward(*inputs[3])
    ctx.group_name, ctx.num_ranks = inputs[4], inputs[5]
    ctx.has_weights = inputs[2] is not None
    ctx.num_handle = len(inputs[3])


def _backward_cached(ctx, grad_recv_x, _gs, grad_recv_topk_weights, _gseq):
    handle = list(ctx.saved_tensors)
    weights = grad_recv_topk_weights if ctx.has_weights else None
    grad_x, grad_w, _ = torch.ops.deepep.combine(grad_recv_x, handle, weights, None, None, ctx.group_name,
                                                 ctx.num_ranks)
    grads = (grad_x, None, grad_w if ctx.has_weights else None, [None] * ctx.num_handle, None, None, None)
    return _per_input(ctx, grads)


def _setup_combine(ctx, inputs, output):
    x, handle, topk_weights, bias_0, bias_1 = inputs[:5]
    ctx.save_for_backward(*handle)
    ctx.group_name, ctx.num_ranks = inputs[5], inputs[6]
    ctx.flags = (topk_weights is not None, bias_0 is not None, bias_1 is not None)
    ctx.num_handle = len(handle)


def _backward_combine(ctx, grad_combined_x, grad_combined_w, _gseq):
    handle = list(ctx.saved_tensors)
    has_w, has_b0, has_b1 = ctx.flags
    w = grad_combined_w if has_w else None
    grad_x, _, grad_w, _ = torch.ops.deepep.dispatch.cached(grad_combined_x, None, w, handle, ctx.group_name,
                                                            ctx.num_ranks)
    grads = (grad_x, [None] * ctx.num_handle, grad_w if has_w else None, grad_combined_x if has_b0 else None,
             grad_combined_x if has_b1 else None, None, None, None)
    return _per_input(ctx, grads)


for _name, _kernel in (("get_dispatch_layout", get_dispatch_layout), ("dispatch", dispatch),
                       ("dispatch.cached", cached_dispatch), ("combine", combine)):
    lib.impl(_name, _kernel, "CompositeExplicitAutograd")
torch.library.register_autograd("deepep::dispatch", _backward_dispatch, setup_context=_setup_dispatch, lib=lib)
torch.library.register_autograd("deepep::dispatch.cached", _backward_cached, setup_context=_setup_cached, lib=lib)
torch.library.register_autograd("deepep::combine", _backward_combine, setup_context=_setup_combine, lib=lib)
