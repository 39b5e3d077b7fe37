"""Tier 1: low-latency ops on a world-size-1 group: fakes, no host sync, facade contract and errors."""

import contextlib

import pytest
import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import FakeTensorMode

from deep_ep_ops import Buffer, reference

M, E, H, K = 6, 8, 512, 3
FORMATS = {"bf16": (False, False, False, "none"), "fp8": (True, False, False, "none"),
           "ue8m0": (True, True, True, "none"), "int8": (False, False, False, "int8")}


def _inputs(n=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    idx = torch.rand(n, E, generator=g).topk(K, dim=1).indices
    idx[0, 1] = -1
    return torch.randn(n, H, generator=g).bfloat16(), idx, torch.rand(n, K, generator=g)


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_fake_matches_reference_and_kernel(group1, fmt):
    x, idx, _ = _inputs()
    args = (x, idx, M, E, group1, 1, 0, *FORMATS[fmt])
    with FakeTensorMode() as mode:
        fake = torch.ops.deepep.low_latency_dispatch(mode.from_tensor(x), mode.from_tensor(idx), *args[2:])
    real = torch.ops.deepep.low_latency_dispatch(*args)
    use_fp8, round_scale, use_ue8m0, quant_mode = FORMATS[fmt]
    ref = reference.low_latency_dispatch([x], [idx], M, E, use_fp8=use_fp8, round_scale=round_scale,
                                         use_ue8m0=use_ue8m0, quant_mode=quant_mode)[0]
    want = [ref.packed_recv_x, ref.packed_recv_x_scales, ref.packed_recv_count, ref.src_info, ref.layout_range]
    for i, (f, r, w) in enumerate(zip(fake, real, want)):
        assert (f.shape, f.dtype, f.stride()) == (r.shape, r.dtype, r.stride()), i
        if w is not None:  # bf16 has no scales: the op returns an empty [L, R*M, 0] tensor
            assert (f.shape, f.dtype) == (w.shape, w.dtype), i


@contextlib.contextmanager
def no_host_reads(allow=lambda t: False):
    """Makes every tensor-to-Python read raise (a device→host sync on accelerators), except ``allow``ed."""
    names = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__")
    originals = {n: getattr(torch.Tensor, n) for n in names}

    def guard(name):
        def read(self, *args, **kwargs):
            if allow(self):
                return originals[name](self, *args, **kwargs)
            raise AssertionError(f"host read Tensor.{name} of a {tuple(self.shape)} {self.dtype} tensor")
        return read

    for n in names:
        setattr(torch.Tensor, n, guard(n))
    try:
        yield
    finally:
        for n, f in originals.items():
            setattr(torch.Tensor, n, f)


def test_the_guard_catches_host_reads():
    with no_host_reads(), pytest.raises(AssertionError, match="host read Tensor.item"):
        torch.ones(1).item()


@pytest.fixture
def portable(group1):
    """The group on the all_to_all backend, the one accelerators use: the low-latency path must not read
    device data on the host there (the shm backend is CPU-only, where reading a count costs nothing)."""
    b = Buffer(dist.group.WORLD, low_latency_mode=True, transport="all_to_all")
    yield group1
    b.destroy()


@pytest.fixture
def static_path(monkeypatch):
    """The accelerators' code path (static shapes, device-side validation), taken on CPU."""
    from deep_ep_ops import low_latency

    monkeypatch.setattr(low_latency, "static_shapes", lambda device: True)


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_no_host_sync(portable, static_path, fmt):
    group1 = portable
    x, idx, w = _inputs()
    with no_host_reads():
        out = torch.ops.deepep.low_latency_dispatch(x, idx, M, E, group1, 1, 0, *FORMATS[fmt])
        y = torch.randn(out[0].shape).bfloat16()
        torch.ops.deepep.low_latency_combine(y, idx, w, out[3], out[4], M, E, group1, 1, 0)


def test_hook_halves_read_only_their_cpu_token(portable, static_path):
    """The receive halves look up their exchange by the token's value: a CPU [1] int64 tensor the send
    half made, never device data."""
    x, idx, w = _inputs()

    group1 = portable

    def is_token(t):
        return t.device.type == "cpu" and t.dtype == torch.int64 and tuple(t.shape) == (1,)

    with no_host_reads(allow=is_token):
        *outs, token, _ = torch.ops.deepep.low_latency_dispatch_send(x, idx, M, E, group1, 1, 0, False)
        torch.ops.deepep.low_latency_dispatch_recv(*outs, token, group1)
        y, token, _ = torch.ops.deepep.low_latency_combine_send(outs[0], idx, w, outs[3], outs[4], M, E, group1, 1, 0)
        torch.ops.deepep.low_latency_combine_recv(y, token, group1)


def test_compiled_region_without_scalar_capture(group1):
    """A decode step against the Buffer traces with fullgraph=True and capture_scalar_outputs=False."""
    buf = Buffer(dist.group.WORLD, low_latency_mode=True)
    x, idx, w = _inputs()

    def step(x, idx, w):
        recv_x, count, handle, _, _ = buf.low_latency_dispatch(x, idx, M, E, use_fp8=False)
        return buf.low_latency_combine(recv_x * 2, idx, w, handle)[0], count

    try:
        torch._dynamo.reset()
        with torch._dynamo.config.patch(capture_scalar_outputs=False):
            out, count = torch.compile(step, fullgraph=True, backend="aot_eager")(x, idx, w)
        eager, _ = step(x, idx, w)
        torch.testing.assert_close(out, eager)
        assert int(count.sum()) == int((idx >= 0).sum())
    finally:
        buf.destroy()


def test_facade_contract(group1):
    x, idx, w = _inputs()
    buf = Buffer(dist.group.WORLD, low_latency_mode=True, num_rdma_bytes=Buffer.get_low_latency_rdma_size_hint(M, H, 1, E))
    try:
        recv_x, count, handle, event, hook = buf.low_latency_dispatch(x, idx, M, E)  # use_fp8=True by default
        assert isinstance(recv_x, tuple) and recv_x[0].dtype == torch.float8_e4m3fn and hook is None
        assert recv_x[0].shape == (E, M, H) and recv_x[1].shape == (E, M, H // 128) and count.dtype == torch.int32
        assert handle[2:] == (M, H, E) and handle[0].shape == (E, M) and handle[1].shape == (E, 1)
        y = buf.get_next_low_latency_combine_buffer(handle)
        assert y.shape == (E, M, H) and y.dtype == torch.bfloat16
        y.zero_()
        out = torch.full((5, H), 7.0).bfloat16()
        combined, _, _ = buf.low_latency_combine(y, idx, w, handle, zero_copy=True, out=out)
        assert combined is out and out.abs().sum() == 0
        _, _, _, _, hook = buf.low_latency_dispatch(x, idx, M, E, return_recv_hook=True)
        buf.clean_low_latency_buffer(M, H, E)  # drops the receive still in flight
        with pytest.raises(RuntimeError, match=r"expected the recv_token returned by a send on group '0', got an "
                                               r"unknown one \(was clean_low_latency_buffer called\?\)"):
            hook()
    finally:
        buf.destroy()


ERRORS = [
    (dict(low_latency_mode=False), {}, RuntimeError,
     r"deepep::low_latency_dispatch: expected a Buffer built with low_latency_mode=True \(as DeepEP requires\), "
     r"got low_latency_mode=False"),
    (dict(low_latency_mode=True, num_rdma_bytes=1024), {}, RuntimeError,
     r"expected num_rdma_bytes >= \d+ \(get_low_latency_rdma_size_hint\(6, 512, 1, 8, num_topk=3\)\), got 1024"),
    (dict(low_latency_mode=True), dict(quant_mode="fp4"), ValueError,
     r"expected quant_mode in \[None, 'none', 'bf16', 'int8'\], got 'fp4'"),
    (dict(low_latency_mode=True), dict(async_finish=True, return_recv_hook=True), ValueError,
     r"expected at most one of async_finish and return_recv_hook, got both"),
    (dict(low_latency_mode=True), dict(use_ue8m0=True), RuntimeError,
     r"expected round_scale=True with use_ue8m0=True, got round_scale=False \(on rank 0\)"),
    (dict(low_latency_mode=True), dict(x=torch.zeros(7, H).bfloat16(), topk_idx=torch.zeros(7, K, dtype=torch.int64)),
     RuntimeError, r"expected num_tokens <= num_max_dispatch_tokens_per_rank = 6, got 7 \(on rank 0\)"),
    (dict(low_latency_mode=True), dict(x=torch.zeros(5, 100).bfloat16()), RuntimeError,
     r"expected hidden divisible by 128 for FP8, got 100"),
]


@pytest.mark.parametrize("buffer_kwargs, call_kwargs, error, message", ERRORS)
def test_low_latency_errors(group1, buffer_kwargs, call_kwargs, error, message):
    x, idx, _ = _inputs()
    call_kwargs = {"x": x, "topk_idx": idx, **call_kwargs}
    buf = Buffer(dist.group.WORLD, **buffer_kwargs)
    try:
        with pytest.raises(error, match=message):
            buf.low_latency_dispatch(num_max_dispatch_tokens_per_rank=M, num_experts=E, **call_kwargs)
    finally:
        buf.destroy()


def test_combine_errors(group1):
    x, idx, w = _inputs()
    buf = Buffer(dist.group.WORLD, low_latency_mode=True)
    try:
        recv_x, _, handle, _, _ = buf.low_latency_dispatch(x, idx, M, E, use_fp8=False)
        with pytest.raises(ValueError, match=r"expected out of shape \[5, 512\] and dtype torch.bfloat16, got \[4, 512\]"):
            buf.low_latency_combine(recv_x, idx, w, handle, out=torch.empty(4, H).bfloat16())
        with pytest.raises(RuntimeError, match=r"deepep::low_latency_combine: expected x of shape \[num_local_experts, "
                                               r"num_ranks \* num_max_dispatch_tokens_per_rank, hidden\] = \[8, 6, hidden\], "
                                               r"got shape \[8, 5, 512\]"):
            buf.low_latency_combine(recv_x[:, :5], idx, w, handle)
        with pytest.raises(RuntimeError, match=r"expected topk_weights, got None"):
            buf.low_latency_combine(recv_x, idx, None, handle)
    finally:
        buf.destroy()


def test_device_side_validation_message(group1):
    """On accelerators the handshake is validated on the device: a failed check or a mismatch on any rank
    gives the fixed message (on CPU the rows are validated on the host, with the detailed one)."""
    from deep_ep_ops import _handshake, _registry

    ctx = _registry.get(group1)
    mine = _handshake.header(ctx, "low_latency_dispatch", 1, [M, E])
    mine[0, 3] = _handshake.STATUS_EXPERT_OUT_OF_RANGE
    with pytest.raises(RuntimeError, match=r"deepep::low_latency_dispatch: expected every rank to pass its input "
                                           r"checks, run the same op in the same order and agree on M"):
        _handshake.validate_on_device(mine, mine[0], "low_latency_dispatch", "M")
    mine[0, 3] = 0
    _handshake.validate_on_device(mine, mine[0], "low_latency_dispatch", "M")


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_static_shape_path_matches(portable, static_path, fmt):
    """The receive path of accelerators (every row, the ones that are not real sent to padding: static
    shapes for graph capture) gives the reference's valid rows too; CPU normally takes the compact path."""
    x, idx, w = _inputs()
    out = torch.ops.deepep.low_latency_dispatch(x, idx, M, E, portable, 1, 0, *FORMATS[fmt])
    use_fp8, round_scale, use_ue8m0, quant_mode = FORMATS[fmt]
    ref = reference.low_latency_dispatch([x], [idx], M, E, use_fp8=use_fp8, round_scale=round_scale,
                                         use_ue8m0=use_ue8m0, quant_mode=quant_mode)[0]
    assert torch.equal(out[2], ref.packed_recv_count) and torch.equal(out[4], ref.layout_range)
    for i, n in enumerate(ref.packed_recv_count.tolist()):
        assert torch.equal(out[0][i, :n].view(torch.uint8), ref.packed_recv_x[i, :n].view(torch.uint8))
        assert torch.equal(out[3][i, :n], ref.src_info[i, :n])
