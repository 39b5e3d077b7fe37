"""Fake kernels of the normal-mode ops: output metadata only, after the shared checks.

The received-token count of ``dispatch`` is data dependent, so it is an unbacked size
(``new_dynamic_size``); with ``num_worst_tokens > 0`` it is that static number. Cached dispatch and combine
take their sizes from the handle, re-using the symbol of the dispatch that made it.
"""

from __future__ import annotations

import torch

from deep_ep_ops import layout
from deep_ep_ops._schemas import lib

from . import checks


def _seq(x) -> torch.Tensor:
    return x.new_empty((1,), dtype=torch.int64)


@torch.library.register_fake("deepep::get_dispatch_layout", lib=lib)
def get_dispatch_layout(topk_idx, num_experts, group_name, num_ranks, num_ranks_per_node):
    checks.check_layout(topk_idx, num_experts, num_ranks, num_ranks_per_node)
    n, r = topk_idx.shape[0], num_ranks
    return (topk_idx.new_empty((r,), dtype=torch.int32), topk_idx.new_empty((r // num_ranks_per_node,), dtype=torch.int32),
            topk_idx.new_empty((num_experts,), dtype=torch.int32), topk_idx.new_empty((n, r), dtype=torch.bool))


@torch.library.register_fake("deepep::dispatch", lib=lib)
def dispatch(x, x_scales, topk_idx, topk_weights, is_token_in_rank, num_tokens_per_expert, num_experts,
             group_name, num_ranks, expert_alignment=1, num_worst_tokens=0, quant_mode="none",
             expert_token_nums_type=1, comm_seq=None):
    r = num_ranks
    checks.check_dispatch(x, x_scales, topk_idx, topk_weights, is_token_in_rank, num_tokens_per_expert,
                          num_experts, r, expert_alignment, num_worst_tokens, quant_mode, expert_token_nums_type)
    n = num_worst_tokens if num_worst_tokens > 0 else torch.library.get_ctx().new_dynamic_size()
    recv_x, recv_x_scales = layout.normal_recv_payload(x, x_scales, quant_mode, n)
    k = topk_idx.shape[1] if topk_idx is not None else 0
    kw = topk_weights.shape[1] if topk_weights is not None else 0
    i32 = torch.int32
    return (recv_x, recv_x_scales, x.new_empty((n, k), dtype=torch.int64), x.new_empty((n, kw), dtype=torch.float32),
            x.new_empty((num_experts // r,), dtype=i32), x.new_empty((r, r), dtype=i32), x.new_empty((r, 1), dtype=i32),
            x.new_empty((r, 1), dtype=i32), x.new_empty((n,), dtype=i32),
            x.new_empty((x.shape[0], r), dtype=i32), _seq(x))


@torch.library.register_fake("deepep::dispatch.cached", lib=lib)
def cached_dispatch(x, x_scales, topk_weights, handle, group_name, num_ranks, comm_seq=None):
    checks.check_cached_dispatch(x, x_scales, topk_weights, handle, num_ranks)
    n = handle[3].shape[0]
    recv_x, recv_x_scales = layout.normal_recv_payload(x, x_scales, "none", n)
    kw = topk_weights.shape[1] if topk_weights is not None else 0
    return recv_x, recv_x_scales, x.new_empty((n, kw), dtype=torch.float32), _seq(x)


@torch.library.register_fake("deepep::combine", lib=lib)
def combine(x, handle, topk_weights, bias_0, bias_1, group_name, num_ranks, comm_seq=None):
    checks.check_combine(x, handle, topk_weights, bias_0, bias_1, num_ranks)
    n = handle[4].shape[0]
    kw = topk_weights.shape[1] if topk_weights is not None else 0
    return x.new_empty((n, x.shape[1])), x.new_empty((n, kw), dtype=torch.float32), _seq(x)
