"""The whole-op level of ``shm`` for normal-mode dispatch, cached dispatch and combine (``csrc/normal.cpp``).

The portable kernels (:mod:`deep_ep_ops.normal`) cost a few hundred µs of host work in a few hundred torch and
Python calls, whatever the batch: for small batches (decode, tests, the tail of a pipeline) that is most of the
op. Here one native call (``_shm_*_agree``) runs the handshake through the rings (the very header rows of
``_handshake.agree``, checked natively), allocates the outputs and, for small batches, moves one packed row per
(token, rank) through the rings and fills the outputs; ``_shm_dispatch_rows`` / ``_shm_combine_rows`` go on
when its budget ran out first.

The rows take the rings only when every rank offered it in its header (a spare settings word), every rank
receives at most :data:`SMALL_BYTES` and a packed row fits a ring; otherwise the portable kernel moves them
after the same handshake (dispatch straight into the receivers' outputs: one copy, better for large batches).
Every rank decides the same from the same headers, so ranks on the portable path (the first call of each
configuration, which runs the input checks and remembers them by the metadata they read; python kernels;
accelerator tensors) and ranks here agree and exchange with each other.
"""

from __future__ import annotations

import torch

from meta_kernels import checks

from .. import _handshake, _waits, normal
from .._wire import dtype_code
from .base import Resumable

#: Most bytes of packed rows one rank may receive for the rows to go through the rings (two copies, little host
#: work) rather than straight into the receiver's outputs (one copy, more host work).
SMALL_BYTES = 2 << 20

#: The header word (the last spare settings word) in which a rank offers the ring protocol for the rows.
OFFER_WORD = 7 + _handshake.MAX_SETTINGS - 1


class Normal:
    """The whole-op ``dispatch``, ``dispatch.cached`` and ``combine`` kernels of one ``ShmTransport``."""

    def __init__(self, transport):
        self.t = transport
        # Checked configurations: this rank's header (status, counts and the handle's fingerprint filled in by
        # the native call) and the native config, ``[settings words, small bytes, ...]``.
        self.configs: dict[tuple, tuple[list[int], list[int]]] = {}
        self.native_calls = 0  # ops whose handshake ran here (the tests check that the path is taken)
        self.ring_rows = 0  # and of those, the ones whose rows went through the rings
        self.small_bytes = SMALL_BYTES  # every rank must hold the same (the tests lower it)

    def _ready(self, config, x: torch.Tensor) -> bool:
        """A checked configuration, no exchange of the rings in flight, and CPU tensors for the C++ kernels."""
        return (config is not None and not self.t._queue and self.t.ctx.kernels.name == "native"
                and x.device.type == "cpu")

    def _remember(self, key, op: str, settings: tuple, *config: int) -> None:
        if key is not None and key not in self.configs:
            header = _handshake.header_row(op, 0, settings, [0] * self.t.num_ranks, [-1] * self.t.num_ranks)
            header[OFFER_WORD] = 1
            self.configs[key] = (header, [len(settings), 0, *config])

    def _agree(self, op: str, config, call, local: tuple, settings_type: type):
        """The native handshake (and, for small batches, the rows): ``(status, outputs, scratch, seq)``."""
        t, ctx = self.t, self.t.ctx
        seq = ctx.next_seq(op, local[0].shape[0])
        header, native_config = _handshake.with_seq(config[0], seq), [config[1][0], self.small_bytes, *config[1][2:]]
        self.native_calls += 1
        num_ranks, width = t.num_ranks, len(header)
        scratch = torch.zeros(num_ranks * num_ranks + 2 * (2 * num_ranks + 1) + num_ranks * width, dtype=torch.int64)
        rings = [s.tensor for s in t._rings]
        status, outputs = _waits.wait(ctx, Resumable(
            call, (rings, t._ring_geometry, t._mirror, header, *local, native_config, ctx.rank, scratch),
            t.check_peers), op, seq)
        if status == 2:
            _handshake.validate(ctx, op, seq, scratch[-num_ranks * width:].view(num_ranks, width), settings_type)
            raise RuntimeError(f"deepep::{op}: expected every rank's handshake to agree, got one that does not "
                               f"(different deep_ep_ops builds?)")
        return status, outputs, scratch, seq, native_config

    def _rows(self, op: str, seq: int, status: int, call, local: tuple, native_config, outputs, scratch) -> None:
        """The rest of the rows when the first native call's budget ran out (status 5)."""
        t = self.t
        self.ring_rows += 1
        if status == 5:
            _waits.wait(t.ctx, Resumable(call, ([s.tensor for s in t._rings], t._ring_geometry, t._mirror, *local,
                                                native_config, t.ctx.rank, outputs, scratch), t.check_peers), op, seq)

    def dispatch(self, x, x_scales, topk_idx, topk_weights, is_token_in_rank, num_tokens_per_expert, num_experts,
                 group_name, num_ranks, expert_alignment=1, num_worst_tokens=0, quant_mode="none",
                 expert_token_nums_type=1, comm_seq=None):
        args = (x, x_scales, topk_idx, topk_weights, is_token_in_rank, num_tokens_per_expert, num_experts, group_name,
                num_ranks, expert_alignment, num_worst_tokens, quant_mode, expert_token_nums_type)
        try:  # whatever is malformed here, the portable kernel raises its error
            n = x.shape[0]
            key = ("dispatch", *_meta(x), *_meta(topk_idx), *_meta(is_token_in_rank), num_tokens_per_expert.dtype,
                   num_tokens_per_expert.shape, num_tokens_per_expert.device, *_meta(x_scales), *_meta(topk_weights),
                   *args[6:])
            config = self.configs.get(key)
            fast = (self._ready(config, x) and topk_idx.shape[0] == n and is_token_in_rank.shape[0] == n
                    and n * topk_idx.shape[1] <= checks.INT32_MAX
                    and (x_scales is None or x_scales.shape[0] == n)
                    and (topk_weights is None or topk_weights.shape[0] == n))
        except (AttributeError, IndexError, TypeError):
            key, fast = None, False
        if not fast:
            out = normal.dispatch(*args, comm_seq)
            if key is not None:
                self._remember(key, "dispatch", normal.dispatch_settings(x, x_scales, topk_idx, topk_weights,
                                                                         num_experts, quant_mode, num_worst_tokens),
                               num_experts, num_worst_tokens, expert_alignment, expert_token_nums_type)
            return out
        data, scales = self.t.kernels.quantize_int8(x, 1e-12) if quant_mode == "int8" else (x, x_scales)
        # The native calls read rows in place (a no-op for the usual contiguous inputs).
        local = (data.contiguous(), _dense(scales), topk_idx.contiguous(), _dense(topk_weights),
                 is_token_in_rank.contiguous())
        status, outputs, scratch, seq, native_config = self._agree(
            "dispatch", config, torch.ops.deepep._shm_dispatch_agree.default, local, normal.DispatchSettings)
        if status in (3, 4):
            # 4: dispatch_rows raises the receive-limit error every rank raises, before any row moves; 3: the
            # portable path moves the rows, straight into the receivers' outputs
            matrix = scratch[:num_ranks * num_ranks].view(num_ranks, num_ranks)
            if status == 4:
                normal.check_receive_limit(matrix, num_worst_tokens)
            _, data, scales, fmt, meta = normal.prepare_dispatch(self.t.ctx, *args)
            return normal.dispatch_rows(self.t.ctx, seq, matrix, x, data, scales, fmt, meta, topk_idx, topk_weights,
                                        is_token_in_rank, num_tokens_per_expert, num_experts, num_ranks,
                                        expert_alignment, num_worst_tokens, expert_token_nums_type, comm_seq)
        self._rows("dispatch", seq, status, torch.ops.deepep._shm_dispatch_rows.default, local, native_config,
                   outputs, scratch)
        return (*outputs, _handshake.next_comm_seq(comm_seq, x))

    def cached_dispatch(self, x, x_scales, topk_weights, handle, group_name, num_ranks, comm_seq=None):
        try:  # whatever is malformed here, the portable kernel raises its error
            key = ("cached_dispatch", *_meta(x), *_meta(x_scales), *_handle_meta(handle), *_meta(topk_weights),
                   group_name, num_ranks)
            config = self.configs.get(key)
            n = x.shape[0]
            fast = (self._ready(config, x) and handle[4].shape[0] == n and handle[5].shape[0] == n
                    and (x_scales is None or x_scales.shape[0] == n)
                    and (topk_weights is None or topk_weights.shape[0] == n))
        except (AttributeError, IndexError, TypeError):
            key, fast = None, False
        if not fast:
            out = normal.cached_dispatch(x, x_scales, topk_weights, handle, group_name, num_ranks, comm_seq)
            if key is not None:
                self._remember(key, "cached_dispatch",
                               normal.cached_settings(x, x_scales, topk_weights, handle[0], fingerprint=False))
            return out
        x, x_scales, topk_weights = x.contiguous(), _dense(x_scales), _dense(topk_weights)
        is_token_in_rank = handle[4].contiguous()
        status, outputs, scratch, seq, native_config = self._agree(
            "cached_dispatch", config, torch.ops.deepep._shm_cached_agree.default,
            (x, x_scales, topk_weights, handle[0].contiguous(), handle[3].shape[0], is_token_in_rank),
            normal.CachedSettings)
        if status == 3:  # the portable path moves the rows
            matrix = scratch[:num_ranks * num_ranks].view(num_ranks, num_ranks)
            return normal.cached_rows(self.t.ctx, seq, matrix, x, x_scales, topk_weights, handle, comm_seq=comm_seq)
        self._rows("cached_dispatch", seq, status, torch.ops.deepep._shm_dispatch_rows.default,
                   (x, x_scales, None, topk_weights, is_token_in_rank), native_config, outputs, scratch)
        return (*outputs, _handshake.next_comm_seq(comm_seq, x))

    def combine(self, x, handle, topk_weights, bias_0, bias_1, group_name, num_ranks, comm_seq=None):
        try:  # whatever is malformed here, the portable kernel raises its error
            key = ("combine", *_meta(x), *_handle_meta(handle), *_meta(topk_weights), *_meta(bias_0),
                   *_meta(bias_1), group_name, num_ranks)
            config = self.configs.get(key)
            num_recv, num_tokens = handle[3].shape[0], handle[4].shape[0]
            fast = (self._ready(config, x) and x.shape[0] == num_recv and handle[5].shape[0] == num_tokens
                    and (topk_weights is None or topk_weights.shape[0] == num_recv)
                    and all(b is None or b.shape[0] == num_tokens for b in (bias_0, bias_1)))
        except (AttributeError, IndexError, TypeError):
            key, fast = None, False
        if not fast:
            out = normal.combine(x, handle, topk_weights, bias_0, bias_1, group_name, num_ranks, comm_seq)
            if key is not None:
                self._remember(key, "combine", normal.CombineSettings(x.shape[1], dtype_code(x.dtype),
                                                                      -1 if topk_weights is None
                                                                      else topk_weights.shape[1], 0))
            return out
        x, topk_weights, is_token_in_rank = x.contiguous(), _dense(topk_weights), handle[4].contiguous()
        rank_prefix_matrix = handle[0].contiguous()
        local = (x, topk_weights, bias_0, bias_1)
        status, outputs, scratch, seq, native_config = self._agree(
            "combine", config, torch.ops.deepep._shm_combine_agree.default,
            (*local, rank_prefix_matrix, is_token_in_rank), normal.CombineSettings)
        if status == 3:  # the portable path moves the rows
            valid = int(rank_prefix_matrix[-1, self.t.rank])
            return normal.combine_rows(self.t.ctx, seq, x, handle, topk_weights, bias_0, bias_1, num_ranks, valid,
                                       comm_seq)
        self._rows("combine", seq, status, torch.ops.deepep._shm_combine_rows.default, (*local, is_token_in_rank),
                   native_config, outputs, scratch)
        return outputs[0], outputs[1], _handshake.next_comm_seq(comm_seq, x)


def _dense(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.contiguous()


def _handle_meta(handle) -> tuple:
    """What the checks read of a handle, but the token and row counts."""
    return (len(handle), *(m for t in handle for m in (t.dtype, t.dim(), t.shape[1:], t.device)), handle[0].shape)


def _meta(t: torch.Tensor | None) -> tuple:
    """What the checks read of a tensor, but its row count."""
    return (None,) * 4 if t is None else (t.dtype, t.dim(), t.shape[1:], t.device)
