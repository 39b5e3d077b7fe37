"""Tier-2 low-latency cases, run inside every rank of a :class:`RankPool`, through the Buffer facade.

Every valid row (data and scales), count, ``src_info`` and ``layout_range`` entry is compared exactly
with the reference; padding rows are unspecified and not compared. Combine runs on the dequantized rows
(identity experts) and is compared with the reference exactly. The dequantization error bound is
checked separately: INT8 ``|x - q*s| <= s/2`` (round to nearest) and FP8 e4m3 ``<= 2^-4 |x|`` (3 mantissa
bits, round to nearest) plus one subnormal step ``2^-9 * scale`` below the normal range.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist

from _data import odd_empty
from cases_normal import assert_same, env
from deep_ep_ops import Buffer, quant, reference


@dataclasses.dataclass(frozen=True)
class LLCase:
    tokens: tuple[int, ...] = (6,)  # per rank, cycled
    m: int = 8  # num_max_dispatch_tokens_per_rank
    hidden: int = 256
    num_experts: int = 8
    num_topk: int = 3
    fmt: str = "bf16"  # bf16 | fp8 | fp8_round | ue8m0 | int8
    drop: float = 0.0
    routing: str = "random"  # random | one_expert | duplicates
    shared: int = 0  # MOE_SHARED_EXPERT_RANK_NUM
    seed: int = 0
    x_dtype: str = "bfloat16"
    odd_empty: bool = False  # empty inputs get all-zero strides (see _data.odd_empty)

    def __str__(self):
        t = "x".join(map(str, self.tokens))
        return f"N{t}-M{self.m}-H{self.hidden}-E{self.num_experts}-K{self.num_topk}-{self.fmt}-S{self.shared}-{self.routing}"


def make_inputs(case: LLCase, world: int):
    g = torch.Generator().manual_seed(case.seed)
    xs, idx, w = [], [], []
    for r in range(world):
        n = case.tokens[r % len(case.tokens)]
        xs.append(torch.randn(n, case.hidden, generator=g).to(getattr(torch, case.x_dtype)))
        if case.routing == "one_expert":
            i = torch.full((n, case.num_topk), -1, dtype=torch.int64)
            i[:, 0] = case.num_experts - 1
        else:
            i = torch.rand(n, case.num_experts, generator=g).topk(case.num_topk, dim=1).indices
            if case.routing == "duplicates" and n:
                i[:, -1] = i[:, 0]  # a token selecting the same expert twice
            if case.drop:
                i = i.masked_fill(torch.rand(n, case.num_topk, generator=g) < case.drop, -1)
        idx.append(i)
        w.append(torch.rand(n, case.num_topk, generator=g))
    if case.odd_empty:
        xs, idx, w = ([odd_empty(t) for t in ts] for ts in (xs, idx, w))
    return xs, idx, w


def wire_kwargs(fmt: str) -> dict:
    return {"bf16": dict(use_fp8=False), "fp8": dict(use_fp8=True), "fp8_round": dict(use_fp8=True, round_scale=True),
            "ue8m0": dict(use_fp8=True, round_scale=True, use_ue8m0=True),
            "int8": dict(use_fp8=False, quant_mode="int8")}[fmt]


def dequant(data, scales) -> torch.Tensor:
    if data.dtype == torch.int8:
        return quant.dequant_int8(data, scales)
    if data.dtype == torch.float8_e4m3fn:
        return quant.dequant_fp8(data, scales)
    return data.float()


def _valid_rows(t, counts):
    return [t[i, :int(c)] for i, c in enumerate(counts)]


def dispatch_combine(rank: int, world: int, case: LLCase, opts: dict) -> list[int]:
    xs, idx, w = make_inputs(case, world)
    kw = wire_kwargs(case.fmt)
    nums_type = opts.get("token_nums_type", 1)
    with env(MOE_SHARED_EXPERT_RANK_NUM=str(case.shared), MOE_EXPERT_TOKEN_NUMS_TYPE=str(nums_type)):
        # DeepEP's size hint assumes bf16 tokens; an fp32 x on the bf16 wire moves rows twice as wide.
        hint = Buffer.get_low_latency_rdma_size_hint(case.m, case.hidden, world, case.num_experts)
        buf = Buffer(dist.group.WORLD, low_latency_mode=True, timeout_s=60,
                     num_rdma_bytes=hint * getattr(torch, case.x_dtype).itemsize // 2)
    try:
        native = _whole_op(buf)
        for attempt in range(2):  # the first call of a configuration runs the portable kernel, the second may not
            before = None if native is None else native.native_calls
            valid = _dispatch_combine_once(rank, world, case, opts, buf, xs, idx, w, kw, nums_type)
            if native is not None and attempt == 1:
                assert native.native_calls >= before + 2, "expected the whole-op native path on the second call"
        return valid.tolist()
    finally:
        buf.destroy()


def _whole_op(buf):
    """The shm backend's whole-op low-latency path of ``buf``'s group when it applies (native kernels)."""
    from deep_ep_ops import _registry

    ctx = _registry.get(buf.group_name)
    fast = getattr(ctx.transport, "_low_latency", None)
    return fast if fast is not None and ctx.kernels.name == "native" else None


def _dispatch_combine_once(rank, world, case, opts, buf, xs, idx, w, kw, nums_type):
    """One dispatch and combine through ``buf``, compared with the reference; returns the valid rows per expert."""
    ref_kw = dict(use_fp8=kw.get("use_fp8", True), round_scale=kw.get("round_scale", False),
                  use_ue8m0=kw.get("use_ue8m0", False), quant_mode=kw.get("quant_mode", "none"),
                  num_shared_expert_ranks=case.shared, expert_token_nums_type=nums_type)
    refs = reference.low_latency_dispatch(xs, idx, case.m, case.num_experts, **ref_kw)
    ref = refs[rank]
    stats = torch.zeros(ref.packed_recv_count.shape[0], dtype=torch.int32) if opts.get("stats") else None
    hook_mode = opts.get("hook", False)
    recv_x, count, handle, event, hook = buf.low_latency_dispatch(
        xs[rank], idx[rank], case.m, case.num_experts, cumulative_local_expert_recv_stats=stats,
        return_recv_hook=hook_mode, **kw)
    assert (hook is not None) == hook_mode
    if hook_mode:
        hook()
    data, scales = recv_x if isinstance(recv_x, tuple) else (recv_x, None)
    assert data.shape == ref.packed_recv_x.shape and data.dtype == ref.packed_recv_x.dtype
    assert_same("packed_recv_count", count, ref.packed_recv_count)
    assert_same("layout_range", handle[1], ref.layout_range)
    assert handle[2:] == (case.m, case.hidden, case.num_experts)
    valid = (ref.layout_range & 0xFFFFFFFF).sum(dim=1)
    assert_same("valid rows", _valid_rows(data, valid), _valid_rows(ref.packed_recv_x, valid))
    assert_same("src_info", _valid_rows(handle[0], valid), _valid_rows(ref.src_info, valid))
    if scales is not None:
        assert scales.shape == ref.packed_recv_x_scales.shape
        assert_same("scales", _valid_rows(scales, valid), _valid_rows(ref.packed_recv_x_scales, valid))
        _check_quant_bound(case, rank, world, data, scales, handle, valid)
    if stats is not None:
        buf.low_latency_dispatch(xs[rank], idx[rank], case.m, case.num_experts,
                                 cumulative_local_expert_recv_stats=stats, **kw)
        assert_same("cumulative stats", stats, (2 * valid).to(torch.int32))

    # Combine: identity experts on the dequantized rows (bf16), exact against the reference.
    y = dequant(data, scales).bfloat16()
    ys = [dequant(d.packed_recv_x, d.packed_recv_x_scales).bfloat16() for d in refs]
    want = reference.low_latency_combine(ys, idx, w, refs, case.num_experts, case.shared)[rank]
    out = torch.empty_like(want) if opts.get("out") else None
    combined, _, hook = buf.low_latency_combine(y, idx[rank], w[rank], handle, out=out, return_recv_hook=hook_mode)
    if hook_mode:
        hook()
    assert out is None or combined is out
    assert_same("combined_x", combined, want)
    return valid


def _check_quant_bound(case, rank, world, data, scales, handle, valid) -> None:
    """Dequantized rows against the original bf16 tokens they came from."""
    xs, _, _ = make_inputs(case, world)
    src_info, layout_range = handle[0], handle[1]
    for i in range(data.shape[0]):
        for s in range(world):
            begin, n = int(layout_range[i, s]) >> 32, int(layout_range[i, s]) & 0xFFFFFFFF
            orig = xs[s][src_info[i, begin:begin + n].long()].float()
            got = dequant(data[i, begin:begin + n], scales[i, begin:begin + n])
            err = (got - orig).abs()
            if data.dtype == torch.int8:
                bound = 0.5 * scales[i, begin:begin + n].unsqueeze(1) * (1 + 1e-5)
            else:
                s_full = quant.unpack_ue8m0(scales[i, begin:begin + n]) if scales.dtype == torch.int32 else \
                    scales[i, begin:begin + n]
                bound = orig.abs() * 2 ** -4 + s_full.repeat_interleave(128, dim=1) * 2 ** -9
            assert bool((err <= bound).all()), f"{case.fmt} dequantization error {float(err.max())} over its bound"


def bad_input(rank: int, world: int, kind: str) -> str:
    """One rank's bad low-latency input: every rank must raise instead of hanging."""
    xs, idx, w = make_inputs(LLCase(tokens=(4,), m=4), world)
    x, i = xs[rank], idx[rank]
    m = 4
    if kind == "n_over_m" and rank == 1:
        x, i = torch.randn(6, 256).bfloat16(), torch.zeros(6, 3, dtype=torch.int64)
    if kind == "expert_id" and rank == 1:
        i = i.clone()
        i[0, 0] = 99
    buf = Buffer(dist.group.WORLD, low_latency_mode=True, timeout_s=30)
    try:
        buf.low_latency_dispatch(x, i, m, 8, use_fp8=False)
    except RuntimeError as exc:
        return str(exc)
    finally:
        buf.destroy()
    return "no error"


def decode_loop(rank: int, world: int, backend: str, fmt: str, hook: bool, steps: int = 10) -> dict:
    """gate → LL dispatch → SwiGLU experts on the packed [L, R*M, H] layout → LL combine, written against
    the Buffer and compiled with fullgraph=True; ``steps`` steps of new routing must reuse one graph."""
    from cases_compile import _close, _counting

    m, hidden, inter, num_experts, topk = 8, 256, 64, 8, 2
    local = num_experts // world
    g = torch.Generator().manual_seed(0)
    gate = torch.randn(hidden, num_experts, generator=g) * hidden ** -0.5
    w1 = (torch.randn(num_experts, hidden, 2 * inter, generator=g) * hidden ** -0.5)[rank * local:(rank + 1) * local]
    w2 = (torch.randn(num_experts, inter, hidden, generator=g) * inter ** -0.5)[rank * local:(rank + 1) * local]
    buf = Buffer(dist.group.WORLD, low_latency_mode=True, timeout_s=120)
    kw = wire_kwargs(fmt)

    def step(x):
        weights, idx = (x.float() @ gate).softmax(dim=-1).topk(topk, dim=-1)
        recv_x, count, handle, _, recv_hook = buf.low_latency_dispatch(x, idx, m, num_experts,
                                                                       return_recv_hook=hook, **kw)
        if hook:
            recv_hook()
        packed = dequant(*recv_x) if isinstance(recv_x, tuple) else recv_x.float()
        gate_h, up = torch.bmm(packed, w1).chunk(2, dim=-1)
        y = torch.bmm(torch.nn.functional.silu(gate_h) * up, w2).to(torch.bfloat16)
        out, _, combine_hook = buf.low_latency_combine(y, idx, weights, handle, return_recv_hook=hook)
        if hook:
            combine_hook()
        return out

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compile_fn, calls = _counting(backend)
    with torch._dynamo.config.patch(capture_scalar_outputs=False):
        compiled = torch.compile(step, fullgraph=True, backend=compile_fn)
        try:
            for s in range(steps):
                x = torch.randn(6, hidden, generator=torch.Generator().manual_seed(100 * s + rank)).bfloat16()
                _close(f"step {s}", compiled(x).float(), step(x).float(), tol=2e-2)
        finally:
            buf.destroy()
    return {"compiles": len(calls), "graph_breaks": sum(torch._dynamo.utils.counters["graph_break"].values())}
