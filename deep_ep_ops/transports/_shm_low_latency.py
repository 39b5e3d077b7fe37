"""The whole-op level of ``shm`` for the low-latency ops: one native call per op (``csrc/low_latency.cpp``).

The portable kernels of :mod:`deep_ep_ops.low_latency` spend a few hundred µs of host work per op in a few
hundred torch and Python calls (checks, plan, header, pack, exchange, sort), which is what a one-token
decode step costs. Here the native call plans, writes the header and the real rows into the peers' slots,
waits, checks the peers' headers and sorts (dispatch) or reduces (combine) straight out of the slots.

The portable kernel still runs whenever this path does not apply, and it stays the oracle:

* the first call of each configuration (its input checks pass there, and are remembered by the metadata
  they read: dtypes, shapes other than the token count, and the settings);
* python kernels (``kernels="python"``), or ``N > M``;
* slots not mapped yet or too small for the exchange (mapping and growing are collective: the portable path
  does them, and every rank decides the same from the same settings).

Both paths write the same slot protocol (``_shm_slots``), so ranks on either path exchange with each other.
"""

from __future__ import annotations

import torch

from .. import _handshake, _waits, layout, low_latency
from .._wire import RowFormat, dtype_code
from . import _shm_engine
from .base import Resumable


class _Config:
    """What a call of one configuration needs besides its tensors, worked out once."""

    def __init__(self, op: str, settings: tuple, num_ranks: int, caps: list[int], row_bytes: int):
        self.header = _handshake.header_row(op, 0, settings, [0] * num_ranks, [-1] * num_ranks)
        self.header_bytes = (len(self.header) * 8 + 63) // 64 * 64
        self.need = self.header_bytes + max(caps) * row_bytes  # slot bytes one exchange takes



class _Exchange(Resumable):
    """One native call in flight: one of the slots' exchanges (``seq``: its exchange number, so that reusing its
    half reads it out first, ``_shm_slots.Slots.drain``), completed by :meth:`finish`."""

    def __init__(self, call, args, check, seq: int, op: str, op_seq: int):
        super().__init__(call, args, check)
        self.seq, self.op, self.op_seq, self.done = seq, op, op_seq, False

    def poll(self, timeout_s: float) -> bool:
        self.done = self.done or super().poll(timeout_s)
        return self.done

    def finish(self, ctx) -> None:
        """Waits for the exchange; a peer whose header disagrees fails every rank with the same error."""
        if _waits.wait(ctx, self, self.op, self.op_seq) == 2:
            _handshake.validate(ctx, self.op, self.op_seq, self.args[-2], low_latency.LowLatencySettings)
            raise RuntimeError(f"deepep::{self.op}: expected every rank's rows to fit the chunk its peer planned, "
                               f"got more (ranks with different num_max_dispatch_tokens_per_rank?)")


class _Hook:
    """What a receive hook's token names (``low_latency._hold``): the native exchange of a send half."""

    def __init__(self, exchange: _Exchange, out: torch.Tensor | None = None):
        self.exchange, self.seq, self.out = exchange, exchange.op_seq, out

    def drain(self, ctx) -> None:  # clean_low_latency_buffer
        self.exchange.finish(ctx)


class LowLatency:
    """Whole-op kernels of ``low_latency_dispatch`` and ``low_latency_combine`` for one ``ShmTransport``."""

    def __init__(self, transport):
        self.t = transport
        self.configs: dict[tuple, _Config] = {}  # configurations whose input checks passed
        self.native_calls = 0  # ops run here (the tests check that the path is taken)
        self._segments: tuple[int, list[torch.Tensor]] = (-1, [])
        self._scratch: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # header width: (recv_header, state)

    def _slots(self, config: _Config):
        """``(segments, geometry, exchange number)`` when the slots hold this exchange (taking the next exchange
        number), else ``None``."""
        slots = self.t._slots
        if not slots.segments or config.need > slots.bytes:
            return None
        if self._segments[0] != slots.generation:
            self._segments = (slots.generation, [s.tensor for s in slots.segments])
        seq = slots.next_seq()
        return self._segments[1], [_shm_engine.slot_base(self.t.num_ranks), slots.bytes, config.header_bytes], seq

    def _start(self, op_name: str, seq: int, native, args, hook: bool) -> _Exchange:
        """Starts a native call: done before returning without ``hook``, else sent (as far as the peers' slots
        are free) and left in flight for the receive hook."""
        ctx = self.t.ctx
        self.native_calls += 1
        # The peers' headers and the progress: a call done before this returns reuses one pair per header
        # width; one left in flight for its hook (beside others) needs its own.
        width = len(args[3])
        scratch = None if hook else self._scratch.get(width)
        if scratch is None:
            scratch = (torch.empty(ctx.num_ranks, width, dtype=torch.int64),
                       torch.zeros(ctx.num_ranks, dtype=torch.int64))
            if not hook:
                self._scratch[width] = scratch
        else:
            scratch[1].zero_()
        exchange = _Exchange(native, (*args, *scratch), self.t.check_peers, args[2], op_name, seq)
        if hook:
            self.t._slots.track(exchange)
            with _waits.guard(ctx, op_name, seq):
                exchange.poll(0.0)
        else:
            exchange.finish(ctx)
        return exchange

    def dispatch(self, *args, **kwargs):
        return self._dispatch(False, *args, **kwargs)

    def dispatch_send(self, *args, **kwargs):
        return self._dispatch(True, *args, **kwargs)

    def dispatch_recv(self, packed, packed_scales, count, src_info, layout_range, recv_token, group_name) -> None:
        ctx = self.t.ctx
        state = low_latency._claim(ctx, recv_token, "low_latency_dispatch_recv")
        if not isinstance(state, _Hook):
            return low_latency.low_latency_dispatch_recv(packed, packed_scales, count, src_info, layout_range,
                                                         recv_token, group_name)
        state.exchange.finish(ctx)  # the outputs the send half returned are the ones it writes
        return None

    def _dispatch(self, hook, x, topk_idx, m, num_experts, group_name, num_ranks, rank, use_fp8=True,
                  round_scale=False, use_ue8m0=False, quant_mode="none", num_shared_expert_ranks=0,
                  expert_token_nums_type=1, comm_seq=None):
        op = "low_latency_dispatch"
        ctx, num_shared = self.t.ctx, num_shared_expert_ranks
        try:  # whatever is malformed here, the portable kernel raises its error
            n = x.shape[0]
            key = ("d", x.dtype, x.dim(), x.shape[-1], topk_idx.dtype, topk_idx.shape[1:], x.device,
                   topk_idx.device, m, num_experts, group_name, num_ranks, rank, use_fp8, round_scale, use_ue8m0,
                   quant_mode, num_shared, expert_token_nums_type)
            config = self.configs.get(key)
            fast = (config is not None and topk_idx.shape[0] == n and n <= m and ctx.kernels.name == "native"
                    and x.device.type == "cpu")
        except (AttributeError, IndexError, TypeError):
            key, fast = None, False
        slots = self._slots(config) if fast else None
        if slots is None:
            portable = low_latency.low_latency_dispatch_send if hook else low_latency.low_latency_dispatch
            out = portable(x, topk_idx, m, num_experts, group_name, num_ranks, rank, use_fp8, round_scale, use_ue8m0,
                           quant_mode, num_shared, expert_token_nums_type, comm_seq)
            if key is not None and key not in self.configs:
                self.configs[key] = _DispatchConfig(x, topk_idx, m, num_experts, num_ranks, rank, use_fp8,
                                                    round_scale, use_ue8m0, quant_mode, num_shared)
            return out
        seq = ctx.next_seq(op, n)
        x, topk_idx = x.contiguous(), topk_idx.contiguous()  # read in place (a no-op for the usual inputs)
        if config.wire == "int8":
            data, scales = ctx.kernels.quantize_int8(x, 0.0)
        elif config.wire == "fp8":
            data, scales = ctx.kernels.quantize_fp8(x, round_scale, use_ue8m0)
        else:
            data, scales = x, None
        packed, packed_scales = (ctx.outputs.empty(shape, dtype) for shape, dtype in config.large)
        outputs = (packed, packed_scales, *(torch.empty(*shape, dtype=dtype) for shape, dtype in config.small))
        exchange = self._start(op, seq, torch.ops.deepep._shm_ll_dispatch.default,
                               (*slots, _handshake.with_seq(config.header, seq), data, scales, topk_idx, config.format, m,
                                num_experts, num_shared, rank, expert_token_nums_type, *outputs), hook)
        token = (low_latency._hold(ctx, _Hook(exchange)),) if hook else ()
        return (*outputs, *token, _handshake.next_comm_seq(comm_seq, x))

    def combine(self, *args, **kwargs):
        return self._combine(False, *args, **kwargs)

    def combine_send(self, *args, **kwargs):
        return self._combine(True, *args, **kwargs)

    def combine_recv(self, combined_x, recv_token, group_name) -> None:
        ctx = self.t.ctx
        state = low_latency._claim(ctx, recv_token, "low_latency_combine_recv")
        if not isinstance(state, _Hook):
            return low_latency.low_latency_combine_recv(combined_x, recv_token, group_name)
        state.exchange.finish(ctx)
        if combined_x is not state.out:  # the caller's own tensor (Buffer's ``out=``)
            combined_x.copy_(state.out)
        return None

    def _combine(self, hook, x, topk_idx, topk_weights, src_info, layout_range, m, num_experts, group_name, num_ranks,
                 rank, num_shared_expert_ranks=0, comm_seq=None):
        op = "low_latency_combine"
        ctx, num_shared = self.t.ctx, num_shared_expert_ranks
        try:  # whatever is malformed here, the portable kernel raises its error
            key = ("c", x.dtype, x.shape, topk_idx.dtype, topk_idx.shape[1:], topk_weights.dtype,
                   topk_weights.shape[1:], src_info.dtype, src_info.shape, layout_range.dtype, layout_range.shape,
                   x.device, topk_idx.device, topk_weights.device, src_info.device, layout_range.device, m,
                   num_experts, group_name, num_ranks, rank, num_shared)
            n = topk_idx.shape[0]
            config = self.configs.get(key)
            fast = (config is not None and topk_weights.shape[0] == n and n <= m and ctx.kernels.name == "native"
                    and x.device.type == "cpu")
        except (AttributeError, IndexError, TypeError):
            key, fast = None, False
        slots = self._slots(config) if fast else None
        if slots is None:
            portable = low_latency.low_latency_combine_send if hook else low_latency.low_latency_combine
            out = portable(x, topk_idx, topk_weights, src_info, layout_range, m, num_experts, group_name, num_ranks,
                           rank, num_shared, comm_seq)
            if key is not None and key not in self.configs:
                k, hidden = topk_idx.shape[1], x.shape[2]
                settings = low_latency.LowLatencySettings(m, num_experts, hidden, k, num_shared, 0,
                                                          dtype_code(x.dtype), 0, 0)
                self.configs[key] = _Config(op, settings, num_ranks,
                                            layout.chunk_caps(num_ranks, m, k, num_experts, num_shared),
                                            hidden * x.element_size())
            return out
        seq = ctx.next_seq(op, x.shape[0])
        x, topk_idx, topk_weights, layout_range = (t.contiguous() for t in (x, topk_idx, topk_weights, layout_range))
        out = x.new_empty(n, x.shape[2])
        exchange = self._start(op, seq, torch.ops.deepep._shm_ll_combine.default,
                               (*slots, _handshake.with_seq(config.header, seq), x, layout_range, topk_idx, topk_weights,
                                m, num_experts, num_shared, rank, out), hook)
        token = (low_latency._hold(ctx, _Hook(exchange, out)),) if hook else ()
        return (out, *token, _handshake.next_comm_seq(comm_seq, x))


class _DispatchConfig(_Config):
    """A dispatch's wire format (the portable kernel's ``RowFormat``) and output shapes."""

    def __init__(self, x, topk_idx, m, num_experts, num_ranks, rank, use_fp8, round_scale, use_ue8m0, quant_mode,
                 num_shared):
        k, hidden = topk_idx.shape[1], x.shape[1]
        self.wire = layout.wire_format(use_fp8, quant_mode)
        data_dtype = {"bf16": x.dtype, "fp8": torch.float8_e4m3fn, "int8": torch.int8}[self.wire]
        scales_width = {"bf16": 0, "fp8": hidden // (512 if use_ue8m0 else 128), "int8": 1}[self.wire]
        scales_dtype = torch.int32 if use_ue8m0 else torch.float32
        fields = [("x", data_dtype, hidden)] + ([("scales", scales_dtype, scales_width)] if scales_width else [])
        fmt = RowFormat(fields + [("meta", torch.int32, 2)])
        offset = {name: f[0] for name, f in fmt.fields.items()}
        self.format = [fmt.row_bytes, hidden * data_dtype.itemsize, offset.get("scales", 0), scales_width * 4,
                       offset["meta"]]
        settings = low_latency.LowLatencySettings(m, num_experts, hidden, k, num_shared,
                                                  layout.WIRE_FORMATS.index(self.wire), dtype_code(x.dtype),
                                                  int(round_scale), int(use_ue8m0))
        super().__init__("low_latency_dispatch", settings, num_ranks,
                         layout.chunk_caps(num_ranks, m, k, num_experts, num_shared), fmt.row_bytes)
        outputs = layout.low_latency_dispatch_outputs(  # shapes and dtypes only: on the meta device
            torch.empty(0, hidden, dtype=x.dtype, device="meta"),
            layout.num_local_experts(num_experts, num_ranks, rank, num_shared), num_ranks, m, self.wire, use_ue8m0,
            lambda shape, dtype: torch.empty(shape, dtype=dtype, device="meta"))
        self.large = [(tuple(t.shape), t.dtype) for t in outputs[:2]]
        self.small = [(tuple(t.shape), t.dtype) for t in outputs[2:]]
