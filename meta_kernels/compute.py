"""Fake kernels of the private compute ops (``deep_ep_ops.compute``), so that opcheck can run on them."""

from __future__ import annotations

import torch

from deep_ep_ops import layout
from deep_ep_ops._schemas import lib


@torch.library.register_fake("deepep::_gather_rows", lib=lib)
def _gather_rows(rows, index):
    return rows.new_empty((index.shape[0], *rows.shape[1:]))


@torch.library.register_fake("deepep::_scatter_rows", lib=lib)
def _scatter_rows(out, index, rows):
    return None


@torch.library.register_fake("deepep::_combine_reduce", lib=lib)
def _combine_reduce(rows, token, num_tokens, bias_0, bias_1, out_dtype):
    return rows.new_empty((num_tokens, rows.shape[1]), dtype=out_dtype)


@torch.library.register_fake("deepep::_weighted_reduce", lib=lib)
def _weighted_reduce(rows, slot, weights):
    return rows.new_empty((slot.shape[0], rows.shape[1]))


@torch.library.register_fake("deepep::_quantize_int8", lib=lib)
def _quantize_int8(x, eps):
    return x.new_empty(x.shape, dtype=torch.int8), x.new_empty(x.shape[:-1], dtype=torch.float32)


@torch.library.register_fake("deepep::_quantize_fp8", lib=lib)
def _quantize_fp8(x, round_scale, use_ue8m0):
    n, hidden = x.shape
    scales = (x.new_empty((n, hidden // 512), dtype=torch.int32) if use_ue8m0
              else x.new_empty((n, hidden // 128), dtype=torch.float32))
    return x.new_empty(x.shape, dtype=torch.float8_e4m3fn), scales


@torch.library.register_fake("deepep::_permute_rows", lib=lib)
def _permute_rows(out, out_index, rows, row_index):
    return None


@torch.library.register_fake("deepep::_dispatch_layout", lib=lib)
def _dispatch_layout(topk_idx, num_experts, num_ranks, num_ranks_per_node):
    i32 = torch.int32
    return (topk_idx.new_empty((num_ranks,), dtype=i32), topk_idx.new_empty((num_ranks // num_ranks_per_node,),
                                                                            dtype=i32),
            topk_idx.new_empty((num_experts,), dtype=i32), topk_idx.new_empty((topk_idx.shape[0], num_ranks),
                                                                              dtype=torch.bool))


@torch.library.register_fake("deepep::_ll_plan", lib=lib)
def _ll_plan(topk_idx, num_experts, num_ranks, rank, m, num_shared):
    total = sum(layout.chunk_caps(num_ranks, m, topk_idx.shape[1], num_experts, num_shared))
    cols = topk_idx.shape[1] + (1 if num_shared else 0)
    return (topk_idx.new_empty((topk_idx.shape[0], cols)), topk_idx.new_empty((num_ranks,)),
            topk_idx.new_empty((total,)), topk_idx.new_empty((total, 2), dtype=torch.int32))


@torch.library.register_fake("deepep::_ll_sort", lib=lib)
def _ll_sort(meta, recv_counts, cap, num_local_experts, rows_per_expert):
    n = torch.library.get_ctx().new_dynamic_size()  # the real rows: data dependent
    return (recv_counts.new_empty((n,)), recv_counts.new_empty((n,)),
            recv_counts.new_empty((num_local_experts, recv_counts.shape[0])))


@torch.library.register_fake("deepep::_ll_combine_rows", lib=lib)
def _ll_combine_rows(layout_range, cap, rows_per_expert):
    return layout_range.new_empty((layout_range.shape[1], cap))
