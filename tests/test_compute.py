"""Tier 1: the C++ kernels of csrc/ against their pure-torch oracles (deep_ep_ops.compute), bit for bit."""

import pytest
import torch

from deep_ep_ops import compute, quant

pytestmark = pytest.mark.skipif(not compute.native_loaded(), reason="the C++ kernels of csrc/ are not built here "
                                "(pip install --no-build-isolation -e .)")
PY, NATIVE = compute.PYTHON, compute.NATIVE
FLOATS = (torch.bfloat16, torch.float16, torch.float32)


def _same(got, want):
    if isinstance(want, (tuple, list)):
        assert len(got) == len(want)
        for g, w in zip(got, want):
            _same(g, w)
        return
    assert (got.dtype, got.shape) == (want.dtype, want.shape)
    if got.element_size() == 1:
        got, want = got.view(torch.uint8), want.view(torch.uint8)
    assert torch.equal(got, want), (got, want)


@pytest.fixture
def g():
    return torch.Generator().manual_seed(0)


def test_gather_and_scatter(g):
    rows = torch.randn(50, 7, 6, generator=g).bfloat16()
    index = torch.randint(0, 50, (33,), generator=g)
    _same(NATIVE.gather_rows(rows, index), PY.gather_rows(rows, index))
    packed = torch.randint(0, 255, (20, 40), dtype=torch.uint8, generator=g)
    field = packed[:, 8:24]  # a strided field of packed rows
    _same(NATIVE.gather_rows(field, index[:10] % 20), PY.gather_rows(field, index[:10] % 20))
    _same(NATIVE.gather_rows(rows[:0], index[:0]), PY.gather_rows(rows[:0], index[:0]))
    out_n, out_p = torch.zeros(60, 16, dtype=torch.uint8), torch.zeros(60, 16, dtype=torch.uint8)
    target = torch.randperm(60, generator=g)[:20]
    NATIVE.scatter_rows(out_n, target, field)
    PY.scatter_rows(out_p, target, field)
    _same(out_n, out_p)
    with pytest.raises(RuntimeError, match="index 50 out of range for 50 rows"):
        NATIVE.gather_rows(rows, torch.tensor([50]))


@pytest.mark.parametrize("dtype", FLOATS)
def test_combine_reduce(g, dtype):
    rows = (torch.randn(300, 96, generator=g) * 10).to(dtype)
    token = torch.randint(0, 70, (300,), generator=g)
    bias = torch.randn(70, 96, generator=g)
    bias[0, :4] = -0.0  # 0 + (-0) is +0: the kernels must start from zeros as torch does
    for biases in ((None, None), (bias, None), (bias.to(dtype), bias)):
        _same(NATIVE.combine_reduce(rows, token, 70, *biases, out_dtype=dtype),
              PY.combine_reduce(rows, token, 70, *biases, out_dtype=dtype))
    _same(NATIVE.combine_reduce(rows[:, :8].float(), token, 70, out_dtype=torch.float32),
          PY.combine_reduce(rows[:, :8].float(), token, 70, out_dtype=torch.float32))


@pytest.mark.parametrize("dtype", FLOATS)
def test_weighted_reduce(g, dtype):
    rows = torch.randn(64, 256, generator=g).to(dtype)
    slot = torch.randint(0, 65, (20, 9), generator=g)  # 64: the zero row of unused slots
    weights = torch.rand(20, 8, generator=g) - 0.25
    _same(NATIVE.weighted_reduce(rows, slot, weights), PY.weighted_reduce(rows, slot, weights))
    _same(NATIVE.weighted_reduce(rows, slot[:, :8], weights), PY.weighted_reduce(rows, slot[:, :8], weights))


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("eps", [0.0, quant.INT8_NORMAL_EPS])
def test_quantize_int8(g, dtype, eps):
    x = (torch.randn(40, 7168, generator=g) * 4).to(dtype)
    x[3] = 0  # scale 0
    x[5, 9] = 1e4  # one outlier
    x[6] = torch.arange(7168) % 5 - 2.5  # halves: round to even
    _same(NATIVE.quantize_int8(x, eps), PY.quantize_int8(x, eps))
    _same(NATIVE.quantize_int8(x[:0], eps), PY.quantize_int8(x[:0], eps))


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("round_scale, use_ue8m0", [(False, False), (True, False), (True, True)])
def test_quantize_fp8(g, dtype, round_scale, use_ue8m0):
    x = (torch.randn(24, 1024, generator=g) * torch.logspace(-6, 3, 24).unsqueeze(1)).to(dtype)
    x[2] = 0  # amax floored at 1e-4
    x[4, :128] = 448.0 * 2.0 ** -3  # amax / 448 an exact power of two
    _same(NATIVE.quantize_fp8(x, round_scale, use_ue8m0), PY.quantize_fp8(x, round_scale, use_ue8m0))


@pytest.mark.parametrize("num_ranks, per_node", [(1, 1), (4, 2), (8, 8), (8, 1)])
def test_dispatch_layout(g, num_ranks, per_node):
    for n, k, e in ((0, 4, 32), (33, 8, 64), (7, 1, 8)):
        idx = torch.rand(n, e, generator=g).topk(k, dim=1).indices
        idx[torch.rand(n, k, generator=g) < 0.2] = -1
        if n:
            idx[0, -1] = idx[0, 0]  # a duplicate id counts once per rank, twice per expert
        _same(NATIVE.dispatch_layout(idx, e, num_ranks, per_node), PY.dispatch_layout(idx, e, num_ranks, per_node))


def test_output_pool_reuses_a_block_only_after_its_tensor_is_dropped():
    """Large outputs come from pre-faulted blocks (``_outputs.OutputPool``): a block serves again once the caller
    dropped its tensor, never while the tensor lives, and free blocks beyond ``max_cached_bytes`` are unmapped."""
    from deep_ep_ops._outputs import OutputPool

    pool = OutputPool(min_bytes=1 << 12, max_cached_bytes=1 << 16)
    small = pool.empty((4, 4), torch.float32)
    assert small.shape == (4, 4) and not pool._busy  # under min_bytes: torch.empty
    a = pool.empty((64, 64), torch.float32)  # 16 KB
    a.fill_(1.0)
    b = pool.empty((64, 64), torch.float32)
    assert a.data_ptr() != b.data_ptr() and torch.equal(a, torch.ones(64, 64))
    a_ptr = a.data_ptr()
    del a
    c = pool.empty((32, 128), torch.bfloat16)  # 8 KB: another size class
    d = pool.empty((4096,), torch.float32)  # 16 KB: takes a's block
    assert d.data_ptr() == a_ptr and c.data_ptr() not in (a_ptr, b.data_ptr())
    del b, c, d
    big = [pool.empty((1 << 14,), torch.float32) for _ in range(8)]  # 64 KB each
    del big
    # No free 32 KB block: reclaims 8 x 64 KB besides the free 2 x 16 KB + 8 KB, over the 64 KB budget, so
    # the largest free blocks go first until it fits.
    pool.empty((1 << 13,), torch.float32)
    assert not pool._free.get(1 << 16) and pool._cached == 40 << 10
    assert pool._cached == sum(len(b) for blocks in pool._free.values() for b in blocks)
    pool.clear()
    assert pool._cached == 0 and not pool._free
