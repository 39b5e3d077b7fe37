"""Tier 1: the wire formats against hand-computed values and their error bounds."""

import torch

from deep_ep_ops import quant


def test_int8_by_hand():
    q, s = quant.per_token_int8(torch.tensor([[127.0, -63.0, 10.0], [0.0, 0.0, 0.0]]))
    assert q.dtype == torch.int8 and s.dtype == torch.float32
    assert q.tolist() == [[127, -63, 10], [0, 0, 0]]
    assert s[0].item() == 1.0 and 0 < s[1].item() < 1e-13  # (0 + 1e-12) / 127
    q, s = quant.per_token_int8(torch.zeros(1, 4), eps=0.0)  # low-latency: scale = amax / 127
    assert q.tolist() == [[0, 0, 0, 0]] and s.tolist() == [0.0]


def test_int8_bound():
    x = torch.randn(64, 256)
    q, s = quant.per_token_int8(x)
    assert bool(((quant.dequant_int8(q, s) - x).abs() <= s[:, None] * 0.5 * (1 + 1e-5)).all())
    assert int(q.abs().max()) == 127


def test_fp8_by_hand():
    x = torch.zeros(1, 256)
    x[0, 0], x[0, 1] = 448.0, -224.0  # block 0: amax 448 -> scale 1
    x[0, 128] = 44.8  # block 1: amax 44.8 -> scale 0.1
    q, s = quant.per_block_fp8(x)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (1, 2)
    assert q.float()[0, :2].tolist() == [448.0, -224.0] and s[0, 0].item() == 1.0
    assert abs(s[0, 1].item() - 0.1) < 1e-8 and q.float()[0, 128].item() == 448.0
    _, s = quant.per_block_fp8(torch.zeros(1, 128))  # amax floored at 1e-4
    assert abs(s.item() - 1e-4 / 448) < 1e-12


def test_fp8_round_scale_and_ue8m0():
    x = torch.zeros(1, 512)
    for block, amax in enumerate((300.0, 500.0, 100.0, 1000.0)):  # amax/448 = 0.67, 1.12, 0.22, 2.23
        x[0, block * 128] = amax
    _, s = quant.per_block_fp8(x, round_scale=True)
    assert s.tolist() == [[1.0, 2.0, 0.25, 4.0]]  # next power of two up
    q, packed = quant.per_block_fp8(x, round_scale=True, use_ue8m0=True)
    assert packed.dtype == torch.int32 and packed.shape == (1, 1)
    exponents = [127, 128, 125, 129]  # biased exponents of 1, 2, 0.25, 4; byte k of the pack is block k
    assert packed.item() == sum(e << (8 * k) for k, e in enumerate(exponents)) - (1 << 32)
    assert quant.unpack_ue8m0(packed).tolist() == s.tolist()
    assert torch.equal(quant.dequant_fp8(q, packed), quant.dequant_fp8(q, s))


def test_fp8_bound():
    x = torch.randn(32, 1024) * 3
    q, s = quant.per_block_fp8(x)
    err = (quant.dequant_fp8(q, s) - x).abs()
    # e4m3 has 3 mantissa bits: relative rounding error <= 2^-4 of the value (normal range).
    assert bool((err <= x.abs() * 2 ** -4 + s.repeat_interleave(128, dim=1) * 2 ** -9).all())


def test_quantization_leaves_its_input_alone():
    x = torch.randn(4, 256)
    before = x.clone()
    quant.per_token_int8(x)
    quant.per_block_fp8(x)
    assert torch.equal(x, before)
