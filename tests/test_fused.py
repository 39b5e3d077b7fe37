"""Tier 1: fused_deep_moe on a world-size-1 group: fake, weight helper, facade errors."""

import pytest
import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import FakeTensorMode

from deep_ep_ops import Buffer, FuseMode, make_fused_weights, quant

H, INTER, E, K, M = 256, 64, 4, 2, 4


def _inputs():
    g = torch.Generator().manual_seed(0)
    idx = torch.rand(3, E, generator=g).topk(K, dim=1).indices
    idx[1, 1] = -1
    w13 = torch.randn(E, 2 * INTER, H, generator=g) * 0.05
    w2 = torch.randn(E, H, INTER, generator=g) * 0.05
    return torch.randn(3, H, generator=g).bfloat16(), idx, torch.rand(3, K, generator=g), w13, w2


def test_make_fused_weights_layout():
    _, _, _, w13, w2 = _inputs()
    gmm1, s1, gmm2, s2 = make_fused_weights(w13, w2, 1)
    assert (gmm1.shape, gmm1.dtype, s1.shape, gmm2.shape, s2.shape) == ((E, H, 2 * INTER), torch.int8, (E, 2 * INTER),
                                                                      (E, INTER, H), (E, H))
    # Column j of gmm1 (output channel j: gate for j < I, up after) dequantizes back to row j of w13.
    assert torch.allclose(gmm1[1].float() * s1[1], w13[1].t(), atol=float(s1.max()) / 2 + 1e-7)
    assert torch.allclose(gmm2[2].float() * s2[2], w2[2].t(), atol=float(s2.max()) / 2 + 1e-7)
    gmm1, s1, _, _ = make_fused_weights(w13, w2, 0)
    assert gmm1.dtype == torch.bfloat16 and torch.equal(s1, torch.ones(E, 2 * INTER))


def test_fake_matches_kernel(group1):
    x, idx, w, w13, w2 = _inputs()
    args = (x, idx, w, *make_fused_weights(w13, w2, 1), M, E, group1, 1, 0)
    real = torch.ops.deepep.fused_deep_moe(*args)
    with FakeTensorMode() as mode:
        fake = torch.ops.deepep.fused_deep_moe(*[mode.from_tensor(a) if isinstance(a, torch.Tensor) else a
                                                 for a in args])
    for f, r in zip(fake, real):
        assert (f.shape, f.dtype) == (r.shape, r.dtype)
    assert real[1].tolist() == [int((idx == e).any(dim=1).sum()) for e in range(E)]  # one source rank


def _bad(weights, i, value):
    weights = list(weights)
    weights[i] = value
    return weights


ERRORS = [
    (lambda ws: _bad(ws, 0, ws[0].bfloat16()), {}, RuntimeError,
     r"deepep::fused_deep_moe: expected gmm1_permuted_weight of dtype torch.int8, got torch.bfloat16"),
    (lambda ws: _bad(ws, 0, ws[0][:3]), {}, RuntimeError,
     r"expected gmm1_permuted_weight of shape \[num_local_experts, hidden, 2 \* intermediate\] = \[4, 256, 2I\], "
     r"got shape \[3, 256, 128\]"),
    (lambda ws: _bad(ws, 2, ws[2][:, :32]), {}, RuntimeError,
     r"expected gmm2_weight of shape \[num_local_experts, intermediate, hidden\] = \[4, 64, 256\], got shape "
     r"\[4, 32, 256\]"),
    (lambda ws: _bad(ws, 1, ws[1].double()), {}, RuntimeError,
     r"expected gmm1_permuted_weight_scale of dtype torch.float32, got torch.float64"),
    (lambda ws: _bad(ws, 3, ws[3][:, :8]), {}, RuntimeError,
     r"expected gmm2_weight_scale of shape \[4, 256\], got shape \[4, 8\]"),
    (lambda ws: ws, {"quant_mode": 2}, RuntimeError, r"expected quant_mode 0 \(bf16 weights\) or 1 \(int8 W8A8\), got 2"),
    (lambda ws: ws, {"fuse_mode": 3}, ValueError,
     r"expected fuse_mode in \[FuseMode.FUSED_DEEP_MOE \(1\), FuseMode.DISPATCH_FFN_COMBINE \(2\)\], got 3"),
]


@pytest.mark.parametrize("mutate, kwargs, error, message", ERRORS)
def test_fused_errors(group1, mutate, kwargs, error, message):
    x, idx, w, w13, w2 = _inputs()
    buf = Buffer(dist.group.WORLD, low_latency_mode=True)
    try:
        with pytest.raises(error, match=message):
            buf.fused_deep_moe(x, idx, w, *mutate(make_fused_weights(w13, w2, 1)), M, E, **kwargs)
        out, count = buf.fused_deep_moe(x, idx, w, *make_fused_weights(w13, w2, 1), M, E,
                                        fuse_mode=FuseMode.DISPATCH_FFN_COMBINE)  # the group is still usable
        assert out.shape == (3, H) and count.shape == (E,)
    finally:
        buf.destroy()


def test_int8_path_uses_integer_gemm(group1, monkeypatch):
    """quant_mode=1 multiplies int8 by int8 with int32 accumulation (torch._int_mm)."""
    calls = []
    real = torch._int_mm
    monkeypatch.setattr(torch, "_int_mm", lambda a, b: calls.append((a.dtype, b.dtype)) or real(a, b))
    x, idx, w, w13, w2 = _inputs()
    torch.ops.deepep.fused_deep_moe(x, idx, w, *make_fused_weights(w13, w2, 1), M, E, group1, 1, 0)
    assert calls and set(calls) == {(torch.int8, torch.int8)}
    q, s = quant.per_token_int8(torch.randn(2, 8), eps=0.0)
    assert real(q, q.t().contiguous()).dtype == torch.int32
