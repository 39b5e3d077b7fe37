"""The whole-op level of ``shm`` for normal-mode dispatch: two native calls (``csrc/normal.cpp``).

The portable kernel (:func:`deep_ep_ops.normal.dispatch`) costs about half a millisecond of host work in a few
hundred torch and Python calls, whatever the batch: for small batches (decode, tests, the tail of a
pipeline) that is most of the op. Here ``_shm_dispatch_agree`` runs the handshake through the rings (the very
header rows of ``_handshake.agree``, checked natively) and allocates the outputs, and ``_shm_dispatch_rows``
moves one packed row per (token, rank) through the rings and fills the outputs.

The rows take this way only when every rank offered it in its header (a spare settings word) and every rank
receives at most :data:`SMALL_BYTES`; otherwise the portable kernel moves them after the same handshake,
straight into the receivers' outputs (one copy, better for large batches). Every rank decides the same from
the same headers, so ranks on the portable path (the first call of each configuration, which runs the input
checks and remembers them by the metadata they read; python kernels) and ranks here agree and exchange with
each other.
"""

from __future__ import annotations

import torch

from .. import _handshake, _waits, normal
from .._wire import dtype_code
from .base import Resumable

#: Most bytes of packed rows one rank may receive for the rows to go through the rings (two copies, little host
#: work) rather than straight into the receiver's outputs (one copy, more host work).
SMALL_BYTES = 2 << 20

#: The header word (the last spare settings word) in which a rank offers the ring protocol for the rows.
OFFER_WORD = 7 + _handshake.MAX_SETTINGS - 1


class Normal:
    """The whole-op ``dispatch`` and ``combine`` kernels of one ``ShmTransport``."""

    def __init__(self, transport):
        self.t = transport
        self.configs: dict[tuple, tuple[list[int], list[int]]] = {}  # checked configurations: header, config
        self.native_calls = 0  # ops whose handshake ran here (the tests check that the path is taken)
        self.ring_rows = 0  # and of those, the ones whose rows went through the rings
        self.small_bytes = SMALL_BYTES  # every rank must hold the same (the tests lower it)

    def dispatch(self, x, x_scales, topk_idx, topk_weights, is_token_in_rank, num_tokens_per_expert, num_experts,
                 group_name, num_ranks, expert_alignment=1, num_worst_tokens=0, quant_mode="none",
                 expert_token_nums_type=1, comm_seq=None):
        t = self.t
        ctx = t.ctx
        args = (x, x_scales, topk_idx, topk_weights, is_token_in_rank, num_tokens_per_expert, num_experts, group_name,
                num_ranks, expert_alignment, num_worst_tokens, quant_mode, expert_token_nums_type)
        try:  # whatever is malformed here, the portable kernel raises its error
            n = x.shape[0]
            key = (x.dtype, x.shape[1:], x.device, topk_idx.dtype, topk_idx.shape[1:], topk_idx.device,
                   is_token_in_rank.dtype, is_token_in_rank.shape[1:], is_token_in_rank.device,
                   num_tokens_per_expert.dtype, num_tokens_per_expert.shape, num_tokens_per_expert.device,
                   *_meta(x_scales), *_meta(topk_weights), *args[6:])
            config = self.configs.get(key)
            fast = (config is not None and topk_idx.shape[0] == n and is_token_in_rank.shape[0] == n
                    and (x_scales is None or x_scales.shape[0] == n)
                    and (topk_weights is None or topk_weights.shape[0] == n)
                    and not t._queue and ctx.kernels.name == "native")
        except (AttributeError, IndexError, TypeError):
            key, fast = None, False
        if not fast:
            out = normal.dispatch(*args, comm_seq)
            if key is not None and key not in self.configs:
                settings = normal.dispatch_settings(x, x_scales, topk_idx, topk_weights, num_experts, quant_mode,
                                                    num_worst_tokens)
                header = _handshake.header_row("dispatch", 0, settings, [0] * num_ranks, [-1] * num_ranks)
                header[OFFER_WORD] = 1
                self.configs[key] = (header, [len(settings), num_experts, num_worst_tokens, SMALL_BYTES,
                                              expert_alignment, expert_token_nums_type])
            return out
        header, native_config = config
        header, native_config = header.copy(), [*native_config[:3], self.small_bytes, *native_config[4:]]
        seq = header[2] = ctx.next_seq("dispatch", n)
        self.native_calls += 1
        data, scales = ctx.kernels.quantize_int8(x, 1e-12) if quant_mode == "int8" else (x, x_scales)
        # The native calls read rows in place (a no-op for the usual contiguous inputs).
        data, topk_idx, is_token_in_rank = data.contiguous(), topk_idx.contiguous(), is_token_in_rank.contiguous()
        scales = None if scales is None else scales.contiguous()
        topk_weights = None if topk_weights is None else topk_weights.contiguous()
        rings, geometry, mirror, rank = [s.tensor for s in t._rings], t._ring_geometry, t._mirror, ctx.rank
        width = len(header)
        scratch = torch.zeros(num_ranks * num_ranks + 2 * (2 * num_ranks + 1) + num_ranks * width, dtype=torch.int64)
        local = (data, scales, topk_idx, topk_weights, is_token_in_rank)
        status, outputs = _waits.wait(ctx, Resumable(
            torch.ops.deepep._shm_dispatch_agree.default,
            (rings, geometry, mirror, header, *local, native_config, rank, scratch), t.check_peers), "dispatch", seq)
        if status in (2, 3, 4):
            matrix = scratch[:num_ranks * num_ranks].view(num_ranks, num_ranks)
            if status == 2:
                _handshake.validate(ctx, "dispatch", seq, scratch[-num_ranks * width:].view(num_ranks, width),
                                    normal.DispatchSettings)
                raise RuntimeError("deepep::dispatch: expected every rank's handshake to agree, got one that "
                                   "does not (different deep_ep_ops builds?)")
            if status == 4:
                normal.check_receive_limit(matrix, num_worst_tokens)  # raises the error every rank raises
                raise AssertionError("deepep::dispatch: the native receive limit and check_receive_limit disagree")
            # 3: the portable path moves the rows, straight into the receivers' outputs
            _, data, scales, fmt, meta = normal.prepare_dispatch(ctx, *args)
            return normal.dispatch_rows(ctx, seq, matrix, x, data, scales, fmt, meta, topk_idx, topk_weights,
                                        is_token_in_rank, num_tokens_per_expert, num_experts, num_ranks,
                                        expert_alignment, num_worst_tokens, expert_token_nums_type, comm_seq)
        self.ring_rows += 1
        if status == 5:  # rows still to move
            _waits.wait(ctx, Resumable(torch.ops.deepep._shm_dispatch_rows.default,
                                       (rings, geometry, mirror, *local, native_config, rank, outputs, scratch),
                                       t.check_peers), "dispatch", seq)
        return (*outputs, _handshake.next_comm_seq(comm_seq, x))

    def combine(self, x, handle, topk_weights, bias_0, bias_1, group_name, num_ranks, comm_seq=None):
        t = self.t
        ctx = t.ctx
        try:  # whatever is malformed here, the portable kernel raises its error
            key = _combine_key(x, handle, topk_weights, bias_0, bias_1, (group_name, num_ranks))
            config = self.configs.get(key)
            num_recv, num_tokens = handle[3].shape[0], handle[4].shape[0]
            fast = (config is not None and x.shape[0] == num_recv and handle[5].shape[0] == num_tokens
                    and (topk_weights is None or topk_weights.shape[0] == num_recv)
                    and all(b is None or b.shape[0] == num_tokens for b in (bias_0, bias_1))
                    and not t._queue and ctx.kernels.name == "native")
        except (AttributeError, IndexError, TypeError):
            key, fast = None, False
        if not fast:
            out = normal.combine(x, handle, topk_weights, bias_0, bias_1, group_name, num_ranks, comm_seq)
            if key is not None and key not in self.configs:
                settings = normal.CombineSettings(x.shape[1], dtype_code(x.dtype), -1 if topk_weights is None
                                                  else topk_weights.shape[1], 0)
                header = _handshake.header_row("combine", 0, settings, [0] * num_ranks, [-1] * num_ranks)
                header[OFFER_WORD] = 1
                self.configs[key] = (header, [len(settings), 0])
            return out
        header, native_config = config
        header, native_config = header.copy(), [native_config[0], self.small_bytes]
        seq = header[2] = ctx.next_seq("combine", x.shape[0])
        self.native_calls += 1
        rings, geometry, mirror, rank = [s.tensor for s in t._rings], t._ring_geometry, t._mirror, ctx.rank
        width = len(header)
        scratch = torch.zeros(num_ranks * num_ranks + 2 * (2 * num_ranks + 1) + num_ranks * width, dtype=torch.int64)
        x = x.contiguous()
        topk_weights = None if topk_weights is None else topk_weights.contiguous()
        rank_prefix_matrix, is_token_in_rank = handle[0].contiguous(), handle[4].contiguous()
        local = (x, topk_weights, bias_0, bias_1)
        status, outputs = _waits.wait(ctx, Resumable(
            torch.ops.deepep._shm_combine_agree.default,
            (rings, geometry, mirror, header, *local, rank_prefix_matrix, is_token_in_rank, native_config, rank,
             scratch), t.check_peers), "combine", seq)
        if status == 2:
            _handshake.validate(ctx, "combine", seq, scratch[-num_ranks * width:].view(num_ranks, width),
                                normal.CombineSettings)
            raise RuntimeError("deepep::combine: expected every rank's handshake to agree, got one that does not "
                               "(different deep_ep_ops builds?)")
        if status == 3:  # the portable path moves the rows
            valid = int(rank_prefix_matrix[-1, rank])
            return normal.combine_rows(ctx, seq, x, handle, topk_weights, bias_0, bias_1, num_ranks, valid, comm_seq)
        self.ring_rows += 1
        if status == 5:  # rows still to move
            _waits.wait(ctx, Resumable(torch.ops.deepep._shm_combine_rows.default,
                                       (rings, geometry, mirror, *local, is_token_in_rank, native_config, rank, outputs,
                                        scratch), t.check_peers), "combine", seq)
        return outputs[0], outputs[1], _handshake.next_comm_seq(comm_seq, x)


def _meta(t: torch.Tensor | None) -> tuple:
    return (None, None, None) if t is None else (t.dtype, t.shape[1:], t.device)


def _combine_key(x, handle, topk_weights, bias_0, bias_1, args) -> tuple:
    """What ``checks.check_combine`` reads, but the row counts (checked per call)."""
    return ("combine", x.dtype, x.dim(), x.shape[1:], x.device, len(handle),
            *(m for t in handle for m in (t.dtype, t.dim(), t.shape[1:], t.device)), handle[0].shape,
            *_meta(topk_weights), *_meta(bias_0), *_meta(bias_1), *args)
