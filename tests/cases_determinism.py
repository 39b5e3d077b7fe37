"""Tier-2 determinism case: the same inputs through every (transport, kernels) pair, twice each, as digests.

Each rank runs, per pair, one ``Buffer`` and the same sequence twice: a normal step (layout, bf16 dispatch
with top-k weights, cached dispatch, combine with top-k weights and a bias), low-latency steps (FP8
dispatch + combine; INT8 dispatch + combine with receive hooks) and ``fused_deep_moe`` (W8A8 and bf16
weights). Every output is reduced to a sha256 digest of its dtype, shape and bytes. Low-latency packed
outputs are digested on their valid rows only (``x[i, :count[i]]``): the rows after them are undefined
padding. The test compares the digests between the two runs and between the pairs.
"""

from __future__ import annotations

import ctypes
import hashlib

import torch
import torch.distributed as dist

from _data import Case, make_inputs as normal_inputs
from cases_fused import FusedCase, local_weights
from cases_low_latency import LLCase, dequant, make_inputs as ll_inputs
from deep_ep_ops import Buffer, compute

NORMAL = Case(tokens=(24, 13), hidden=256, num_experts=8, num_topk=3, drop=0.1, seed=11)
LOW_LATENCY = LLCase(tokens=(7, 4), m=8, hidden=256, num_experts=8, num_topk=3, drop=0.1, seed=12)
FUSED = (FusedCase(LLCase(tokens=(6, 3), m=8, hidden=256, num_experts=8, num_topk=3, seed=13)),
         FusedCase(LLCase(tokens=(6, 3), m=8, hidden=256, num_experts=8, num_topk=3, seed=14), quant_mode=0))
TRANSPORTS = ("all_to_all", "shm")


def kernel_paths() -> list[str]:
    return ["python", "native"] if compute.native_loaded() else ["python"]


def digest(value) -> str:
    """sha256 of a tensor's dtype, shape and bytes (tuples/lists element by element; other values by repr)."""
    h = hashlib.sha256()

    def feed(v):
        if isinstance(v, torch.Tensor):
            t = v.detach().contiguous()
            h.update(f"{t.dtype}{tuple(t.shape)}|".encode())
            if t.numel():
                h.update(ctypes.string_at(t.data_ptr(), t.numel() * t.element_size()))
        elif isinstance(v, (tuple, list)):
            h.update(f"{type(v).__name__}{len(v)}(".encode())
            for item in v:
                feed(item)
            h.update(b")")
        else:
            h.update(f"{v!r}|".encode())

    feed(value)
    return h.hexdigest()


def _valid(t: torch.Tensor, count: torch.Tensor) -> list[torch.Tensor]:
    """The valid rows of each local expert of a packed ``[L, R*M, ...]`` output."""
    return [t[i, :int(c)] for i, c in enumerate(count.tolist())]


def _normal(buf: Buffer, rank: int, world: int, out: dict) -> None:
    inp = normal_inputs(NORMAL, world)
    x, idx, w = inp["x"][rank], inp["topk_idx"][rank], inp["topk_weights"][rank]
    per_rank, per_node, per_expert, in_rank, _ = buf.get_dispatch_layout(idx, NORMAL.num_experts)
    out["layout"] = digest((per_rank, per_node, per_expert, in_rank))
    recv_x, recv_idx, recv_w, counts, handle, _ = buf.dispatch(
        x, topk_idx=idx, topk_weights=w, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
        num_tokens_per_expert=per_expert)
    out["dispatch.recv_x"] = digest(recv_x)
    out["dispatch.recv_topk"] = digest((recv_idx, recv_w, counts))
    out["dispatch.handle"] = digest(handle)
    cached_x, _, cached_w, _, _, _ = buf.dispatch(x * 2, handle=handle, topk_weights=w)
    out["cached_dispatch"] = digest((cached_x, cached_w))
    g = torch.Generator().manual_seed(100 + rank)
    bias = torch.randn(x.shape[0], NORMAL.hidden, generator=g).bfloat16()
    y = (recv_x.float() * 1.5 - 0.25).bfloat16()  # a stand-in for the experts
    combined, combined_w, _ = buf.combine(y, handle, topk_weights=recv_w, bias=bias)
    out["combine"] = digest((combined, combined_w))


def _low_latency(buf: Buffer, rank: int, world: int, out: dict) -> None:
    xs, idx, w = ll_inputs(LOW_LATENCY, world)
    m, e = LOW_LATENCY.m, LOW_LATENCY.num_experts
    for fmt, kw, hooks in (("fp8", dict(use_fp8=True), False), ("int8", dict(use_fp8=False, quant_mode="int8"), True)):
        (data, scales), count, handle, _, hook = buf.low_latency_dispatch(xs[rank], idx[rank], m, e,
                                                                           return_recv_hook=hooks, **kw)
        if hooks:
            hook()
        src_info, layout_range = handle[0], handle[1]
        out[f"ll_{fmt}.count"] = digest(count)
        out[f"ll_{fmt}.recv_x"] = digest(_valid(data, count))
        out[f"ll_{fmt}.scales"] = digest(_valid(scales, count))
        out[f"ll_{fmt}.handle"] = digest((_valid(src_info, count), layout_range, handle[2:]))
        y = dequant(data, scales).bfloat16()  # padding rows are undefined here and ignored by combine
        combined, _, hook = buf.low_latency_combine(y, idx[rank], w[rank], handle, return_recv_hook=hooks)
        if hooks:
            hook()
        out[f"ll_{fmt}.combine"] = digest(combined)


def _fused(buf: Buffer, rank: int, world: int, out: dict) -> None:
    for case in FUSED:
        base = case.base
        xs, idx, w = ll_inputs(base, world)
        weights, _ = local_weights(case, world, rank)
        output, ep_recv_count = buf.fused_deep_moe(xs[rank], idx[rank], w[rank], *weights, base.m, base.num_experts,
                                                   quant_mode=case.quant_mode)
        out[f"fused_q{case.quant_mode}"] = digest((output, ep_recv_count))


def digests(rank: int, world: int, runs: int = 2) -> dict[str, list[dict[str, str]]]:
    """``"transport/kernels"`` → one ``{output name: sha256}`` per run, on this rank."""
    result = {}
    for transport in TRANSPORTS:
        for kernels in kernel_paths():
            buf = Buffer(dist.group.WORLD, transport=transport, kernels=kernels, low_latency_mode=True, timeout_s=60)
            try:
                # A live context on the group would be re-used with its own settings: make sure we got ours.
                assert (buf.transport, buf.kernels) == (transport, kernels), (buf.transport, buf.kernels)
                per_run = []
                for _ in range(runs):
                    out: dict[str, str] = {}
                    _normal(buf, rank, world, out)
                    _low_latency(buf, rank, world, out)
                    _fused(buf, rank, world, out)
                    per_run.append(out)
                result[f"{transport}/{kernels}"] = per_run
            finally:
                buf.destroy()
    return result
