"""Tier-2 cases for the normal-mode ops, run inside every rank of a :class:`RankPool`.

Each rank builds all ranks' inputs, runs the reference for the whole group and checks its own slice:
exact equality for everything that is a permutation or a count, and a stated bound where INT8
quantization happens.
"""

from __future__ import annotations

import contextlib
import os

import torch
import torch.distributed as dist

from deep_ep_ops import Buffer, quant, reference
from deep_ep_ops.transports import _shm_normal
from _data import Case, make_inputs, odd_empty


@contextlib.contextmanager
def env(**values: str):
    """Sets environment variables for a block (Buffer snapshots them at construction)."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def assert_same(name: str, got, want) -> None:
    """Exact equality of dtype, shape and bits (``None`` only equals ``None``)."""
    if isinstance(want, (tuple, list)) and not isinstance(want, torch.Size):
        assert isinstance(got, (tuple, list)) and len(got) == len(want), f"{name}: got {type(got)}"
        for i, (g, w) in enumerate(zip(got, want)):
            assert_same(f"{name}[{i}]", g, w)
        return
    if want is None or got is None:
        assert got is None and want is None, f"{name}: got {got!r}, want {want!r}"
        return
    assert got.dtype == want.dtype, f"{name}: dtype {got.dtype} != {want.dtype}"
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    if got.element_size() == 1:
        got, want = got.view(torch.uint8), want.view(torch.uint8)
    assert torch.equal(got, want), f"{name}: values differ\n got {got}\nwant {want}"


def _to_float(recv_x, dtype=torch.bfloat16) -> torch.Tensor:
    """Dequantizes a received FP8/INT8 tuple (or passes a tensor through) for combine."""
    if not isinstance(recv_x, tuple):
        return recv_x
    data, scales = recv_x
    if data.dtype == torch.int8:
        return quant.dequant_int8(data, scales).to(dtype)
    return quant.dequant_fp8(data, scales.contiguous()).to(dtype)


def _whole_op(buf):
    """The shm backend's whole-op dispatch of ``buf``'s group when it applies (native kernels)."""
    from deep_ep_ops import _registry

    ctx = _registry.get(buf.group_name)
    native = getattr(ctx.transport, "_normal", None)
    return native if native is not None and ctx.kernels.name == "native" else None


def dispatch_combine(rank: int, world: int, case: Case, opts: dict) -> int:
    """Layout, dispatch, cached dispatch and combine against the reference; returns rows received."""
    inp = make_inputs(case, world)
    if opts.get("odd_empty_strides"):
        inp = {k: [odd_empty(t) for t in v] for k, v in inp.items()}
    num_experts = case.num_experts
    with_topk, with_weights = opts.get("topk", True), opts.get("weights", True)
    alignment, worst = opts.get("expert_alignment", 1), opts.get("num_worst_tokens", 0)
    quant_mode, nums_type = opts.get("quant_mode"), opts.get("token_nums_type", 1)
    per_node_ranks = opts.get("num_ranks_per_node")
    with env(MOE_EXPERT_TOKEN_NUMS_TYPE=str(nums_type)):
        buf = Buffer(dist.group.WORLD, timeout_s=60, num_ranks_per_node=per_node_ranks)
    try:
        layouts = [reference.get_dispatch_layout(i, num_experts, world, per_node_ranks) for i in inp["topk_idx"]]
        per_rank, per_node, per_expert, in_rank, _ = buf.get_dispatch_layout(inp["topk_idx"][rank], num_experts)
        if per_node_ranks in (None, world):
            assert per_node is None  # one node: DeepEP's None
        else:
            assert_same("num_tokens_per_rdma_rank", per_node, layouts[rank][1])
        for name, got, want in zip(("num_tokens_per_rank", "num_tokens_per_expert", "is_token_in_rank"),
                                   (per_rank, per_expert, in_rank), (layouts[rank][0], layouts[rank][2], layouts[rank][3])):
            assert_same(name, got, want)

        fp8 = case.dtype == "fp8"
        x = (inp["x"][rank], inp["x_scales"][rank]) if fp8 else inp["x"][rank]
        idx = inp["topk_idx"][rank] if with_topk else None
        w = inp["topk_weights"][rank] if with_topk and with_weights else None
        native = _whole_op(buf)
        for attempt in range(3):  # portable (the first call), whole-op native, native handshake + portable rows
            if native is not None:
                before = (native.native_calls, native.ring_rows)
                native.small_bytes = -1 if attempt == 2 else _shm_normal.SMALL_BYTES
            recv_x, recv_idx, recv_w, counts, handle, event = buf.dispatch(
                x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
                topk_idx=idx, topk_weights=w, expert_alignment=alignment, num_worst_tokens=worst, quant_mode=quant_mode)
            event.current_stream_wait()
            refs = reference.dispatch(
                inp["x"], inp["topk_idx"] if with_topk else None,
                inp["topk_weights"] if with_topk and with_weights else None, num_experts,
                x_scales=inp["x_scales"] if fp8 else None, is_token_in_rank=[lay[3] for lay in layouts],
                num_tokens_per_expert=[lay[2] for lay in layouts], expert_alignment=alignment, num_worst_tokens=worst,
                quant_mode="int8" if quant_mode == "int8" else "none", expert_token_nums_type=nums_type)
            ref = refs[rank]
            if fp8 or quant_mode == "int8":
                assert_same("recv_x", recv_x, (ref.recv_x, ref.recv_x_scales))
            else:
                assert_same("recv_x", recv_x, ref.recv_x)
            if quant_mode == "int8":
                # INT8 bound: |x - q*s| <= s/2 per element (round to nearest), plus fp32 rounding of x/s.
                plain = reference.dispatch(inp["x"], inp["topk_idx"] if with_topk else None, None, num_experts,
                                           is_token_in_rank=[lay[3] for lay in layouts],
                                           num_tokens_per_expert=[lay[2] for lay in layouts],
                                           num_worst_tokens=worst)[rank].recv_x.float()
                scale = recv_x[1].unsqueeze(1)
                err = (quant.dequant_int8(*recv_x) - plain).abs()
                assert bool((err <= 0.5 * scale * (1 + 1e-5) + 1e-7).all()), f"int8 error {err.max()} over bound"
            assert_same("recv_topk_idx", recv_idx, ref.recv_topk_idx)
            assert_same("recv_topk_weights", recv_w, ref.recv_topk_weights)
            assert counts == ([] if worst else ref.num_recv_tokens_per_expert.tolist()), (counts, ref.num_recv_tokens_per_expert)
            assert_same("handle", handle, ref.handle)
            if worst:
                rows = recv_x[0].shape[0] if isinstance(recv_x, tuple) else recv_x.shape[0]
                assert rows == worst, (rows, worst)
            if native is not None and attempt and idx is not None:
                # Small batches' rows go through the rings (large ones, e.g. H 7168 at 4 ranks, go direct).
                ring = int(attempt == 1 and case.hidden <= 256)
                assert native.native_calls == before[0] + 1, (attempt, before)
                assert native.ring_rows == before[1] + ring or (attempt == 1 and not ring), (attempt, before)
        if opts.get("cached"):
            x2 = tuple(t.clone() for t in x) if fp8 else x * 2
            cw = inp["topk_weights"][rank] if with_weights else None
            xs_all = inp["x"] if fp8 else [t * 2 for t in inp["x"]]
            want = reference.cached_dispatch(xs_all, refs, x_scales=inp["x_scales"] if fp8 else None,
                                             topk_weights=inp["topk_weights"] if with_weights else None)[rank]
            for attempt in range(3):  # portable, whole-op native, native handshake + portable rows
                if native is not None:
                    before = native.native_calls
                    native.small_bytes = -1 if attempt == 2 else _shm_normal.SMALL_BYTES
                got = buf.dispatch(x2, handle=handle, topk_weights=cw)
                if native is not None and attempt:
                    assert native.native_calls == before + 1, ("cached", attempt, before)
                assert got[1] is None and got[3] is None and got[4] is None
                assert_same("cached recv_x", got[0], (want[0], want[1]) if fp8 else want[0])
                assert_same("cached recv_topk_weights", got[2], want[2])

        expert_out = [_to_float((d.recv_x, d.recv_x_scales) if d.recv_x_scales is not None else d.recv_x) for d in refs]
        g = torch.Generator().manual_seed(case.seed + 1)
        biases = [tuple(torch.randn(d.is_token_in_rank.shape[0], case.hidden, generator=g).to(expert_out[0].dtype)
                        for _ in range(opts.get("bias", 0))) for d in refs]
        for attempt in range(3):  # as for dispatch: portable, whole-op native, native handshake + portable rows
            if native is not None:
                before = native.native_calls
                native.small_bytes = -1 if attempt == 2 else _shm_normal.SMALL_BYTES
            combined, combined_w, _ = buf.combine(_to_float(recv_x), handle, topk_weights=recv_w,
                                                  bias=biases[rank] if biases[rank] else None)
            if native is not None and attempt:
                assert native.native_calls == before + 1, ("combine", attempt, before)
            _check_combined(case, opts, world, rank, buf, refs, expert_out, biases, recv_w, inp, per_node_ranks,
                            combined, combined_w)
        return int(handle[0][-1, rank])
    finally:
        buf.destroy()


def _check_combined(case, opts, world, rank, buf, refs, expert_out, biases, recv_w, inp, per_node_ranks, combined,
                    combined_w) -> None:
    """A combine's outputs against the reference (and, on hierarchical, against the flat sum within a bound)."""
    ref_kw = dict(topk_weights=[d.recv_topk_weights for d in refs] if recv_w is not None else None,
                  bias=biases if opts.get("bias") else None)
    hierarchical = buf.transport == "hierarchical"
    want_x, want_w = reference.combine(expert_out, refs, **ref_kw,
                                       num_ranks_per_node=per_node_ranks if hierarchical else None)[rank]
    assert_same("combined_x", combined, want_x)
    assert_same("combined_topk_weights", combined_w, want_w)
    if hierarchical:
        # Against the flat sum: one extra rounding of each remote node's partial (to the payload's dtype,
        # at most half a unit of the partial) and the reassociation of up to R fp32 additions (half a
        # unit each): within R * eps * sum of |terms|.
        flat_x, flat_w = reference.combine(expert_out, refs, **ref_kw)[rank]
        magnitude = reference.combine([e.abs() for e in expert_out], refs,
                                      bias=[tuple(b.abs() for b in bs) for bs in biases] if opts.get("bias")
                                      else None)[rank][0].float()
        bound = world * torch.finfo(flat_x.dtype).eps * magnitude + torch.finfo(flat_x.dtype).tiny
        diff = (combined.float() - flat_x.float()).abs()
        assert bool((diff <= bound).all()), f"combine vs flat: {(diff - bound).max()} over, case {case}"
        if flat_w is not None:
            torch.testing.assert_close(combined_w, flat_w, rtol=1e-6, atol=1e-7)
    if recv_w is not None:
        # DeepEP's invariant: combining the dispatched weights gives back the original weights.
        masked = torch.where(inp["topk_idx"][rank] >= 0, inp["topk_weights"][rank], 0.0)
        assert_same("combined weights == original", combined_w, masked)
