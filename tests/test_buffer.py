"""Tier 1: the Buffer facade (DeepEP's API surface) and its error messages, on a world-size-1 group."""

import pytest
import torch
import torch.distributed as dist

import deep_ep_ops
from deep_ep_ops import Buffer, Config, EventOverlap, config, low_latency
from deep_ep_ops.transports.all_to_all import AllToAllTransport
from meta_kernels import checks


@pytest.fixture
def buf(group1):
    b = Buffer(dist.group.WORLD, timeout_s=10)
    yield b
    b.destroy()


def _layout(buf, idx, num_experts=8):
    per_rank, per_node, per_expert, in_rank, _ = buf.get_dispatch_layout(idx, num_experts)
    return dict(num_tokens_per_rank=per_rank, num_tokens_per_rdma_rank=per_node, num_tokens_per_expert=per_expert,
                is_token_in_rank=in_rank)


def test_roundtrip_and_return_shapes(buf):
    x = torch.randn(5, 16, dtype=torch.bfloat16)
    idx = torch.tensor([[0, 1], [2, -1], [-1, -1], [7, 3], [1, 0]])
    w = torch.rand(5, 2)
    lay = _layout(buf, idx)
    assert lay["num_tokens_per_rdma_rank"] is None  # one node
    recv_x, recv_idx, recv_w, counts, handle, event = buf.dispatch(x, topk_idx=idx, topk_weights=w, **lay)
    assert isinstance(counts, list) and counts == [2, 2, 1, 1, 0, 0, 0, 1]
    assert len(handle) == 6 and isinstance(event, EventOverlap)
    assert recv_x.shape == (4, 16)  # token 2 selects nothing
    combined, combined_w, _ = buf.combine(recv_x, handle, recv_w)
    assert torch.equal(combined[[0, 1, 3, 4]], x[[0, 1, 3, 4]]) and combined[2].abs().sum() == 0
    assert torch.equal(combined_w, torch.where(idx >= 0, w, 0.0))
    # topk_weights=None gives recv_topk_weights=None; cached dispatch returns DeepEP's 6-tuple of Nones.
    assert buf.dispatch(x, topk_idx=idx, **lay)[2] is None
    cached = buf.dispatch(x, handle=handle)
    assert torch.equal(cached[0], recv_x) and cached[1:5] == (None, None, None, None)
    with buf.dispatch(x, topk_idx=idx, async_finish=True, **lay)[5] as ev:  # EventOverlap is a context manager
        assert ev.event is not None


def test_int8_env_and_quant_mode(group1, monkeypatch):
    monkeypatch.setenv("DEEP_NORMAL_MODE_USE_INT8_QUANT", "1")
    b = Buffer(dist.group.WORLD)
    try:
        idx = torch.tensor([[0], [3]])
        lay = _layout(b, idx)
        x = torch.randn(2, 8)
        data, scales = b.dispatch(x, topk_idx=idx, **lay)[0]
        assert data.dtype == torch.int8 and scales.shape == (2,)
        assert b.dispatch(x, topk_idx=idx, quant_mode="bf16", **lay)[0].dtype == torch.float32  # explicit wins
    finally:
        b.destroy()


def test_static_helpers():
    assert Buffer.get_dispatch_config(8).num_max_nvl_chunked_send_tokens == 6
    assert Buffer.get_combine_config(8).num_max_nvl_chunked_send_tokens == 4
    for n in (1, 3, 12, 256, 1000):  # any rank count works (next larger table entry)
        assert isinstance(Buffer.get_dispatch_config(n), Config) and isinstance(Buffer.get_combine_config(n), Config)
    # DeepEP's LL sizing: T=128, hidden 7168, 288 experts needs 2,146,961,792 bytes.
    assert deep_ep_ops.tuning.low_latency_rdma_size_hint(128, 7168, 8, 288) == 2_146_961_792
    # DeepEP docs: ~336 MB for 20 SMs, 256 slots, hidden 7168 BF16, EP8.
    assert Config(20, 6, 256).get_nvl_buffer_size_hint(7168 * 2, 8) == 335_709_824
    assert Config().get_rdma_buffer_size_hint(7168 * 2, 8) == 0 and Config().get_rdma_buffer_size_hint(7168 * 2, 16) > 0
    old = Buffer.num_sms
    Buffer.set_num_sms(24)
    assert Buffer.get_dispatch_config(2).num_sms == 24
    Buffer.set_num_sms(old)
    with pytest.raises(ValueError, match="expected a positive even num_sms, got 3"):
        Buffer.set_num_sms(3)


def test_attributes_and_destroy(group1):
    b = Buffer(dist.group.WORLD, num_nvl_bytes=1 << 20, num_rdma_bytes=0)
    assert b.group is dist.group.WORLD and b.num_nvl_bytes == 1 << 20 and b.num_rdma_bytes == 0
    assert b.transport == "shm" and b.rank == 0 and b.group_size == 1  # one host: shared memory
    b.destroy()
    with pytest.raises(RuntimeError, match=r"deepep::dispatch: expected a live Buffer, got one after destroy\(\)"):
        b.dispatch(torch.zeros(1, 4), handle=[torch.zeros(1)] * 6)


NAMES = r"\['all_to_all', 'alltoall', 'auto', 'default', 'hierarchical', 'internode', 'ops', 'shared_memory', 'shm'\]"


def test_transport_names(group1, monkeypatch):
    """Names, aliases, DEEP_USE_MODE values and the errors all come from the backend registry."""
    from deep_ep_ops import transports

    assert transports.names() == ["all_to_all", "alltoall", "auto", "default", "hierarchical", "internode", "ops",
                                  "shared_memory", "shm"]
    with pytest.raises(ValueError, match="transport 'hierarchical' cannot serve this group: the group is on one node"):
        Buffer(dist.group.WORLD, transport="hierarchical")
    with pytest.raises(ValueError, match=rf"expected a transport in {NAMES}, got 'nvlink'"):
        Buffer(dist.group.WORLD, transport="nvlink")
    with pytest.raises(ValueError, match="transport 'ops' cannot serve this group: it needs torch_npu"):
        Buffer(dist.group.WORLD, low_latency_strategy="ops")
    monkeypatch.setenv("DEEP_USE_MODE", "fast")
    with pytest.raises(ValueError, match=rf"expected DEEP_USE_MODE in {NAMES}, got 'fast'"):
        Buffer(dist.group.WORLD)
    for mode, name in (("alltoall", "all_to_all"), ("all_to_all", "all_to_all"), ("DEFAULT", "shm"),
                       ("shared_memory", "shm")):
        monkeypatch.setenv("DEEP_USE_MODE", mode)
        b = Buffer(dist.group.WORLD)
        assert b.transport == name
        b.destroy()


def test_second_buffer_on_a_group(group1):
    """Buffers on one group share its context; one asking for other settings than it holds is refused, not
    silently given the first one's."""
    first = Buffer(dist.group.WORLD, transport="all_to_all", kernels="python", num_rdma_bytes=1 << 22)
    try:
        same = Buffer(dist.group.WORLD, kernels="python", num_rdma_bytes=1 << 20)
        assert same.kernels == "python" and same.transport == "all_to_all"
        same.destroy()
        for kwargs, message in (
            ({"transport": "shm"}, "expected one transport per process group, got 'shm'"),
            ({"kernels": "python", "timeout_s": 3.0}, "expected one timeout_s per process group, got 3.0"),
            ({"num_ranks_per_node": 2}, "expected one num_ranks_per_node per process group, got 2"),
            ({"num_rdma_bytes": 1 << 23}, r"expected num_rdma_bytes <= 4194304 \(the size another Buffer"),
        ):
            with pytest.raises(ValueError, match=message):
                Buffer(dist.group.WORLD, **kwargs)
        from deep_ep_ops import compute
        if compute.native_loaded():
            with pytest.raises(ValueError, match="expected one kernels per process group, got 'native'"):
                Buffer(dist.group.WORLD, kernels="native")
    finally:
        first.destroy()


def test_env_validation():
    with pytest.raises(ValueError, match=r"expected MOE_EXPERT_TOKEN_NUMS_TYPE in \[0, 1\], got 2"):
        config.read_env({"MOE_EXPERT_TOKEN_NUMS_TYPE": "2"})
    with pytest.raises(ValueError, match="expected DEEP_EP_OPS_TIMEOUT_S to be a number of seconds, got 'soon'"):
        config.read_env({"DEEP_EP_OPS_TIMEOUT_S": "soon"})
    env = config.read_env({"MOE_SHARED_EXPERT_RANK_NUM": "2", "DEEP_USE_MODE": "ALLTOALL"})
    assert env.num_shared_expert_ranks == 2 and env.use_mode == "all_to_all" and env.timeout_s == 100.0


ERRORS = [
    (lambda b, x, i, w, lay: b.dispatch(x, topk_idx=i.int(), topk_weights=w, **lay),
     r"deepep::dispatch: expected topk_idx of dtype torch.int64, got torch.int32"),
    (lambda b, x, i, w, lay: b.dispatch(x, topk_idx=i, topk_weights=w.double(), **lay),
     r"deepep::dispatch: expected topk_weights of dtype torch.float32, got torch.float64"),
    (lambda b, x, i, w, lay: b.dispatch(x[:3], topk_idx=i, topk_weights=w, **lay),
     r"deepep::dispatch: expected topk_idx with 3 rows like x, got shape \[4, 2\]"),
    (lambda b, x, i, w, lay: b.dispatch(x, topk_idx=i[:, :1], topk_weights=w, **lay),
     r"expected topk_weights of shape \[num_tokens, num_topk\] = \[4, 1\] like topk_idx, got shape \[4, 2\]"),
    (lambda b, x, i, w, lay: b.dispatch(x, topk_idx=torch.tensor([[0, 1], [9, -1], [2, 3], [4, 5]]), topk_weights=w, **lay),
     r"deepep::dispatch: expected topk_idx values in \[-1, 8\), got 9 at token 1, slot 0 \(on rank 0\)"),
    (lambda b, x, i, w, lay: b.dispatch(x, topk_idx=torch.tensor([[0, 1], [-2, -1], [2, 3], [4, 5]]), topk_weights=w, **lay),
     r"expected topk_idx values in \[-1, 8\), got -2 at token 1, slot 0"),
    (lambda b, x, i, w, lay: b.dispatch(x, topk_idx=i, topk_weights=w, **{**lay, "is_token_in_rank": ~lay["is_token_in_rank"]}),
     r"expected is_token_in_rank to match topk_idx \(compute both with get_dispatch_layout on the same topk_idx\), "
     r"got is_token_in_rank\[0, 0\] = False"),
    (lambda b, x, i, w, lay: b.dispatch(x, topk_idx=i, topk_weights=w, quant_mode="fp4", **lay),
     r"deepep::dispatch: expected quant_mode in \[None, 'none', 'bf16', 'int8'\], got 'fp4'"),
    (lambda b, x, i, w, lay: b.dispatch((x, torch.ones(4, 1)), topk_idx=i, topk_weights=w, **lay),
     r"expected a 1-byte x \(e.g. float8_e4m3fn\) with x_scales, got torch.bfloat16"),
    (lambda b, x, i, w, lay: b.dispatch(x, topk_idx=i, **{**lay, "num_tokens_per_expert": None}),
     r"expected is_token_in_rank and num_tokens_per_expert \(from get_dispatch_layout\) or a handle, got None"),
    (lambda b, x, i, w, lay: b.dispatch(x, topk_idx=i, expert_alignment=0, **lay), r"expected expert_alignment >= 1, got 0"),
    (lambda b, x, i, w, lay: b.dispatch(x, topk_idx=i, num_worst_tokens=2, **lay),
     r"expected at most num_worst_tokens=2 tokens received per rank, got 4 on rank 0"),
    (lambda b, x, i, w, lay: b.get_dispatch_layout(torch.tensor([[0, 8]]), 8),
     r"deepep::get_dispatch_layout: expected topk_idx values in \[-1, 8\), got 8 at token 0, slot 1"),
    (lambda b, x, i, w, lay: b.get_dispatch_layout(i, 0), r"expected num_experts > 0, got 0"),
]


@pytest.mark.parametrize("call, message", ERRORS)
def test_dispatch_errors(buf, call, message):
    x = torch.randn(4, 16, dtype=torch.bfloat16)
    idx = torch.tensor([[0, 1], [2, -1], [2, 3], [4, 5]])
    lay = _layout(buf, idx)
    with pytest.raises((RuntimeError, ValueError), match=message):
        call(buf, x, idx, torch.rand(4, 2), lay)
    buf.dispatch(x, topk_idx=idx, **lay)  # the group is still usable afterwards


def test_handle_errors(buf):
    idx = torch.tensor([[0, 1], [2, -1], [2, 3]])
    x = torch.randn(3, 16)
    lay = _layout(buf, idx)
    recv_x, _, _, _, handle, _ = buf.dispatch(x, topk_idx=idx, **lay)
    with pytest.raises(RuntimeError, match=r"deepep::combine: expected x with 3 rows, as many as the dispatch received, "
                                           r"got shape \[2, 16\] \(a handle from another dispatch\?\)"):
        buf.combine(recv_x[:2], handle)
    with pytest.raises(RuntimeError, match=r"deepep::dispatch: expected x with 3 rows, the token count of the handle's "
                                           r"dispatch, got shape \[5, 16\]"):
        buf.dispatch(torch.randn(5, 16), handle=handle)
    with pytest.raises(RuntimeError, match=r"expected a dispatch handle of 6 tensors, got 5 tensors"):
        buf.combine(recv_x, handle[:5])
    bad = (torch.zeros(2, 2, dtype=torch.int32),) + handle[1:]
    with pytest.raises(RuntimeError, match=r"expected handle\[0\] \(rank_prefix_matrix\) of shape \[1, 1\] for this group, "
                                           r"got shape \[2, 2\] \(was the handle made on another group\?\)"):
        buf.combine(recv_x, bad)
    stale = (handle[0] + 1,) + handle[1:]
    with pytest.raises(RuntimeError, match=r"deepep::combine: expected a handle whose rank_prefix_matrix fits the 3 "
                                           r"received rows, got one claiming 4 \(a stale handle\?\) \(on rank 0\)"):
        buf.combine(recv_x, stale)
    other = _layout(buf, torch.tensor([[0, 1], [-1, -1], [2, 3]]))["is_token_in_rank"]
    mixed = handle[:4] + (other, handle[5])
    with pytest.raises(RuntimeError, match=r"deepep::combine: expected rank 0 to receive as many rows as rank 0 sends "
                                           r"it, got 3 sent and 2 expected \(a stale handle, or handles of different "
                                           r"dispatches\?\)"):
        buf.combine(recv_x, mixed)
    with pytest.raises(ValueError, match=r"expected at most 2 bias tensors, got 3"):
        buf.combine(recv_x, handle, bias=(x, x, x))
    with pytest.raises(ValueError, match=r"expected topk_idx=None with a handle"):
        buf.dispatch(x, handle=handle, topk_idx=idx)


def test_divisibility_check():
    """E % R != 0 (here on a 3-rank group) is caught by the shared checks."""
    with pytest.raises(RuntimeError, match=r"deepep::dispatch: expected num_experts divisible by the 3 ranks that "
                                           r"host routed experts, got 8"):
        checks.check_num_experts("dispatch", 8, 3)


def test_errors_in_compiled_mode(buf):
    """The same checks fire while tracing under torch.compile(fullgraph=True)."""
    idx = torch.tensor([[0, 1], [2, -1]])
    lay = _layout(buf, idx)

    def step(x, topk_idx):
        return buf.dispatch(x, topk_idx=topk_idx, **lay)[0]

    torch._dynamo.reset()
    with pytest.raises(Exception, match=r"deepep::dispatch: expected topk_idx of dtype torch.int64, got torch.int32"):
        torch.compile(step, fullgraph=True, backend="eager")(torch.randn(2, 8), idx.int())


class RecordingTransport(AllToAllTransport):
    """A backend with a whole-op override (the level an Ascend backend uses for its vendor ops): it runs
    low-latency dispatch itself, here by recording the call and running the shared kernel."""

    name = "recording"
    calls: list = []

    def override(self, op):
        if op != "low_latency_dispatch":
            return None
        return lambda *args, **kwargs: self.calls.append(op) or low_latency.low_latency_dispatch(*args, **kwargs)


def test_whole_op_override(group1, monkeypatch):
    from deep_ep_ops import transports

    monkeypatch.setitem(transports.BACKENDS, "recording", transports.Entry("test_buffer:RecordingTransport"))
    b = Buffer(dist.group.WORLD, low_latency_mode=True, transport="recording")
    try:
        assert b.transport == "recording"
        x, idx = torch.randn(2, 128).bfloat16(), torch.tensor([[0, 1], [1, -1]])
        recv_x, count, handle, _, _ = b.low_latency_dispatch(x, idx, 4, 8, use_fp8=False)
        assert RecordingTransport.calls == ["low_latency_dispatch"] and count.tolist()[:2] == [1, 2]
        combined, _, _ = b.low_latency_combine(recv_x, idx, torch.ones(2, 2), handle)
        assert RecordingTransport.calls == ["low_latency_dispatch"]  # combine is not overridden
        assert torch.equal(combined, x * torch.tensor([[2.0], [1.0]]).bfloat16())
    finally:
        b.destroy()
