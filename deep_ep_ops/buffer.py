"""``Buffer``: DeepEP's class, with its method names, argument order and return tuples, over the ops.

Each method calls one ``torch.ops.deepep`` op and reshapes its outputs the way DeepEP returns them
(empty-tensor outputs become ``None``, counts become a ``list[int]``, an FP8/INT8 payload becomes a
``(data, scales)`` tuple). Arguments that only tune GPU kernels (``config``, ``num_sms``,
``allocate_on_comm_stream``, ``num_qps_per_rank``, ``allow_nvlink_for_low_latency_mode``, ``allow_mnnvl``)
are accepted and do nothing. The ops run synchronously, so ``async_finish`` only decides whether the
returned ``EventOverlap`` holds an event.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from . import _registry, _waits, config, ops, tuning
from ._buffer_low_latency import QUANT_MODES, LowLatencyMethods
from .utils import EventHandle, EventOverlap


def _check_not_capturing() -> None:
    """Building a Buffer (or a bigger one, DeepEP's way to resize) is collective host work that maps shared
    memory and exchanges with peers: a device graph would not record it and a compiled graph cannot hold it."""
    if torch.compiler.is_compiling():
        where = "torch.compile tracing"
    elif torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing():
        where = "CUDA graph capture"
    else:
        return
    raise RuntimeError(f"deepep::Buffer: expected to be built outside graph capture and torch.compile, got a Buffer "
                       f"built during {where} (build it once before capturing or compiling, and pass it in)")


class Buffer(LowLatencyMethods):
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
        transport: a backend name of ``deep_ep_ops.transports`` (``"all_to_all"``, ``"default"`` …); ``None``
            reads ``DEEP_USE_MODE``, else the best backend for the group is chosen.
        timeout_s: seconds to wait for peers before raising (default ``DEEP_EP_OPS_TIMEOUT_S`` or 100).
        num_ranks_per_node: ranks per node, overriding host detection (default
            ``DEEP_EP_OPS_RANKS_PER_NODE``, else the real hosts); may split a host into simulated nodes.
        kernels: ``"native"`` (C++ kernels of ``csrc/``), ``"python"`` or ``"auto"`` (default
            ``DEEP_EP_OPS_KERNELS``, else native when built).
        normal_strategy, low_latency_strategy: DeepEP-Ascend's names for ``transport``.
    """

    #: DeepEP's class-level SM count (used by :meth:`get_dispatch_config`; no effect on CPU).
    num_sms: int = 20

    def __init__(self, group: dist.ProcessGroup | None, num_nvl_bytes: int = 0, num_rdma_bytes: int = 0,
                 low_latency_mode: bool = False, num_qps_per_rank: int = 24,
                 allow_nvlink_for_low_latency_mode: bool = True, allow_mnnvl: bool = False,
                 explicitly_destroy: bool = False, enable_shrink: bool = False, comm=None, *,
                 transport: str | None = None, timeout_s: float | None = None,
                 num_ranks_per_node: int | None = None, kernels: str | None = None,
                 normal_strategy: str | None = None, low_latency_strategy: str | None = None):
        _check_not_capturing()
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
        self._rdma_needs: dict[tuple, int] = {}  # num_rdma_bytes each low-latency configuration needs
        self._ctx = _registry.register(group, next(iter(names), None), timeout_s, num_ranks_per_node, kernels,
                                       num_nvl_bytes, num_rdma_bytes)
        self._destroyed = False
        # Threaded through every op so that communication order is data (see deep_ep_ops._schemas).
        self._comm_seq = torch.zeros(1, dtype=torch.int64, device=self._ctx.transport.device)

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

    @property
    def kernels(self) -> str:
        """``"native"`` or ``"python"``: which kernels this Buffer's ops run."""
        return self._ctx.kernels.name

    def get_bytes_sent(self, reset: bool = False) -> dict[str, int]:
        """Bytes this rank has sent to ranks of its own node and of other nodes, over every op on this group.

        Args:
            reset: zero the counters after reading them.

        Returns:
            ``{"intra_node": bytes, "inter_node": bytes}`` (a rank's rows to itself count in neither).
        """
        return ops.bytes_sent(self.group_name, reset)

    @property
    def num_ranks_per_node(self) -> int:
        """Ranks per node of this Buffer's group (detected from hosts, or the override)."""
        return self._ctx.num_ranks_per_node

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
        _waits.check_usable(self._ctx, op)  # a peer died or stalled in an earlier op

    def _event(self, async_finish: bool, x: torch.Tensor, previous_event: EventOverlap | None) -> EventOverlap:
        if previous_event is not None:
            previous_event.current_stream_wait()
        return EventOverlap(EventHandle(x.device) if async_finish else None)

    def _advance(self, comm_seq_out: torch.Tensor) -> None:
        """Takes an op's ``comm_seq_out`` as the sequence the next op consumes.

        In place, not by rebinding the attribute: ``torch.compile`` refuses to trace an activation-checkpointed
        region (``torch.utils.checkpoint``) that rebinds an attribute of an object from outside it, while an
        in-place tensor update is an ordinary mutation that keeps the communication order a data dependency.
        """
        self._comm_seq.copy_(comm_seq_out)

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
        per_rank, per_node, per_expert, in_rank = ops.get_dispatch_layout(topk_idx, num_experts, self.group_name)
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
            recv_x, recv_scales, recv_w, comm_seq = ops.cached_dispatch(
                x, handle, self.group_name, x_scales=x_scales, topk_weights=topk_weights, comm_seq=self._comm_seq)
            self._advance(comm_seq)
            event = self._event(async_finish, x, previous_event)
            return ((recv_x, recv_scales) if x_scales is not None else recv_x, None,
                    recv_w if topk_weights is not None else None, None, None, event)
        if is_token_in_rank is None or num_tokens_per_expert is None:
            raise ValueError("deepep::dispatch: expected is_token_in_rank and num_tokens_per_expert (from "
                             "get_dispatch_layout) or a handle, got None")
        if quant_mode not in QUANT_MODES:
            raise ValueError(f"deepep::dispatch: expected quant_mode in {list(QUANT_MODES)}, got {quant_mode!r}")
        mode = QUANT_MODES[quant_mode]
        if mode is None:
            mode = "int8" if self._env.normal_use_int8 and x_scales is None else "none"
        recv_x, recv_scales, recv_idx, recv_w, counts, handle, comm_seq = ops.dispatch(
            x, is_token_in_rank, num_tokens_per_expert.shape[0], self.group_name, x_scales=x_scales,
            topk_idx=topk_idx, topk_weights=topk_weights, num_tokens_per_expert=num_tokens_per_expert,
            expert_alignment=expert_alignment, num_worst_tokens=num_worst_tokens, quant_mode=mode,
            expert_token_nums_type=self._env.expert_token_nums_type, comm_seq=self._comm_seq)
        self._advance(comm_seq)
        handle = tuple(handle)
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
        combined, combined_w, comm_seq = ops.combine(
            x, handle, self.group_name, topk_weights=topk_weights, bias_0=biases[0], bias_1=biases[1],
            comm_seq=self._comm_seq)
        self._advance(comm_seq)
        return combined, combined_w if topk_weights is not None else None, self._event(async_finish, x, previous_event)
