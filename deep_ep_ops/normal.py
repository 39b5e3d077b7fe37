"""Kernels of the normal-mode ops (layout, dispatch, cached dispatch, combine) and their autograd.

Every communicating kernel follows the same steps:

1. **prepare** — the shared checks and all local work (quantization, per-token metadata rows). Whatever
   fails here, the rank still joins the handshake with a failed status, so that its peers fail with it.
2. **agree** — the handshake (settings agreement, data checks, the ``[R, R]`` traffic matrix).
3. **exchange** — through the backend's ``tokens`` level: the payload rows (which become ``recv_x``) and,
   in parallel, the per-token metadata (source index, expert ids, weights, scales) packed into one row.
4. **finish** — local expert ids, masked weights, per-expert counts and the handle.

Autograd is DeepEP's duality: the backward of dispatch is a combine with the same handle, and the
backward of combine is a cached dispatch.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from meta_kernels import checks

from . import _handshake, _registry, _waits, layout
from ._schemas import lib
from ._wire import RowFormat, dtype_code
from .transports.base import Route


class DispatchSettings(NamedTuple):
    num_experts: int
    hidden: int
    x_dtype: int
    x_scales_columns: int
    x_scales_dtype: int
    quant_mode: int
    num_topk: int
    num_topk_weights: int
    num_worst_tokens: int


class CachedSettings(NamedTuple):
    hidden: int
    x_dtype: int
    x_scales_columns: int
    x_scales_dtype: int
    num_topk_weights: int
    handle: int  # fingerprint of rank_prefix_matrix


class CombineSettings(NamedTuple):
    hidden: int
    x_dtype: int
    num_topk_weights: int
    handle: int


def _width(t: torch.Tensor | None) -> int:
    return -1 if t is None else t.shape[1]


def _fingerprint(rank_prefix_matrix: torch.Tensor) -> int:
    """A number that differs, with overwhelming odds, between the handles of two dispatches."""
    flat = rank_prefix_matrix.flatten().long()
    weights = (torch.arange(flat.numel(), device=flat.device) * 2654435761 + 97) % 2147483647
    return int((flat * weights).sum()) % (1 << 62)


def _meta_rows(num_tokens: int, device, **fields: torch.Tensor | None) -> tuple[RowFormat, torch.Tensor | None]:
    """One packed metadata row per token holding every given field (``None`` when there are none)."""
    given = {name: t for name, t in fields.items() if t is not None}
    if not given:
        return RowFormat([]), None
    fmt = RowFormat([(name, t.dtype, 1 if t.dim() == 1 else t.shape[1]) for name, t in given.items()])
    return fmt, fmt.pack(num_tokens, device, **given)


def _exchange(group_ctx, op: str, seq: int, payload: torch.Tensor, meta: torch.Tensor | None, route: Route):
    """Payload and metadata rows through the backend's tokens level, both in flight together."""
    pending = group_ctx.transport.dispatch_tokens(payload, route)
    meta_pending = None if meta is None else group_ctx.transport.dispatch_tokens(meta, route)
    received = _waits.wait(group_ctx, pending, op, seq)
    return received, None if meta_pending is None else _waits.wait(group_ctx, meta_pending, op, seq)


def _padded(rows: torch.Tensor, total: int, fill) -> torch.Tensor:
    """``rows`` padded with ``fill`` to ``total`` rows, as an output: a received buffer is returned as it is
    when it needs no padding; views into packed metadata rows are copied out."""
    if total == rows.shape[0] and rows.is_contiguous():
        return rows
    out = rows.new_full((total, *rows.shape[1:]), fill)
    out[:rows.shape[0]] = rows
    return out


def _status(topk_idx, is_token_in_rank, num_experts: int, num_ranks: int):
    """Handshake status of the routing: an expert id out of range, or a layout that does not match it."""
    status = _handshake.expert_id_status(topk_idx, num_experts)
    if status is None and topk_idx is not None:
        expected = layout.token_in_rank(layout.expert_rank(topk_idx, num_experts // num_ranks), num_ranks)
        wrong = expected != is_token_in_rank
        if bool(wrong.any()):
            t, r = (int(i) for i in wrong.nonzero()[0])
            status = (_handshake.STATUS_LAYOUT_MISMATCH, t, r, int(is_token_in_rank[t, r]))
    return status


def get_dispatch_layout(topk_idx, num_experts, group_name, num_ranks, num_ranks_per_node):
    op = "get_dispatch_layout"
    group_ctx = _registry.get(group_name)
    checks.check_group(op, group_name, num_ranks=(num_ranks, group_ctx.num_ranks),
                       num_ranks_per_node=(num_ranks_per_node, group_ctx.num_ranks_per_node))
    checks.check_layout(topk_idx, num_experts, num_ranks, num_ranks_per_node)
    status = _handshake.expert_id_status(topk_idx, num_experts)
    if status is not None:
        raise RuntimeError(_handshake.expert_out_of_range(op, num_experts, *status[1:]))
    return group_ctx.kernels.dispatch_layout(topk_idx, num_experts, num_ranks, num_ranks_per_node)


def dispatch(x, x_scales, topk_idx, topk_weights, is_token_in_rank, num_tokens_per_expert, num_experts, group_name,
             num_ranks, expert_alignment=1, num_worst_tokens=0, quant_mode="none", expert_token_nums_type=1,
             comm_seq=None):
    op = "dispatch"
    group_ctx = _registry.get(group_name)
    seq = group_ctx.next_seq(op, x.shape[0])
    status, data, scales, fmt, meta = _handshake.run_checks(
        group_ctx, op, seq, DispatchSettings, x.device,
        lambda: prepare_dispatch(group_ctx, x, x_scales, topk_idx, topk_weights, is_token_in_rank,
                                 num_tokens_per_expert, num_experts, group_name, num_ranks, expert_alignment,
                                 num_worst_tokens, quant_mode, expert_token_nums_type))
    settings = dispatch_settings(x, x_scales, topk_idx, topk_weights, num_experts, quant_mode, num_worst_tokens)
    matrix = _handshake.agree(group_ctx, op, seq, settings, status=status, send_counts=is_token_in_rank.sum(0),
                              device=x.device)
    return dispatch_rows(group_ctx, seq, matrix, x, data, scales, fmt, meta, topk_idx, topk_weights, is_token_in_rank,
                         num_tokens_per_expert, num_experts, num_ranks, expert_alignment, num_worst_tokens,
                         expert_token_nums_type, comm_seq)


def dispatch_settings(x, x_scales, topk_idx, topk_weights, num_experts, quant_mode, num_worst_tokens):
    return DispatchSettings(num_experts, x.shape[1], dtype_code(x.dtype), _width(x_scales),
                            dtype_code(None if x_scales is None else x_scales.dtype), int(quant_mode == "int8"),
                            _width(topk_idx), _width(topk_weights), num_worst_tokens)


def prepare_dispatch(group_ctx, x, x_scales, topk_idx, topk_weights, is_token_in_rank, num_tokens_per_expert,
                     num_experts, group_name, num_ranks, expert_alignment, num_worst_tokens, quant_mode,
                     expert_token_nums_type):
    """A dispatch's checks and local work: ``(status, data, scales, metadata format, metadata rows)``."""
    checks.check_group("dispatch", group_name, num_ranks=(num_ranks, group_ctx.num_ranks))
    checks.check_dispatch(x, x_scales, topk_idx, topk_weights, is_token_in_rank, num_tokens_per_expert, num_experts,
                          num_ranks, expert_alignment, num_worst_tokens, quant_mode, expert_token_nums_type)
    data, scales = group_ctx.kernels.quantize_int8(x, 1e-12) if quant_mode == "int8" else (x, x_scales)
    n_tokens = x.shape[0]
    src_idx = torch.arange(n_tokens, dtype=torch.int32, device=x.device)
    fmt, meta = _meta_rows(n_tokens, x.device, src_idx=src_idx, scales=scales, topk_idx=topk_idx,
                           topk_weights=topk_weights)
    return _status(topk_idx, is_token_in_rank, num_experts, num_ranks), data, scales, fmt, meta


def check_receive_limit(matrix: torch.Tensor, num_worst_tokens: int) -> None:
    """Every rank holds the whole matrix, so all raise the same error before any row moves. Without
    num_worst_tokens the bound is the int32 of the handle's prefix sums and recv_src_idx."""
    recv_totals = matrix.sum(0)
    limit = num_worst_tokens if num_worst_tokens > 0 else checks.INT32_MAX
    if bool((recv_totals > limit).any()):
        r = int((recv_totals > limit).nonzero()[0])
        what = f"num_worst_tokens={limit}" if num_worst_tokens > 0 else f"{limit} (the handle is int32)"
        raise RuntimeError(f"deepep::dispatch: expected at most {what} tokens received per rank, got "
                           f"{int(recv_totals[r])} on rank {r}")


def dispatch_rows(group_ctx, seq, matrix, x, data, scales, fmt, meta, topk_idx, topk_weights, is_token_in_rank,
                  num_tokens_per_expert, num_experts, num_ranks, expert_alignment, num_worst_tokens,
                  expert_token_nums_type, comm_seq):
    """A dispatch after its handshake: the rows through the backend's tokens level, then the outputs."""
    op, rank = "dispatch", group_ctx.rank
    check_receive_limit(matrix, num_worst_tokens)
    recv, recv_meta = _exchange(group_ctx, op, seq, data, meta, Route(is_token_in_rank, matrix, rank))

    n = recv.shape[0]
    total = max(n, num_worst_tokens)
    recv_x = _padded(recv, total, 0)
    if scales is None:
        recv_x_scales = x.new_empty((total, 0), dtype=torch.float32)
    else:
        recv_x_scales = _padded(fmt.view(recv_meta, "scales"), total, 0)
        if scales.dim() == 1:
            recv_x_scales = recv_x_scales.view(total)
    recv_topk_idx = torch.empty(total, 0, dtype=torch.int64, device=x.device)
    recv_topk_weights = torch.empty(total, 0, dtype=torch.float32, device=x.device)
    num_local_experts = num_experts // num_ranks
    if topk_idx is not None:
        ids = fmt.view(recv_meta, "topk_idx")
        mine = (ids >= rank * num_local_experts) & (ids < (rank + 1) * num_local_experts)
        local_ids = torch.where(mine, ids - rank * num_local_experts, torch.full_like(ids, -1))
        recv_topk_idx = _padded(local_ids, total, -1)
        counts = layout.token_in_rank(local_ids, num_local_experts).sum(0, dtype=torch.int32)
        if topk_weights is not None:
            w = fmt.view(recv_meta, "topk_weights")
            recv_topk_weights = _padded(torch.where(mine, w, torch.zeros_like(w)), total, 0)
    else:
        ones = [1] * num_ranks
        per_expert = num_tokens_per_expert.view(num_ranks, num_local_experts).long()
        pending = group_ctx.transport.all_to_all(per_expert, ones, ones)
        counts = _waits.wait(group_ctx, pending, op, seq).sum(0).to(torch.int32)
    counts = layout.expert_counts_output(layout.align_up(counts, expert_alignment), expert_token_nums_type)
    order = is_token_in_rank.to(torch.int32).cumsum(0) - 1
    send_head = torch.where(is_token_in_rank, order, torch.full_like(order, -1)).to(torch.int32)
    return (recv_x, recv_x_scales, recv_topk_idx, recv_topk_weights, counts,
            matrix.cumsum(0).to(torch.int32), matrix[rank].to(torch.int32).view(num_ranks, 1),
            torch.zeros(num_ranks, 1, dtype=torch.int32, device=x.device),
            _padded(fmt.view(recv_meta, "src_idx").reshape(n), total, -1), send_head,
            _handshake.next_comm_seq(comm_seq, x))


def _handle_rows_status(valid: int, rows: int):
    """A handle claiming more received rows than there are is corrupt (status for the handshake)."""
    return None if valid <= rows else (_handshake.STATUS_HANDLE_ROWS, valid, rows, 0)


def _source_counts(handle, rank: int) -> torch.Tensor:
    """Rows this rank received from each source in the handle's dispatch (int64 ``[R]``)."""
    column = handle[0][:, rank].long()
    return torch.diff(column, prepend=column.new_zeros(1))


def cached_dispatch(x, x_scales, topk_weights, handle, group_name, num_ranks, comm_seq=None):
    op = "cached_dispatch"
    group_ctx = _registry.get(group_name)
    seq, rank = group_ctx.next_seq(op, x.shape[0]), group_ctx.rank

    def prepare():
        checks.check_group("dispatch", group_name, num_ranks=(num_ranks, group_ctx.num_ranks))
        checks.check_cached_dispatch(x, x_scales, topk_weights, handle, num_ranks)
        fmt, meta = _meta_rows(x.shape[0], x.device, scales=x_scales, topk_weights=topk_weights)
        status = _handle_rows_status(int(handle[0][-1, rank]), handle[3].shape[0])
        return status, _source_counts(handle, rank), fmt, meta

    status, expect, fmt, meta = _handshake.run_checks(group_ctx, op, seq, CachedSettings, x.device, prepare)
    rank_prefix_matrix, _, _, recv_src_idx, is_token_in_rank, _ = handle
    settings = cached_settings(x, x_scales, topk_weights, rank_prefix_matrix)
    send_counts = is_token_in_rank.sum(0)
    matrix = _handshake.agree(group_ctx, op, seq, settings, status=status, send_counts=send_counts,
                              expect_counts=expect, device=x.device)
    return cached_rows(group_ctx, seq, matrix, x, x_scales, topk_weights, handle, fmt, meta, comm_seq)


def cached_settings(x, x_scales, topk_weights, rank_prefix_matrix, fingerprint: bool = True) -> CachedSettings:
    """A cached dispatch's settings (the handle's fingerprint 0 without ``fingerprint``: the native path
    computes it)."""
    return CachedSettings(x.shape[1], dtype_code(x.dtype), _width(x_scales),
                          dtype_code(None if x_scales is None else x_scales.dtype), _width(topk_weights),
                          _fingerprint(rank_prefix_matrix) if fingerprint else 0)


def cached_rows(group_ctx, seq, matrix, x, x_scales, topk_weights, handle, fmt=None, meta=None, comm_seq=None):
    """A cached dispatch after its handshake: the rows through the backend's tokens level, then the outputs."""
    op, rank = "cached_dispatch", group_ctx.rank
    if fmt is None:
        fmt, meta = _meta_rows(x.shape[0], x.device, scales=x_scales, topk_weights=topk_weights)
    recv_src_idx, is_token_in_rank = handle[3], handle[4]
    recv, recv_meta = _exchange(group_ctx, op, seq, x, meta, Route(is_token_in_rank, matrix, rank))
    total = recv_src_idx.shape[0]
    recv_x_scales = (_padded(fmt.view(recv_meta, "scales"), total, 0) if x_scales is not None
                     else x.new_empty((total, 0), dtype=torch.float32))
    recv_topk_weights = (_padded(fmt.view(recv_meta, "topk_weights"), total, 0) if topk_weights is not None
                         else x.new_empty((total, 0), dtype=torch.float32))
    return _padded(recv, total, 0), recv_x_scales, recv_topk_weights, _handshake.next_comm_seq(comm_seq, x)


def combine(x, handle, topk_weights, bias_0, bias_1, group_name, num_ranks, comm_seq=None):
    op = "combine"
    group_ctx = _registry.get(group_name)
    seq, rank = group_ctx.next_seq(op, x.shape[0]), group_ctx.rank

    def prepare():
        checks.check_group(op, group_name, num_ranks=(num_ranks, group_ctx.num_ranks))
        checks.check_combine(x, handle, topk_weights, bias_0, bias_1, num_ranks)
        valid = int(handle[0][-1, rank])
        return _handle_rows_status(valid, x.shape[0]), _source_counts(handle, rank), valid

    status, per_source, valid = _handshake.run_checks(group_ctx, op, seq, CombineSettings, x.device, prepare)
    rank_prefix_matrix, _, _, _, is_token_in_rank, _ = handle
    settings = CombineSettings(x.shape[1], dtype_code(x.dtype), _width(topk_weights), _fingerprint(rank_prefix_matrix))
    back = is_token_in_rank.sum(0)
    _handshake.agree(group_ctx, op, seq, settings, status=status, send_counts=per_source, expect_counts=back,
                     device=x.device)
    return combine_rows(group_ctx, seq, x, handle, topk_weights, bias_0, bias_1, num_ranks, valid, comm_seq)


def combine_rows(group_ctx, seq, x, handle, topk_weights, bias_0, bias_1, num_ranks, valid, comm_seq):
    """A combine after its handshake: the rows back through the backend's tokens level, reduced at home."""
    op, rank = "combine", group_ctx.rank
    rank_prefix_matrix, _, _, _, is_token_in_rank, _ = handle
    # The dispatch's whole traffic matrix (its handle holds the prefix sums over sources).
    dispatched = rank_prefix_matrix.long().diff(dim=0, prepend=rank_prefix_matrix.new_zeros(1, num_ranks).long())
    route = Route(is_token_in_rank, dispatched, rank, handle[3][:valid])
    pending = group_ctx.transport.combine_tokens(x[:valid], route, (bias_0, bias_1))
    weights_pending = None if topk_weights is None else group_ctx.transport.combine_tokens(
        topk_weights[:valid], route, out_dtype=torch.float32)
    combined = _waits.wait(group_ctx, pending, op, seq)
    combined_w = (x.new_empty((is_token_in_rank.shape[0], 0), dtype=torch.float32) if weights_pending is None
                  else _waits.wait(group_ctx, weights_pending, op, seq))
    return combined, combined_w, _handshake.next_comm_seq(comm_seq, x)


# --- autograd: dispatch.backward = combine, combine.backward = cached dispatch ------------------------

def _per_input(ctx, grads: tuple) -> tuple:
    """One gradient per input *as passed*: the dispatcher drops trailing arguments equal to their
    defaults before autograd sees them (``setup_context`` gets them filled back in), and autograd
    checks the structure against what was passed, which ``ctx.needs_input_grad`` mirrors."""
    passed = len(ctx.needs_input_grad)
    return grads[:passed] + (None,) * (passed - len(grads))


def _setup_dispatch(ctx, inputs, output):
    x, topk_weights = inputs[0], inputs[3]
    ctx.save_for_backward(output[5], output[6], output[7], output[8], inputs[4], output[9], output[2])
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


_registry.impl(lib, "get_dispatch_layout", get_dispatch_layout)
for _name, _kernel, _backward, _setup in (("dispatch", dispatch, _backward_dispatch, _setup_dispatch),
                                          ("dispatch.cached", cached_dispatch, _backward_cached, _setup_cached),
                                          ("combine", combine, _backward_combine, _setup_combine)):
    _registry.register_autograd(lib, _name, _backward, _setup, _registry.impl(lib, _name, _kernel))
