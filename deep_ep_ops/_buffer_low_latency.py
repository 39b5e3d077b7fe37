"""The low-latency and fused methods of ``Buffer`` (DeepEP's names, arguments and return tuples).

Kept apart from ``buffer.py`` so that each module stays small; ``Buffer`` inherits them, so users see
one class. They rely on the ``Buffer`` attributes set in its constructor.
"""

from __future__ import annotations

import torch

from . import config, low_latency, ops, tuning
from .fused import FuseMode

#: ``quant_mode`` values the facade accepts (DeepEP-Ascend's names) and what the ops receive.
QUANT_MODES = {None: None, "none": "none", "bf16": "none", "int8": "int8"}


class LowLatencyMethods:
    """Mixin of ``Buffer``: low-latency dispatch/combine, their hooks and helpers, and fused_deep_moe."""

    @staticmethod
    def get_low_latency_rdma_size_hint(num_max_dispatch_tokens_per_rank: int, hidden: int, num_ranks: int,
                                       num_experts: int, num_topk: int | None = None,
                                       dtype: torch.dtype = torch.bfloat16) -> int:
        """``num_rdma_bytes`` for low-latency dispatch and combine with these settings.

        Args:
            num_max_dispatch_tokens_per_rank, hidden, num_ranks, num_experts: as for the ops.
            num_topk: the top-k the ops will get. ``None`` gives DeepEP's number (it sizes for every token
                reaching every expert); with it, exactly what this implementation needs, usually several
                times less (``M * min(num_topk, L)`` rows per peer).
            dtype: dtype of the ``x`` given to the ops (bf16 in DeepEP; fp32 rows are twice as wide).

        Returns:
            Bytes; a Buffer with at least this ``num_rdma_bytes`` never fails for its size. With
            ``MOE_SHARED_EXPERT_RANK_NUM`` set, experts spread over fewer ranks and the number follows.
        """
        return tuning.low_latency_rdma_size_hint(
            num_max_dispatch_tokens_per_rank, hidden, num_ranks, num_experts, num_topk, dtype.itemsize,
            config.read_env().num_shared_expert_ranks)

    def _low_latency_ready(self, op: str, m: int, hidden: int, num_experts: int, topk_idx, dtype) -> None:
        """Preconditions checked before any communication: DeepEP's mode flag, and a ``num_rdma_bytes`` (when
        fixed) that holds this exchange."""
        self._live(op)
        if not self.low_latency_mode:
            raise RuntimeError(f"deepep::{op}: expected a Buffer built with low_latency_mode=True (as DeepEP "
                               f"requires), got low_latency_mode=False")
        if not self.num_rdma_bytes:
            return  # the backend grows its buffers as exchanges need
        # A malformed topk_idx fails the op's own checks; size for the worst top-k meanwhile.
        k = topk_idx.shape[1] if isinstance(topk_idx, torch.Tensor) and topk_idx.dim() == 2 else None
        key = (m, hidden, num_experts, k, dtype)
        need = self._rdma_needs.get(key)
        if need is None:  # per call it would cost a tenth of a one-token decode step
            need = self._rdma_needs[key] = tuning.low_latency_rdma_size_hint(
                m, hidden, self.group_size, num_experts, k, dtype.itemsize, self._env.num_shared_expert_ranks)
        if self.num_rdma_bytes < need:
            dtype_arg = "" if dtype == torch.bfloat16 else f", dtype={dtype}"
            raise RuntimeError(f"deepep::{op}: expected num_rdma_bytes >= {need} (get_low_latency_rdma_size_hint"
                               f"({m}, {hidden}, {self.group_size}, {num_experts}, num_topk={k}{dtype_arg})), "
                               f"got {self.num_rdma_bytes}")

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
        self._low_latency_ready(op, num_max_dispatch_tokens_per_rank, x.shape[1], num_experts, topk_idx, x.dtype)
        if async_finish and return_recv_hook:
            raise ValueError(f"deepep::{op}: expected at most one of async_finish and return_recv_hook, got both")
        if quant_mode not in QUANT_MODES:
            raise ValueError(f"deepep::{op}: expected quant_mode in {list(QUANT_MODES)}, got {quant_mode!r}")
        mode = QUANT_MODES[quant_mode] or "none"
        args = (x, topk_idx, num_max_dispatch_tokens_per_rank, num_experts, self.group_name)
        kwargs = dict(use_fp8=use_fp8, round_scale=round_scale, use_ue8m0=use_ue8m0, quant_mode=mode,
                      num_shared_expert_ranks=self._env.num_shared_expert_ranks,
                      expert_token_nums_type=self._env.expert_token_nums_type, comm_seq=self._comm_seq)
        stats = cumulative_local_expert_recv_stats

        def account(layout_range):
            if stats is not None:
                stats.add_((layout_range & 0xFFFFFFFF).sum(dim=1).to(stats.dtype))

        hook = None
        if return_recv_hook:
            sent = ops.low_latency_dispatch_send(*args, **kwargs)
            self._advance(sent.comm_seq)
            packed, scales, count, src_info, layout_range = sent.outputs

            def hook():
                ops.low_latency_dispatch_recv(sent, self.group_name)
                account(layout_range)
        else:
            packed, scales, count, (src_info, layout_range), comm_seq = ops.low_latency_dispatch(*args, **kwargs)
            self._advance(comm_seq)
            account(layout_range)
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
        self._low_latency_ready(op, m, hidden, num_experts, topk_idx, x.dtype)
        if out is not None and (tuple(out.shape) != (topk_idx.shape[0], x.shape[-1]) or out.dtype != x.dtype):
            raise ValueError(f"deepep::{op}: expected out of shape {[topk_idx.shape[0], x.shape[-1]]} and dtype "
                             f"{x.dtype}, got {list(out.shape)} and {out.dtype}")
        args = (x, topk_idx, topk_weights, (src_info, layout_range), m, num_experts, self.group_name)
        kwargs = dict(num_shared_expert_ranks=self._env.num_shared_expert_ranks, comm_seq=self._comm_seq)
        event = self._event(async_finish, x, None)
        if return_recv_hook:
            sent = ops.low_latency_combine_send(*args, **kwargs)
            self._advance(sent.comm_seq)
            if out is not None:
                sent = sent._replace(outputs=(out,))
            return sent.outputs[0], event, lambda: ops.low_latency_combine_recv(sent, self.group_name)
        combined, comm_seq = ops.low_latency_combine(*args, **kwargs)
        self._advance(comm_seq)
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

    def fused_deep_moe(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor,
                       gmm1_permuted_weight: torch.Tensor, gmm1_permuted_weight_scale: torch.Tensor,
                       gmm2_weight: torch.Tensor, gmm2_weight_scale: torch.Tensor,
                       num_max_dispatch_tokens_per_rank: int, num_experts: int, quant_mode: int = 1,
                       fuse_mode: FuseMode = FuseMode.FUSED_DEEP_MOE, profile_enable: bool = False):
        """Low-latency dispatch, SwiGLU expert FFN on the local experts and weighted combine, in one op.

        Args:
            x: bf16 ``[num_tokens, hidden]``, ``num_tokens <= num_max_dispatch_tokens_per_rank``.
            topk_idx: int64 ``[num_tokens, num_topk]``, ``-1`` for unused slots.
            topk_weights: float32 ``[num_tokens, num_topk]``.
            gmm1_permuted_weight, gmm1_permuted_weight_scale, gmm2_weight, gmm2_weight_scale: the local experts'
                weights in the layout of ``deep_ep_ops.ffn`` (build them with ``make_fused_weights``).
            quant_mode: 1 = W8A8 (per-token INT8 activations, int8 weights, int32 accumulation); 0 = bf16
                weights, no quantization.
            fuse_mode: ``FuseMode.FUSED_DEEP_MOE`` or ``FuseMode.DISPATCH_FFN_COMBINE`` (same result here).
            profile_enable: accepted, unused.

        Returns:
            ``(output [num_tokens, hidden] bf16, ep_recv_count [L * R] int32)``; ``ep_recv_count[i * R + s]``
            is the number of tokens rank ``s`` sent to local expert ``i``.
        """
        self._live("fused_deep_moe")
        if int(fuse_mode) not in (int(FuseMode.FUSED_DEEP_MOE), int(FuseMode.DISPATCH_FFN_COMBINE)):
            raise ValueError(f"deepep::fused_deep_moe: expected fuse_mode in [FuseMode.FUSED_DEEP_MOE (1), "
                             f"FuseMode.DISPATCH_FFN_COMBINE (2)], got {fuse_mode!r}")
        output, ep_recv_count, comm_seq = ops.fused_deep_moe(
            x, topk_idx, topk_weights, gmm1_permuted_weight, gmm1_permuted_weight_scale, gmm2_weight,
            gmm2_weight_scale, num_max_dispatch_tokens_per_rank, num_experts, self.group_name, quant_mode=quant_mode,
            num_shared_expert_ranks=self._env.num_shared_expert_ranks, comm_seq=self._comm_seq)
        self._advance(comm_seq)
        return output, ep_recv_count
