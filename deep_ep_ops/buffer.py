"""``Buffer``: DeepEP's class, with its method names, argument order and return tuples, over the ops.

Each method calls one ``torch.ops.deepep`` op and reshapes its outputs the way DeepEP returns them
(empty-tensor outputs become ``None``, counts become a ``list[int]``, an FP8/INT8 payload becomes a
``(data, scales)`` tuple). Arguments that only tune GPU kernels (``config``, ``num_sms``,
``allocate_on_comm_stream``, ``num_qps_per_rank``, ``allow_nvlink_for_low_latency_mode``, ``allow_mnnvl``)
are accepted and do nothing. The ops run synchronously, so ``async_finish`` only decides whether the
returned ``EventOverlap`` holds an event.
"""

from __future__ import annotations

import socket
import zlib

import torch
import torch.distributed as dist

from . import _registry, _waits, config, low_latency, tuning
from .utils import EventHandle, EventOverlap

_QUANT_MODES = {None: None, "none": "none", "bf16": "none", "int8": "int8"}


def _ranks_per_node(ctx) -> int:
    """Ranks per host when hosts hold equal contiguous blocks of ranks, else the whole group.

    Host names are exchanged as CRC32 hashes through the group's transport, so a missing peer is a
    bounded wait with a named peer, like every other exchange.
    """
    if ctx.num_ranks == 1:
        return 1
    mine = torch.full((ctx.num_ranks, 1), zlib.crc32(socket.gethostname().encode()), dtype=torch.int64)
    ones = [1] * ctx.num_ranks
    hosts = _waits.wait(ctx, ctx.transport.all_to_all(mine.to(ctx.device), ones, ones), "Buffer", 0).flatten().tolist()
    per_node = hosts.count(hosts[0])
    blocks = [hosts[i:i + per_node] for i in range(0, len(hosts), per_node)]
    uniform = len(hosts) % per_node == 0 and all(len(set(b)) == 1 for b in blocks)
    return per_node if uniform and len({b[0] for b in blocks}) == len(blocks) else ctx.num_ranks


class Buffer:
    """DeepEP's ``Buffer`` over ``torch.ops.deepep`` (see the module docstring).

    Args:
        group: the expert-parallel process group.
        num_nvl_bytes: DeepEP's NVLink buffer size (unused by ``all_to_all``).
        num_rdma_bytes: DeepEP's RDMA buffer size; in low-latency mode a non-zero value is checked against
            :meth:`get_low_latency_rdma_size_hint` as DeepEP would.
        low_latency_mode: enables the low-latency methods, as in DeepEP.
        num_qps_per_rank, allow_nvlink_for_low_latency_mode, allow_mnnvl, enable_shrink: accepted, unused.
        explicitly_destroy: if True, :meth:`destroy` must be called; else the group is released when the
            Buffer is garbage collected.
        comm: an mpi4py communicator instead of ``group`` (not supported).
        transport: ``"all_to_all"`` (alias ``"alltoall"``) or ``"default"``; ``None`` reads ``DEEP_USE_MODE``.
        timeout_s: seconds to wait for peers before raising (default ``DEEP_EP_OPS_TIMEOUT_S`` or 100).
        normal_strategy, low_latency_strategy: DeepEP-Ascend's names for ``transport``.
    """

    #: DeepEP's class-level SM count (used by :meth:`get_dispatch_config`; no effect on CPU).
    num_sms: int = 20

    def __init__(self, group: dist.ProcessGroup | None, num_nvl_bytes: int = 0, num_rdma_bytes: int = 0,
                 low_latency_mode: bool = False, num_qps_per_rank: int = 24,
                 allow_nvlink_for_low_latency_mode: bool = True, allow_mnnvl: bool = False,
                 explicitly_destroy: bool = False, enable_shrink: bool = False, comm=None, *,
                 transport: str | None = None, timeout_s: float | None = None,
                 normal_strategy: str | None = None, low_latency_strategy: str | None = None):
        if comm is not None or group is None:
            raise ValueError("deepep: expected a torch.distributed ProcessGroup as group, got "
                             f"{'an mpi4py comm' if comm is not None else 'None'} (not supported)")
        for name, value in (("num_nvl_bytes", num_nvl_bytes), ("num_rdma_bytes", num_rdma_bytes)):
            if value < 0:
                raise ValueError(f"deepep: expected {name} >= 0, got {value}")
        names = {n for n in (transport, normal_strategy, low_latency_strategy) if n is not None}
        if len(names) > 1:
            raise ValueError(f"deepep: expected one transport, got {sorted(names)}")
        self.group = group
        self.group_name = group.group_name
        self.rank = group.rank()
        self.group_size = group.size()
        self.num_nvl_bytes = num_nvl_bytes
        self.num_rdma_bytes = num_rdma_bytes
        self.low_latency_mode = low_latency_mode
        self.num_qps_per_rank = num_qps_per_rank
        self.explicitly_destroy = explicitly_destroy
        self._env = config.read_env()
        self._ctx = _registry.register(group, next(iter(names), None), timeout_s)
        self._destroyed = False
        if self._ctx.refs == 1:
            self._ctx.num_ranks_per_node = _ranks_per_node(self._ctx)
        # Threaded through every op so that communication order is data (see deep_ep_ops._schemas).
        self._comm_seq = torch.zeros(1, dtype=torch.int64, device=self._ctx.device)

    # --- DeepEP static helpers -----------------------------------------------------------------------

    @staticmethod
    def set_num_sms(new_num_sms: int) -> None:
        """Sets the class-level SM count (must be even, as in DeepEP)."""
        if new_num_sms <= 0 or new_num_sms % 2 != 0:
            raise ValueError(f"deepep: expected a positive even num_sms, got {new_num_sms}")
        Buffer.num_sms = new_num_sms

    @staticmethod
    def get_dispatch_config(num_ranks: int) -> tuning.Config:
        """DeepEP's tuned dispatch config; any rank count works (the next larger table entry)."""
        return tuning.dispatch_config(num_ranks, Buffer.num_sms)

    @staticmethod
    def get_combine_config(num_ranks: int) -> tuning.Config:
        """DeepEP's tuned combine config; any rank count works (the next larger table entry)."""
        return tuning.combine_config(num_ranks, Buffer.num_sms)

    @staticmethod
    def capture() -> EventOverlap:
        """An event at the current point of the current stream (a marker on CPU)."""
        return EventOverlap(EventHandle("cuda" if torch.cuda.is_available() else None))

    @staticmethod
    def is_sm90_compiled() -> bool:
        """DeepEP's build query; no SM90 kernels are part of this package."""
        return False

    # --- lifecycle -----------------------------------------------------------------------------------

    @property
    def transport(self) -> str:
        """Name of the transport moving this Buffer's bytes."""
        return self._ctx.transport.name

    def destroy(self) -> None:
        """Releases the group's context; the Buffer cannot be used afterwards."""
        if not self._destroyed:
            self._destroyed = True
            _registry.release(self.group_name)

    def __del__(self):
        if not getattr(self, "_destroyed", True) and not self.explicitly_destroy:
            try:
                self.destroy()
            except Exception:
                pass

    def _live(self, op: str) -> None:
        if self._destroyed:
            raise RuntimeError(f"deepep::{op}: expected a live Buffer, got one after destroy()")

    def _event(self, async_finish: bool, x: torch.Tensor, previous_event: EventOverlap | None) -> EventOverlap:
        if previous_event is not None:
            previous_event.current_stream_wait()
        return EventOverlap(EventHandle(x.device) if async_finish else None)

    # --- normal mode ---------------------------------------------------------------------------------

    def get_dispatch_layout(self, topk_idx: torch.Tensor, num_experts: int, previous_event=None,
                            async_finish: bool = False, allocate_on_comm_stream: bool = False):
        """Counts tokens per rank / node / expert for a routing (local compute).

        Args:
            topk_idx: int64 ``[num_tokens, num_topk]`` global expert ids, ``-1`` for unused slots.
            num_experts: ``E``, divisible by the group size.

        Returns:
            ``(num_tokens_per_rank [R] int32, num_tokens_per_rdma_rank [num_nodes] int32 or None on one
            node, num_tokens_per_expert [E] int32, is_token_in_rank [num_tokens, R] bool, event)``.
        """
        self._live("get_dispatch_layout")
        per_rank, per_node, per_expert, in_rank = torch.ops.deepep.get_dispatch_layout(
            topk_idx, num_experts, self.group_name)
        event = self._event(async_finish, topk_idx, previous_event)
        return per_rank, (per_node if self._ctx.num_nodes > 1 else None), per_expert, in_rank, event

    def dispatch(self, x, handle=None, num_tokens_per_rank=None, num_tokens_per_rdma_rank=None,
                 is_token_in_rank=None, num_tokens_per_expert=None, topk_idx=None, topk_weights=None,
                 expert_alignment: int = 1, num_worst_tokens: int = 0, config=None, previous_event=None,
                 async_finish: bool = False, allocate_on_comm_stream: bool = False, quant_mode: str | None = None):
        """Sends each token once to every rank owning one of its experts (normal mode).

        Args:
            x: ``[num_tokens, hidden]`` bf16/fp16/fp32, or ``(x_fp8 [num_tokens, hidden] float8_e4m3fn,
                scales [num_tokens, hidden // 128] float32)`` which travels as is.
            handle: a previous dispatch's handle: cached dispatch with its layout (no count exchange).
            num_tokens_per_rank, num_tokens_per_rdma_rank: from :meth:`get_dispatch_layout` (shape-checked,
                derivable from ``is_token_in_rank``).
            is_token_in_rank: bool ``[num_tokens, R]`` from :meth:`get_dispatch_layout`.
            num_tokens_per_expert: int32 ``[E]`` from :meth:`get_dispatch_layout`; gives ``E``.
            topk_idx: int64 ``[num_tokens, num_topk]``, ``-1`` for unused slots.
            topk_weights: float32 ``[num_tokens, num_topk]``.
            expert_alignment: per-expert receive counts are rounded up to a multiple of it.
            num_worst_tokens: if > 0, outputs have exactly this many rows (``-1``-padded ``recv_topk_idx``),
                no host-side count list is returned and the call is graph-safe.
            quant_mode: ``"int8"`` sends per-token INT8 (``recv_x`` becomes ``(int8 [n, H], float32 [n])``);
                ``None`` reads ``DEEP_NORMAL_MODE_USE_INT8_QUANT``; ``"bf16"``/``"none"`` sends ``x`` as is.

        Returns:
            ``(recv_x, recv_topk_idx, recv_topk_weights, num_recv_tokens_per_expert_list, handle, event)``;
            rows are ordered by source rank, then source token; ``recv_topk_idx`` holds local expert ids
            (``-1`` elsewhere) and ``recv_topk_weights`` 0 where the expert is elsewhere. Cached mode returns
            ``(recv_x, None, recv_topk_weights or None, None, None, event)``.
        """
        self._live("dispatch")
        x, x_scales = x if isinstance(x, tuple) else (x, None)
        if handle is not None:
            if topk_idx is not None:
                raise ValueError("deepep::dispatch: expected topk_idx=None with a handle (cached dispatch "
                                 "re-uses the handle's routing), got a tensor")
            recv_x, recv_scales, recv_w, self._comm_seq = torch.ops.deepep.dispatch.cached(
                x, x_scales, topk_weights, list(handle), self.group_name, self._comm_seq)
            event = self._event(async_finish, x, previous_event)
            return ((recv_x, recv_scales) if x_scales is not None else recv_x, None,
                    recv_w if topk_weights is not None else None, None, None, event)
        if is_token_in_rank is None or num_tokens_per_expert is None:
            raise ValueError("deepep::dispatch: expected is_token_in_rank and num_tokens_per_expert (from "
                             "get_dispatch_layout) or a handle, got None")
        if quant_mode not in _QUANT_MODES:
            raise ValueError(f"deepep::dispatch: expected quant_mode in {list(_QUANT_MODES)}, got {quant_mode!r}")
        mode = _QUANT_MODES[quant_mode]
        if mode is None:
            mode = "int8" if self._env.normal_use_int8 and x_scales is None else "none"
        out = torch.ops.deepep.dispatch(
            x, x_scales, topk_idx, topk_weights, is_token_in_rank, num_tokens_per_expert,
            num_tokens_per_expert.shape[0], self.group_name, expert_alignment, num_worst_tokens, mode,
            self._env.expert_token_nums_type, self._comm_seq)
        recv_x, recv_scales, recv_idx, recv_w, counts = out[:5]
        self._comm_seq = out[10]
        handle = (out[5], out[6], out[7], out[8], is_token_in_rank, out[9])
        quantized = x_scales is not None or mode == "int8"
        counts_list = [] if num_worst_tokens > 0 else counts.tolist()
        return ((recv_x, recv_scales) if quantized else recv_x, recv_idx if topk_idx is not None else None,
                recv_w if topk_weights is not None else None, counts_list, handle,
                self._event(async_finish, x, previous_event))

    def combine(self, x: torch.Tensor, handle, topk_weights=None, bias=None, config=None, previous_event=None,
                async_finish: bool = False, allocate_on_comm_stream: bool = False):
        """Sums each token's rows back on the rank it came from (inverse of :meth:`dispatch`).

        Args:
            x: ``[num_recv_tokens, hidden]`` bf16/fp16/fp32 in dispatch's receive order (padding rows of a
                ``num_worst_tokens`` dispatch are ignored).
            handle: the dispatch's handle.
            topk_weights: float32 ``[num_recv_tokens, num_topk]`` to sum back alongside.
            bias: ``None``, a tensor or a tuple of up to two tensors ``[num_tokens, hidden]`` added once.

        Returns:
            ``(combined_x [num_tokens, hidden], combined_topk_weights [num_tokens, num_topk] or None, event)``;
            the sum is not weighted (apply weights on the expert side), accumulated in fp32, rounded once.
        """
        self._live("combine")
        biases = (bias,) if isinstance(bias, torch.Tensor) else tuple(bias or ())
        if len(biases) > 2:
            raise ValueError(f"deepep::combine: expected at most 2 bias tensors, got {len(biases)}")
        biases = biases + (None,) * (2 - len(biases))
        combined, combined_w, self._comm_seq = torch.ops.deepep.combine(
            x, list(handle), topk_weights, biases[0], biases[1], self.group_name, self._comm_seq)
        return combined, combined_w if topk_weights is not None else None, self._event(async_finish, x, previous_event)

    # --- low-latency mode ----------------------------------------------------------------------------

    @staticmethod
    def get_low_latency_rdma_size_hint(num_max_dispatch_tokens_per_rank: int, hidden: int, num_ranks: int,
                                       num_experts: int) -> int:
        """DeepEP's low-latency RDMA buffer size for these settings (same formula as DeepEP)."""
        return tuning.low_latency_rdma_size_hint(num_max_dispatch_tokens_per_rank, hidden, num_ranks, num_experts)

    def _low_latency_ready(self, op: str, m: int, hidden: int, num_experts: int) -> None:
        """DeepEP's preconditions, so code that works here also works on DeepEP."""
        self._live(op)
        if not self.low_latency_mode:
            raise RuntimeError(f"deepep::{op}: expected a Buffer built with low_latency_mode=True (as DeepEP "
                               f"requires), got low_latency_mode=False")
        need = tuning.low_latency_rdma_size_hint(m, hidden, self.group_size, num_experts)
        if 0 < self.num_rdma_bytes < need:
            raise RuntimeError(f"deepep::{op}: expected num_rdma_bytes >= {need} (get_low_latency_rdma_size_hint"
                               f"({m}, {hidden}, {self.group_size}, {num_experts})), got {self.num_rdma_bytes}")

    def low_latency_dispatch(self, x: torch.Tensor, topk_idx: torch.Tensor, num_max_dispatch_tokens_per_rank: int,
                             num_experts: int, cumulative_local_expert_recv_stats=None, use_fp8: bool = True,
                             round_scale: bool = False, use_ue8m0: bool = False, async_finish: bool = False,
                             return_recv_hook: bool = False, *, dispatch_wait_recv_cost_stats=None,
                             quant_mode: str | None = None, topk_weights=None):
        """Sends one row per (token, selected expert) into a static per-expert layout (decode).

        Args:
            x: ``[num_tokens, hidden]`` bf16 (fp16/fp32 accepted), ``num_tokens <= num_max_dispatch_tokens_per_rank``.
            topk_idx: int64 ``[num_tokens, num_topk]``, ``-1`` for unused slots.
            num_max_dispatch_tokens_per_rank: ``M``, the same on every rank.
            num_experts: routed experts ``E``.
            cumulative_local_expert_recv_stats: int32 ``[num_local_experts]``; received rows are added to it.
            use_fp8: FP8 e4m3 on the wire with per-128-channel float32 scales (amax floored at 1e-4).
            round_scale: scales rounded up to powers of two.
            use_ue8m0: scales packed as UE8M0 bytes in int32 ``[..., hidden // 512]`` (needs ``round_scale``).
            async_finish: return an ``EventOverlap`` holding an event.
            return_recv_hook: return after the send; ``hook()`` completes the receive, and the returned
                tensors are valid only after it.
            quant_mode: ``"int8"`` sends per-token INT8 (DeepEP-Ascend); overrides ``use_fp8``.
            dispatch_wait_recv_cost_stats, topk_weights: accepted for DeepEP/DeepEP-Ascend compatibility, unused.

        Returns:
            ``(recv_x, recv_count, handle, event, hook)``: ``recv_x`` is ``[L, R*M, hidden]`` (a
            ``(data, scales)`` tuple with FP8/INT8: scales ``[L, R*M, hidden // 128]`` float32, int32
            ``[L, R*M, hidden // 512]`` with UE8M0, or ``[L, R*M]`` float32 with INT8); ``recv_count`` int32
            ``[L]`` valid rows per local expert (rows after it are padding; prefix sums with
            ``MOE_EXPERT_TOKEN_NUMS_TYPE=0``); each expert's rows are ordered by source rank, then source
            token; ``handle = (src_info [L, R*M] int32, layout_range [L, R] int64, M, hidden, num_experts)``;
            ``hook`` is ``None`` unless ``return_recv_hook``.
        """
        op = "low_latency_dispatch"
        self._low_latency_ready(op, num_max_dispatch_tokens_per_rank, x.shape[1], num_experts)
        if async_finish and return_recv_hook:
            raise ValueError(f"deepep::{op}: expected at most one of async_finish and return_recv_hook, got both")
        if quant_mode not in _QUANT_MODES:
            raise ValueError(f"deepep::{op}: expected quant_mode in {list(_QUANT_MODES)}, got {quant_mode!r}")
        mode = _QUANT_MODES[quant_mode] or "none"
        args = (x, topk_idx, num_max_dispatch_tokens_per_rank, num_experts, self.group_name, use_fp8, round_scale,
                use_ue8m0, mode, self._env.num_shared_expert_ranks, self._env.expert_token_nums_type, self._comm_seq)
        stats = cumulative_local_expert_recv_stats

        def account(layout_range):
            if stats is not None:
                stats.add_((layout_range & 0xFFFFFFFF).sum(dim=1).to(stats.dtype))

        hook = None
        if return_recv_hook:
            *outputs, token, self._comm_seq = torch.ops.deepep.low_latency_dispatch_send(*args)

            def hook():
                torch.ops.deepep.low_latency_dispatch_recv(*outputs, token, self.group_name)
                account(outputs[4])
        else:
            *outputs, self._comm_seq = torch.ops.deepep.low_latency_dispatch(*args)
            account(outputs[4])
        packed, scales, count, src_info, layout_range = outputs
        quantized = mode == "int8" or use_fp8
        handle = (src_info, layout_range, num_max_dispatch_tokens_per_rank, x.shape[1], num_experts)
        return (packed, scales) if quantized else packed, count, handle, self._event(async_finish, x, None), hook

    def low_latency_combine(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor, handle,
                            use_logfmt: bool = False, zero_copy: bool = False, async_finish: bool = False,
                            return_recv_hook: bool = False, out: torch.Tensor | None = None, *,
                            combine_wait_recv_cost_stats=None):
        """Weighted sum of the experts' rows back on the source rank (inverse of :meth:`low_latency_dispatch`).

        Args:
            x: ``[L, R*M, hidden]`` expert outputs at the packed positions dispatch gave (padding ignored).
            topk_idx: the ``[num_tokens, num_topk]`` ids this rank dispatched.
            topk_weights: float32 ``[num_tokens, num_topk]``.
            handle: the dispatch's handle.
            use_logfmt: accepted; combine always sends ``x``'s dtype (no LogFMT compression).
            zero_copy: accepted; ``x`` is read wherever it is (e.g. :meth:`get_next_low_latency_combine_buffer`).
            return_recv_hook: return after the send; ``hook()`` completes the receive into the result.
            out: ``[num_tokens, hidden]`` tensor to write the result into.

        Returns:
            ``(combined_x [num_tokens, hidden], event, hook)`` with ``combined_x[t] = Σ_k w[t,k]·row(t,k)``
            (plus the shared expert's row with ``MOE_SHARED_EXPERT_RANK_NUM``), accumulated in fp32.
        """
        op = "low_latency_combine"
        src_info, layout_range, m, hidden, num_experts = handle
        self._low_latency_ready(op, m, hidden, num_experts)
        if out is not None and (tuple(out.shape) != (topk_idx.shape[0], x.shape[-1]) or out.dtype != x.dtype):
            raise ValueError(f"deepep::{op}: expected out of shape {[topk_idx.shape[0], x.shape[-1]]} and dtype "
                             f"{x.dtype}, got {list(out.shape)} and {out.dtype}")
        args = (x, topk_idx, topk_weights, src_info, layout_range, m, num_experts, self.group_name,
                self._env.num_shared_expert_ranks, self._comm_seq)
        event = self._event(async_finish, x, None)
        if return_recv_hook:
            combined, token, self._comm_seq = torch.ops.deepep.low_latency_combine_send(*args)
            target = combined if out is None else out
            return target, event, lambda: torch.ops.deepep.low_latency_combine_recv(target, token, self.group_name)
        combined, self._comm_seq = torch.ops.deepep.low_latency_combine(*args)
        if out is not None:
            out.copy_(combined)
            combined = out
        return combined, event, None

    def get_next_low_latency_combine_buffer(self, handle) -> torch.Tensor:
        """A ``[L, R*M, hidden]`` bf16 tensor to write expert outputs into before a ``zero_copy`` combine."""
        src_info, _, _, hidden, _ = handle
        shape = (*src_info.shape, hidden)
        if getattr(self, "_combine_buffer", None) is None or tuple(self._combine_buffer.shape) != shape:
            self._combine_buffer = torch.empty(shape, dtype=torch.bfloat16, device=src_info.device)
        return self._combine_buffer

    def clean_low_latency_buffer(self, num_max_dispatch_tokens_per_rank: int, hidden: int, num_experts: int) -> None:
        """Completes and drops receives still in flight (hooks never called) on this group."""
        self._live("clean_low_latency_buffer")
        low_latency.drain(self.group_name)
