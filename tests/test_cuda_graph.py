"""CUDA graphs: the low-latency ops captured on a world-size-1 NCCL group and replayed with new inputs
give the eager results. Skips without CUDA (CI has no GPU)."""

import pytest
import torch
import torch.distributed as dist

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device; CI machines have none")]

M, E, H, K = 8, 8, 512, 3


def _inputs(seed):
    g = torch.Generator().manual_seed(seed)
    idx = torch.rand(M, E, generator=g).topk(K, dim=1).indices
    idx[0, 1] = -1
    return (torch.randn(M, H, generator=g).bfloat16().cuda(), idx.cuda(), torch.rand(M, K, generator=g).cuda())


@pytest.mark.parametrize("use_fp8", [False, True])
def test_low_latency_ops_replay_in_cuda_graph(group1, use_fp8):
    nccl = dist.new_group([0], backend="nccl")
    g = nccl.group_name

    def step(x, idx, w):
        out = torch.ops.deepep.low_latency_dispatch(x, idx, M, E, g, 1, 0, use_fp8)
        y = out[0].float() * (out[1].repeat_interleave(128, dim=-1) if use_fp8 else 1.0)
        combined = torch.ops.deepep.low_latency_combine(y.bfloat16(), idx, w, out[3], out[4], M, E, g, 1, 0)[0]
        return out[2], combined

    static = _inputs(0)
    step(*static)  # warm up allocations and the group context outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_count, static_out = step(*static)
    for seed in (1, 2, 3):
        fresh = _inputs(seed)
        for dst, src in zip(static, fresh):
            dst.copy_(src)
        graph.replay()
        want_count, want_out = step(*fresh)
        torch.cuda.synchronize()
        assert torch.equal(static_count, want_count)
        assert torch.equal(static_out, want_out)
