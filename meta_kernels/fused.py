"""Fake kernel of ``fused_deep_moe``: ``output [N, H]`` bf16 and ``ep_recv_count [L * R]`` int32."""

from __future__ import annotations

import torch

from deep_ep_ops import layout
from deep_ep_ops._schemas import lib

from . import checks


@torch.library.register_fake("deepep::fused_deep_moe", lib=lib)
def fused_deep_moe(x, topk_idx, topk_weights, gmm1, gmm1_scale, gmm2, gmm2_scale, m, num_experts, group_name,
                   num_ranks, rank, quant_mode=1, num_shared_expert_ranks=0, comm_seq=None):
    checks.check_low_latency_dispatch(x, topk_idx, m, num_experts, num_ranks, False, False, False,
                                      "int8" if quant_mode == 1 else "none", num_shared_expert_ranks, 1,
                                      op="fused_deep_moe")
    checks.check_fused(x, topk_idx, topk_weights, gmm1, gmm1_scale, gmm2, gmm2_scale, m, num_experts, num_ranks,
                       rank, num_shared_expert_ranks, quant_mode)
    num_local_experts = layout.num_local_experts(num_experts, num_ranks, rank, num_shared_expert_ranks)
    return (x.new_empty(x.shape, dtype=torch.bfloat16), x.new_empty((num_local_experts * num_ranks,), dtype=torch.int32),
            x.new_empty((1,), dtype=torch.int64))
