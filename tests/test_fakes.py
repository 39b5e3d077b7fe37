"""Tier 1: fake kernels give the reference's shapes and dtypes under FakeTensorMode."""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import ShapeEnv

from deep_ep_ops import quant, reference
from _data import Case, make_inputs

CASE = Case(tokens=(10,), hidden=256, num_experts=8, num_topk=3, drop=0.2)


def _meta(t):
    return None if t is None else (t.dtype, tuple(t.shape))


def _fake_run(op, *args, **kwargs):
    with FakeTensorMode(shape_env=ShapeEnv()) as mode:
        conv = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else
                [mode.from_tensor(t) for t in a] if isinstance(a, list) else a for a in args]
        return op(*conv, **kwargs)


def _same_meta(fake, real, dynamic_dim0: bool):
    assert fake.dtype == real.dtype, (fake.dtype, real.dtype)
    assert fake.dim() == real.dim()
    for i, (f, r) in enumerate(zip(fake.shape, real.shape)):
        if dynamic_dim0 and i == 0:
            assert not isinstance(f, int), "the received-token count must be an unbacked size"
        else:
            assert int(f) == r, (tuple(fake.shape), tuple(real.shape))


def _inputs(group1):
    inp = make_inputs(CASE, 1)
    x, idx, w = inp["x"][0], inp["topk_idx"][0], inp["topk_weights"][0]
    layout = torch.ops.deepep.get_dispatch_layout(idx, CASE.num_experts, group1, 1, 1)
    return x, idx, w, layout


def test_layout_fake(group1):
    x, idx, w, layout = _inputs(group1)
    want = reference.get_dispatch_layout(idx, CASE.num_experts, 1)
    fake = _fake_run(torch.ops.deepep.get_dispatch_layout, idx, CASE.num_experts, group1, 1, 1)
    for f, r in zip(fake, want):
        _same_meta(f, r, dynamic_dim0=False)


@pytest.mark.parametrize("payload", ["bf16", "fp8", "int8"])
@pytest.mark.parametrize("worst", [0, 32])
def test_dispatch_fake(group1, payload, worst):
    x, idx, w, layout = _inputs(group1)
    scales = None
    if payload == "fp8":
        x, scales = quant.per_block_fp8(x.float())
    mode = "int8" if payload == "int8" else "none"
    args = (x, scales, idx, w, layout[3], layout[2], CASE.num_experts, group1, 1, 1, worst, mode)
    ref = reference.dispatch([x], [idx], [w], CASE.num_experts, x_scales=None if scales is None else [scales],
                             num_worst_tokens=worst, quant_mode=mode)[0]
    fake = _fake_run(torch.ops.deepep.dispatch, *args)
    want = [ref.recv_x, ref.recv_x_scales, ref.recv_topk_idx, ref.recv_topk_weights, ref.num_recv_tokens_per_expert,
            ref.rank_prefix_matrix, ref.channel_prefix_matrix, ref.recv_channel_prefix_matrix, ref.recv_src_idx,
            ref.send_head]
    for i, (f, r) in enumerate(zip(fake, want)):
        if r is None:  # plain payloads have no scales: the op returns an empty [n, 0] float32 tensor
            assert i == 1 and f.shape[1] == 0 and f.dtype == torch.float32
            continue
        _same_meta(f, r, dynamic_dim0=worst == 0 and i in (0, 1, 2, 3, 8))
    # The real kernel agrees with the fake on every output.
    real = torch.ops.deepep.dispatch(*args)
    for i, (f, r) in enumerate(zip(fake, real)):
        _same_meta(f, r, dynamic_dim0=worst == 0 and i in (0, 1, 2, 3, 8))


def test_cached_dispatch_and_combine_fakes(group1):
    x, idx, w, layout = _inputs(group1)
    out = torch.ops.deepep.dispatch(x, None, idx, w, layout[3], layout[2], CASE.num_experts, group1, 1)
    handle = [out[5], out[6], out[7], out[8], layout[3], out[9]]
    ref = reference.dispatch([x], [idx], [w], CASE.num_experts)
    want_cached = reference.cached_dispatch([x], ref, topk_weights=[w])[0]
    fake = _fake_run(torch.ops.deepep.dispatch.cached, x, None, w, handle, group1, 1)
    _same_meta(fake[0], want_cached[0], False)
    _same_meta(fake[2], want_cached[2], False)
    want = reference.combine([ref[0].recv_x], ref, topk_weights=[ref[0].recv_topk_weights])[0]
    fake = _fake_run(torch.ops.deepep.combine, out[0], handle, out[3], None, None, group1, 1)
    _same_meta(fake[0], want[0], False)
    _same_meta(fake[1], want[1], False)


def test_fake_runs_the_shared_checks(group1):
    x, idx, w, layout = _inputs(group1)
    with pytest.raises(RuntimeError, match=r"deepep::dispatch: expected topk_idx of dtype torch.int64, got torch.int32"):
        _fake_run(torch.ops.deepep.dispatch, x, None, idx.int(), w, layout[3], layout[2], 8, group1, 1)


def test_group_facts_are_checked_against_the_group(group1):
    """Group facts in the schema (for inductor's graph cache) must be the group's own: a graph compiled for
    another group size fails clearly instead of producing wrong shapes."""
    idx = torch.tensor([[0, 1]])
    with pytest.raises(RuntimeError, match=r"deepep::get_dispatch_layout: expected num_ranks = 1, as for group "
                                           r"'0', got 2 \(a graph compiled for another group\?"):
        torch.ops.deepep.get_dispatch_layout(idx, 8, group1, 2, 2)
    with pytest.raises(RuntimeError, match=r"expected num_ranks_per_node dividing num_ranks = 2, got 3"):
        _fake_run(torch.ops.deepep.get_dispatch_layout, idx, 8, group1, 2, 3)
    x = torch.randn(1, 128).bfloat16()
    with pytest.raises(RuntimeError, match=r"deepep::low_latency_dispatch: expected rank = 0, as for group '0', got 1"):
        torch.ops.deepep.low_latency_dispatch(x, idx, 4, 8, group1, 1, 1, False)
