"""Op chains built from the public API, shared by the benchmarks and the tests.

``unfused_deep_moe`` is what ``fused_deep_moe`` replaces: the same computation as a chain of public ops,
the baseline of ``bench_fused`` and the bitwise oracle of the fused tests.
"""

from __future__ import annotations

import torch

from deep_ep_ops import ffn


def unfused_deep_moe(buffer, x, topk_idx, topk_weights, gmm1_permuted_weight, gmm1_permuted_weight_scale,
                     gmm2_weight, gmm2_weight_scale, num_max_dispatch_tokens_per_rank, num_experts, quant_mode=1):
    """The same computation as a chain of public ops: ``Buffer.low_latency_dispatch`` → grouped GEMMs on
    the packed layout (valid rows of each expert) → ``Buffer.low_latency_combine``.

    Returns:
        ``(output [N, H] bf16, ep_recv_count [L*R] int32)``, like ``Buffer.fused_deep_moe``.
    """
    wire = dict(use_fp8=False, quant_mode="int8") if quant_mode == 1 else dict(use_fp8=False)
    recv_x, count, handle, _, _ = buffer.low_latency_dispatch(x, topk_idx, num_max_dispatch_tokens_per_rank,
                                                              num_experts, **wire)
    data, scales = recv_x if quant_mode == 1 else (recv_x, None)
    valid = (handle[1] & 0xFFFFFFFF).sum(dim=1).tolist()
    y = torch.empty(data.shape, dtype=torch.bfloat16, device=data.device)
    for i, n in enumerate(valid):
        y[i, :n] = ffn.expert_ffn(data[i, :n], None if scales is None else scales[i, :n], gmm1_permuted_weight[i],
                                  gmm1_permuted_weight_scale[i], gmm2_weight[i], gmm2_weight_scale[i], quant_mode)
    combined, _, _ = buffer.low_latency_combine(y, topk_idx, topk_weights, handle)
    return combined, (handle[1] & 0xFFFFFFFF).flatten().to(torch.int32)

