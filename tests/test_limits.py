"""Tier 1: the documented limits (README, *Limits*), buffer size hints, and Buffers built during capture.

Limits are enforced by the shared checks of ``meta_kernels/checks.py``, before any exchange: the small ones
through the Buffer (eager), the sizes that cannot be allocated here through the fake kernels, which run
the same checks on tensors that have a shape but no storage.
"""

import pytest
import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import FakeTensorMode

from deep_ep_ops import Buffer, Config, ops, tuning

M, H, E = 8, 256, 8
BIG = 2**31  # one more than the int32 index tensors hold


@pytest.fixture
def buf(group1):
    b = Buffer(dist.group.WORLD, low_latency_mode=True, timeout_s=10)
    yield b
    b.destroy()


def _routing(n: int, k: int) -> torch.Tensor:
    return torch.arange(n * k).remainder(E).view(n, k)


# --- limits through the Buffer --------------------------------------------------------------------------

def test_num_topk_limit(buf):
    idx = torch.zeros(2, 129, dtype=torch.int64)
    hint = r"\(DeepEP's kNumMaxTopK, which the buffer size hints assume\)"
    with pytest.raises(RuntimeError, match=r"deepep::get_dispatch_layout: expected num_topk <= 128, got 129 " + hint):
        buf.get_dispatch_layout(idx, E)
    with pytest.raises(RuntimeError, match=r"deepep::low_latency_dispatch: expected num_topk <= 128, got 129 " + hint):
        buf.low_latency_dispatch(torch.zeros(2, H).bfloat16(), idx, M, E)
    buf.get_dispatch_layout(torch.zeros(2, 128, dtype=torch.int64), E)  # the limit itself is fine


def test_hidden_limit(buf):
    idx = _routing(2, 2)
    in_rank = torch.ones(2, 1, dtype=torch.bool)
    with pytest.raises(RuntimeError, match=r"deepep::dispatch: expected hidden >= 1, got 0"):
        buf.dispatch(torch.zeros(2, 0), topk_idx=idx, is_token_in_rank=in_rank,
                     num_tokens_per_expert=torch.zeros(E, dtype=torch.int32))
    with pytest.raises(RuntimeError, match=r"deepep::low_latency_dispatch: expected hidden >= 1, got 0"):
        buf.low_latency_dispatch(torch.zeros(2, 0).bfloat16(), idx, M, E, use_fp8=False)
    with pytest.raises(RuntimeError, match=r"deepep::low_latency_dispatch: expected hidden divisible by 512 for FP8 "
                                           r"with use_ue8m0, got 256"):
        buf.low_latency_dispatch(torch.zeros(2, H).bfloat16(), idx, M, E, round_scale=True, use_ue8m0=True)


def test_num_experts_and_rows_per_expert_limits(buf):
    idx = _routing(2, 2)
    with pytest.raises(RuntimeError, match=rf"deepep::get_dispatch_layout: expected num_experts <= {BIG - 1} "
                                           r"\(expert counts and local ids are int32\), got 2147483648"):
        buf.get_dispatch_layout(idx, BIG)
    with pytest.raises(RuntimeError, match=r"deepep::low_latency_dispatch: expected num_ranks \* "
                                           rf"num_max_dispatch_tokens_per_rank <= {BIG - 1} \(rows per expert are "
                                           r"indexed by int32\), got 1 \* 2147483648"):
        buf.low_latency_dispatch(torch.zeros(2, H).bfloat16(), idx, BIG, E)


# --- limits on sizes too big to allocate: the fake kernels run the same checks ---------------------------

def _layout_op(group, n, k):
    return torch.ops.deepep.get_dispatch_layout(torch.empty(n, k, dtype=torch.int64), E, group, 1, 1)


def _dispatch_op(group, n, worst=0):
    x, idx = torch.empty(n, H), torch.empty(n, 2, dtype=torch.int64)
    return torch.ops.deepep.dispatch(x, None, idx, None, torch.empty(n, 1, dtype=torch.bool), None, E, group, 1, 1,
                                     worst)


FAKE_ERRORS = [
    (lambda g: _layout_op(g, BIG, 1), r"deepep::get_dispatch_layout: expected num_tokens <= 2147483647 \(token "
                                      r"indices are int32\), got 2147483648"),
    (lambda g: _layout_op(g, BIG // 8, 8), r"deepep::get_dispatch_layout: expected num_tokens \* num_topk <= "
                                           r"2147483647 \(per-expert counts are int32\), got 2147483648"),
    (lambda g: _dispatch_op(g, BIG), r"deepep::dispatch: expected num_tokens <= 2147483647"),
    (lambda g: _dispatch_op(g, 4, worst=BIG), r"deepep::dispatch: expected num_worst_tokens in \[0, 2147483647\], "
                                              r"got 2147483648"),
    (lambda g: torch.ops.deepep.low_latency_combine(torch.empty(E, BIG, H), torch.empty(2, 2, dtype=torch.int64),
                                                    torch.empty(2, 2), torch.empty(E, BIG, dtype=torch.int32),
                                                    torch.empty(E, 1, dtype=torch.int64), BIG, E, g, 1, 0),
     r"deepep::low_latency_combine: expected num_ranks \* num_max_dispatch_tokens_per_rank <= 2147483647"),
]


@pytest.mark.parametrize("call, message", FAKE_ERRORS)
def test_size_limits_in_fakes(group1, call, message):
    with FakeTensorMode(), pytest.raises(RuntimeError, match=message):
        call(group1)


# --- buffer size hints ------------------------------------------------------------------------------------

FORMATS = {"bf16": dict(use_fp8=False), "fp8": dict(use_fp8=True), "int8": dict(quant_mode="int8")}


@pytest.mark.parametrize("fmt", sorted(FORMATS))
@pytest.mark.parametrize("num_topk, dtype", [(1, torch.bfloat16), (3, torch.bfloat16), (E, torch.bfloat16),
                                             (3, torch.float32)])
def test_low_latency_hint_is_enough(group1, fmt, num_topk, dtype):
    """A Buffer sized by the hint for the real top-k runs dispatch and combine without a size error."""
    hint = Buffer.get_low_latency_rdma_size_hint(M, H, 1, E, num_topk=num_topk, dtype=dtype)
    b = Buffer(dist.group.WORLD, low_latency_mode=True, num_rdma_bytes=hint, transport="shm", timeout_s=10)
    try:
        x, idx = torch.randn(M, H).to(dtype), _routing(M, num_topk)
        recv_x, _, handle, _, _ = b.low_latency_dispatch(x, idx, M, E, **FORMATS[fmt])
        y = torch.zeros(E, M, H, dtype=dtype)
        b.low_latency_combine(y, idx, torch.ones(M, num_topk), handle)
    finally:
        b.destroy()


def test_low_latency_hint_is_tight(group1):
    """The hint is exactly what the shm slots need: 64 bytes less per slot fails, in the Buffer's check before
    any exchange and, past it (a raw op), in the backend itself."""
    hint = Buffer.get_low_latency_rdma_size_hint(M, H, 1, E, num_topk=3)
    short = hint - 2 * 64  # one rank: two slots (one per half)
    b = Buffer(dist.group.WORLD, low_latency_mode=True, num_rdma_bytes=short, transport="shm", timeout_s=10)
    x, idx = torch.randn(M, H).bfloat16(), _routing(M, 3)
    try:
        with pytest.raises(RuntimeError, match=rf"deepep::low_latency_dispatch: expected num_rdma_bytes >= {hint} "
                                               rf"\(get_low_latency_rdma_size_hint\({M}, {H}, 1, {E}, num_topk=3\)\), "
                                               rf"got {short}"):
            b.low_latency_dispatch(x, idx, M, E, use_fp8=False)
        with pytest.raises(RuntimeError, match=rf"expected num_rdma_bytes >= {hint} \(bounded slots"):
            ops.low_latency_dispatch(x, idx, M, E, b.group_name, use_fp8=False)
    finally:
        b.destroy()


def test_hints_follow_topk_and_experts():
    # DeepEP's number without num_topk (code sized the DeepEP way gets DeepEP's bytes) ...
    deepep = Buffer.get_low_latency_rdma_size_hint(128, 7168, 8, 256)
    assert deepep == tuning._deepep_low_latency_size(128, 7168, 256)
    # ... several times what top-8 needs here, and the real need grows with top-k up to L, then stops.
    sizes = [Buffer.get_low_latency_rdma_size_hint(128, 7168, 8, 256, num_topk=k) for k in (1, 8, 32, 64)]
    assert sizes[1] * 8 < deepep and sizes[0] < sizes[1] < sizes[2] == sizes[3]  # L = 32
    assert Buffer.get_low_latency_rdma_size_hint(128, 7168, 8, 512, num_topk=64) > sizes[3]  # L = 64
    # Normal mode: DeepEP reserves 128 top-k entries per token slot; the real top-k needs less.
    assert Config().get_nvl_buffer_size_hint(7168 * 2, 8, num_topk=8) < Config().get_nvl_buffer_size_hint(7168 * 2, 8)
    assert Config().get_rdma_buffer_size_hint(7168 * 2, 16, num_topk=8) < Config().get_rdma_buffer_size_hint(7168 * 2, 16)


def test_normal_hint_is_enough(group1):
    hint = Config().get_nvl_buffer_size_hint(H * 2, 1, num_topk=2)
    b = Buffer(dist.group.WORLD, num_nvl_bytes=hint, transport="shm", timeout_s=10)
    try:
        x, idx = torch.randn(M, H).bfloat16(), _routing(M, 2)
        per_rank, _, per_expert, in_rank, _ = b.get_dispatch_layout(idx, E)
        recv_x, _, _, _, handle, _ = b.dispatch(x, topk_idx=idx, num_tokens_per_rank=per_rank,
                                                is_token_in_rank=in_rank, num_tokens_per_expert=per_expert)
        assert torch.equal(b.combine(recv_x, handle)[0], x)
    finally:
        b.destroy()


# --- no Buffer built during graph capture or compilation ---------------------------------------------------

CAPTURE = r"deepep::Buffer: expected to be built outside graph capture and torch.compile, got a Buffer built during "


def test_buffer_not_built_during_cuda_graph_capture(group1, monkeypatch):
    # CPU stand-in for a capturing CUDA stream (the check asks only when CUDA is initialized).
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with pytest.raises(RuntimeError, match=CAPTURE + "CUDA graph capture"):
        Buffer(dist.group.WORLD)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_buffer_not_built_in_a_real_cuda_graph(group1):
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match=CAPTURE + "CUDA graph capture"):
        with torch.cuda.graph(graph):
            Buffer(dist.group.WORLD)


def test_buffer_not_built_while_compiling(group1):
    torch._dynamo.reset()
    with pytest.raises(Exception, match=CAPTURE + "torch.compile tracing"):
        torch.compile(lambda x: x + Buffer(dist.group.WORLD).rank, fullgraph=True, backend="eager")(torch.ones(1))
