"""The compute seam: the hot loops of every op as small functions with documented shapes.

Each loop is a private op defined in ``_schemas.py`` (``deepep::_gather_rows`` …) whose pure-torch
implementation is the method of :class:`Kernels` below. ``csrc/`` registers C++ CPU kernels for the same
ops with ``TORCH_LIBRARY_IMPL(deepep, CPU)``; :class:`NativeKernels` calls them through the dispatcher.
The pure-torch path stays the fallback and the oracle: the package works without the build, and the
tests run both paths against the reference (bitwise, since no kernel here rounds differently).

A group's context holds one of the two (``DEEP_EP_OPS_KERNELS``, ``Buffer(kernels=)``), so the ops
never branch on it. The C++ build is the extension module ``deep_ep_ops._C``; importing it runs its
registrations, and the dispatcher itself says whether they are loaded (:func:`native_loaded`).
"""

from __future__ import annotations

import importlib

import torch

from . import quant
from ._wire import dense, words


def destination_major_tokens(is_token_in_rank: torch.Tensor) -> torch.Tensor:
    """int64 ``[sum of is_token_in_rank]``: the tokens sent to rank 0 in ascending order, then rank 1, …"""
    return is_token_in_rank.t().nonzero(as_tuple=True)[1]


class Kernels:
    """The pure-torch kernels (the oracle); see the module docstring."""

    name = "python"

    def gather_rows(self, rows: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """``rows[index]`` for rows of any dtype and strides (moved as integer words, which is fast).

        Args:
            rows: ``[n, ...]``.
            index: int64 ``[m]`` in ``[0, n)``.

        Returns:
            ``[m, ...]`` like ``rows``, contiguous.
        """
        rows = dense(rows)
        return words(rows).index_select(0, index).view(rows.dtype).view(index.shape[0], *rows.shape[1:])

    def gather_rows_into(self, out: torch.Tensor, rows: torch.Tensor, index: torch.Tensor) -> None:
        """``out[:] = rows[index]`` (``out`` contiguous, as many bytes per row as ``rows``)."""
        torch.index_select(words(dense(rows)), 0, index, out=words(out))

    def scatter_rows(self, out: torch.Tensor, index: torch.Tensor, rows: torch.Tensor) -> None:
        """``out[index] = rows`` for a 2-D contiguous ``out`` and ``rows`` with as many bytes per row."""
        words(out).index_copy_(0, index, words(rows))

    def permute_rows(self, out: torch.Tensor, out_index: torch.Tensor, rows: torch.Tensor,
                     row_index: torch.Tensor) -> None:
        """``out[out_index] = rows[row_index]`` (2-D, as many bytes per row), without building ``rows[row_index]``
        in the C++ kernel."""
        self.scatter_rows(out, out_index, self.gather_rows(rows, row_index))

    def ll_plan(self, topk_idx: torch.Tensor, num_experts: int, num_ranks: int, rank: int, m: int, num_shared: int):
        """The low-latency send plan (``deep_ep_ops._ll_plan``): ``(slot [N, K (+1)], counts [R], source [total],
        meta int32 [total, 2])`` — each selection's send row, the real rows per destination chunk, and for
        every send row the token it copies (``N`` for padding) and its ``[local expert, token]`` (``-1``)."""
        from . import _ll_plan

        plan = _ll_plan.send_plan(topk_idx, num_experts, num_ranks, rank, m, num_shared)
        return (plan.slot, plan.counts, *_ll_plan.send_source(plan, topk_idx.shape[0]))

    def dispatch_layout(self, topk_idx: torch.Tensor, num_experts: int, num_ranks: int, num_ranks_per_node: int):
        """``get_dispatch_layout``'s local work: ``(num_tokens_per_rank [R], num_tokens_per_rdma_rank [nodes],
        num_tokens_per_expert [E] int32, is_token_in_rank bool [N, R])`` (see ``layout.get_dispatch_layout``)."""
        from . import layout

        return layout.get_dispatch_layout(topk_idx, num_experts, num_ranks, num_ranks_per_node)

    def ll_combine_rows(self, layout_range: torch.Tensor, cap: int, rows_per_expert: int) -> torch.Tensor:
        """The expert side of a low-latency combine: for each source ``s``, the flat ``[L, rows_per_expert]``
        positions of its rows in the order it sent them (local expert, then token), padded with 0 to ``cap``
        (int64 ``[R, cap]``)."""
        from . import _ll_plan

        return _ll_plan.combine_send_rows(layout_range, cap, rows_per_expert)

    def ll_sort(self, meta: torch.Tensor, recv_counts: torch.Tensor, cap: int, num_local_experts: int,
                rows_per_expert: int):
        """The real received rows of a low-latency dispatch in packed order: ``(order [n], dest [n], counts [L, R])``
        — ``order`` the received rows sorted by (local expert, source rank, arrival), ``dest`` each one's flat
        position in ``[L, rows_per_expert]``, ``counts`` rows per (local expert, source rank).

        Args:
            meta: int32 ``[R * cap, 2]`` ``[local expert, token]`` of every received row.
            recv_counts: int64 ``[R]`` real rows in each source's chunk of ``cap`` rows.
        """
        from . import _ll_plan

        num_ranks = recv_counts.shape[0]
        rows = _ll_plan.rows_to_sort(recv_counts, cap, num_ranks, compact=True)
        s = _ll_plan.sort_received(meta[rows, 0], rows, recv_counts, cap, num_local_experts, num_ranks)
        n = int(s.counts.sum())
        sort = s.order[:n]
        return s.rows[sort], s.expert[sort] * rows_per_expert + s.pos[sort], s.counts

    def combine_reduce(self, rows: torch.Tensor, token: torch.Tensor, num_tokens: int,
                       bias_0: torch.Tensor | None = None, bias_1: torch.Tensor | None = None,
                       out_dtype: torch.dtype | None = None) -> torch.Tensor:
        """``round(bias_0 + bias_1 + Σ rows of each token)`` in fp32, rows added in their order, rounded once.

        Args:
            rows: ``[n, W]`` floating; row ``j`` belongs to token ``token[j]`` (int64 ``[n]``).
            num_tokens: ``N``.
            bias_0, bias_1: optional ``[N, W]`` floating.
            out_dtype: result dtype (default ``rows.dtype``).

        Returns:
            ``[N, W]`` of ``out_dtype``.
        """
        acc = torch.zeros(num_tokens, rows.shape[1], dtype=torch.float32, device=rows.device)
        for bias in (bias_0, bias_1):
            if bias is not None:
                acc += bias.float()
        # Cache-sized chunks: converting all rows to fp32 at once would write (and page-fault) a second,
        # twice as large copy of the payload.
        step = max(1, (1 << 21) // max(1, rows.shape[1]))
        for begin in range(0, rows.shape[0], step):
            acc.index_add_(0, token[begin:begin + step], rows[begin:begin + step].float())
        return acc.to(rows.dtype if out_dtype is None else out_dtype)

    def weighted_reduce(self, rows: torch.Tensor, slot: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """The low-latency combine sum: ``Σ_k weights[t, k] · rows[slot[t, k]]`` (+ ``rows[slot[t, K]]`` with
        weight 1 when ``slot`` has a column more than ``weights``) in fp32, slots in order, rounded once.

        Args:
            rows: ``[n, H]`` floating.
            slot: int64 ``[N, K]`` or ``[N, K + 1]``; ``n`` (one past the end) marks an unused slot.
            weights: float32 ``[N, K]``.

        Returns:
            ``[N, H]`` of ``rows.dtype``.
        """
        n, k = slot.shape[0], weights.shape[1]
        acc = torch.zeros(n, rows.shape[1], dtype=torch.float32, device=rows.device)
        padded = torch.cat([rows, rows.new_zeros(1, rows.shape[1])])  # row n: the zero row of unused slots
        for j in range(slot.shape[1]):
            picked = self.gather_rows(padded, slot[:, j]).float()
            acc += picked * weights[:, j:j + 1] if j < k else picked
        return acc.to(rows.dtype)

    def quantize_int8(self, x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token INT8, see :func:`deep_ep_ops.quant.per_token_int8`."""
        return quant.per_token_int8(x, eps)

    def quantize_fp8(self, x: torch.Tensor, round_scale: bool, use_ue8m0: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-128-channel FP8, see :func:`deep_ep_ops.quant.per_block_fp8`."""
        return quant.per_block_fp8(x, round_scale, use_ue8m0)

    # The shared-memory copy loops (protocol and arguments: deep_ep_ops.transports._shm_engine).

    def ring_copy(self, segments, geometry, mirror, cursor, src, index, send_counts, out, recv_counts, rank, budget_s):
        """One exchange through the rings; 1 when this rank's part is complete (see ``_shm_engine.ring_copy``)."""
        from .transports import _shm_engine

        return _shm_engine.ring_copy(segments, geometry, mirror, cursor, src, index, send_counts, out, recv_counts,
                                     rank, budget_s)

    def ring_combine(self, segments, geometry, mirror, cursor, rows, send_counts, recv_counts, token_in_rank, bias_0,
                     bias_1, out, rank, budget_s, scratch: dict):
        """:meth:`combine_reduce` through the rings: ``rows`` (block ``d`` goes to rank ``d``) come back to their
        tokens' ranks and are summed, in rank order, into ``out [N, W]``. This version receives every row into
        a staging buffer, then reduces; the C++ one reduces each token as soon as its rows are in."""
        from .transports import _shm_engine

        src = rows.view(torch.uint8).reshape(rows.shape[0], rows.shape[1] * rows.element_size())
        if "staging" not in scratch:
            scratch["staging"] = torch.empty(sum(recv_counts), src.shape[1], dtype=torch.uint8)
        staging = scratch["staging"]
        if not _shm_engine.ring_copy(segments, geometry, mirror, cursor, src, None, send_counts, staging, recv_counts,
                                     rank, budget_s):
            return 0
        token = destination_major_tokens(token_in_rank)
        out.copy_(self.combine_reduce(staging.view(rows.dtype).view(-1, rows.shape[1]), token, out.shape[0], bias_0,
                                      bias_1, out.dtype))
        return 1

    def slots_send(self, segments, geometry, seq, rows, index, patch, patch_offset, header, send_caps, counts, rank,
                   sent, budget_s):
        """Writes a slot exchange into the peers' slots (see ``_shm_engine.slots_send``)."""
        from .transports import _shm_engine

        return _shm_engine.slots_send(segments, geometry, seq, rows, index, patch, patch_offset, header, send_caps,
                                      counts, rank, sent, budget_s)

    def slots_recv(self, segments, geometry, seq, rows, index, patch, patch_offset, header, send_caps, counts, out,
                   recv_counts, recv_header, recv_caps, rank, budget_s):
        """Reads a slot exchange out of this rank's slots (see ``_shm_engine.slots_recv``)."""
        from .transports import _shm_engine

        return _shm_engine.slots_recv(segments, geometry, seq, rows, index, patch, patch_offset, header, send_caps,
                                      counts, out, recv_counts, recv_header, recv_caps, rank, budget_s)


class NativeKernels(Kernels):
    """The same kernels through the dispatcher: the C++ CPU kernels of ``csrc/`` where they are built."""

    name = "native"

    def gather_rows(self, rows, index):
        return torch.ops.deepep._gather_rows(dense(rows), index)

    def scatter_rows(self, out, index, rows):
        torch.ops.deepep._scatter_rows(out, index, dense(rows))

    def combine_reduce(self, rows, token, num_tokens, bias_0=None, bias_1=None, out_dtype=None):
        return torch.ops.deepep._combine_reduce(rows, token, num_tokens, bias_0, bias_1,
                                                rows.dtype if out_dtype is None else out_dtype)

    def weighted_reduce(self, rows, slot, weights):
        return torch.ops.deepep._weighted_reduce(rows, slot, weights)

    def permute_rows(self, out, out_index, rows, row_index):
        torch.ops.deepep._permute_rows(out, out_index, dense(rows), row_index)

    def ll_plan(self, topk_idx, num_experts, num_ranks, rank, m, num_shared):
        return tuple(torch.ops.deepep._ll_plan(topk_idx, num_experts, num_ranks, rank, m, num_shared))

    def ll_sort(self, meta, recv_counts, cap, num_local_experts, rows_per_expert):
        return tuple(torch.ops.deepep._ll_sort(meta, recv_counts, cap, num_local_experts, rows_per_expert))

    def ll_combine_rows(self, layout_range, cap, rows_per_expert):
        return torch.ops.deepep._ll_combine_rows(layout_range, cap, rows_per_expert)

    def dispatch_layout(self, topk_idx, num_experts, num_ranks, num_ranks_per_node):
        return tuple(torch.ops.deepep._dispatch_layout(topk_idx, num_experts, num_ranks, num_ranks_per_node))

    def quantize_int8(self, x, eps):
        return tuple(torch.ops.deepep._quantize_int8(x, eps))

    def quantize_fp8(self, x, round_scale, use_ue8m0):
        return tuple(torch.ops.deepep._quantize_fp8(x, round_scale, use_ue8m0))

    def ring_copy(self, segments, geometry, mirror, cursor, src, index, send_counts, out, recv_counts, rank, budget_s):
        return torch.ops.deepep._shm_ring_copy(segments, geometry, mirror, cursor, src, index, send_counts, out,
                                               recv_counts, rank, budget_s)

    def ring_combine(self, segments, geometry, mirror, cursor, rows, send_counts, recv_counts, token_in_rank, bias_0,
                     bias_1, out, rank, budget_s, scratch):
        return torch.ops.deepep._shm_ring_combine(segments, geometry, mirror, cursor, rows, send_counts, recv_counts,
                                                  token_in_rank, bias_0, bias_1, out, rank, budget_s)

    def slots_send(self, segments, geometry, seq, rows, index, patch, patch_offset, header, send_caps, counts, rank,
                   sent, budget_s):
        return torch.ops.deepep._shm_slots_send(segments, geometry, seq, rows, index, patch, patch_offset, header,
                                                send_caps, counts, rank, sent, budget_s)

    def slots_recv(self, segments, geometry, seq, rows, index, patch, patch_offset, header, send_caps, counts, out,
                   recv_counts, recv_header, recv_caps, rank, budget_s):
        return torch.ops.deepep._shm_slots_recv(segments, geometry, seq, rows, index, patch, patch_offset, header,
                                                send_caps, counts, out, recv_counts, recv_header, recv_caps, rank,
                                                budget_s)


PYTHON = Kernels()
NATIVE = NativeKernels()


#: A private op every build of csrc/ implements; its CPU kernel tells whether the build is loaded.
_PROBE = "deepep::_gather_rows"


def load_native() -> None:
    """Imports the C++ kernels if they were built (called once by ``deep_ep_ops/__init__.py``)."""
    try:
        importlib.import_module("deep_ep_ops._C")
    except ImportError:
        pass


def native_loaded() -> bool:
    """Whether the C++ kernels are registered in this process."""
    return torch._C._dispatch_has_kernel_for_dispatch_key(_PROBE, "CPU")


def why_not_native() -> str:
    """Why :func:`native_loaded` is False (empty when it is True)."""
    if native_loaded():
        return ""
    try:
        importlib.import_module("deep_ep_ops._C")
    except ImportError as exc:
        return f"deep_ep_ops._C did not import: {exc}"
    return "deep_ep_ops._C imported but registered no CPU kernels"


def _register() -> None:
    """The pure-torch kernels are the ops' implementation for every device; a CPU kernel from csrc/
    takes precedence over them on CPU (a direct registration beats CompositeExplicitAutograd)."""
    from ._schemas import lib

    for name in ("gather_rows", "scatter_rows", "permute_rows", "combine_reduce", "weighted_reduce",
                 "quantize_int8", "quantize_fp8", "ll_plan", "ll_sort", "ll_combine_rows", "dispatch_layout"):
        lib.impl(f"_{name}", getattr(PYTHON, name), "CompositeExplicitAutograd")


_register()
