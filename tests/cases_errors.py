"""Tier-2 failure cases: each rank returns the message it raised, so the test can check that every
rank raised the same error, and raised it instead of hanging."""

from __future__ import annotations

import os
import time

import torch
import torch.distributed as dist

from deep_ep_ops import Buffer


def _routing(num_tokens: int, num_experts: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(num_tokens, num_experts, generator=g).topk(2, dim=1).indices


def _dispatch(buf: Buffer, x, idx, num_experts: int, **kwargs):
    lay = buf.get_dispatch_layout(idx.long().clamp(-1, 7), 8)
    return buf.dispatch(x, topk_idx=idx, num_tokens_per_rank=lay[0], is_token_in_rank=lay[3],
                        num_tokens_per_expert=lay[2][:num_experts], **kwargs)


def bad_input_on_one_rank(rank: int, world: int, kind: str) -> str:
    """Rank 1 alone gets bad input; every rank must raise, with the same message, and the group must
    stay usable (a clean dispatch follows)."""
    buf = Buffer(dist.group.WORLD, timeout_s=30)
    try:
        num_experts = 7 if kind == "indivisible" else 8
        idx = _routing(5, 8)
        x = torch.randn(5, 32)
        if kind == "hidden" and rank == 1:
            x = torch.randn(5, 16)
        if kind == "expert_id" and rank == 1:
            idx[2, 1] = 11
        if kind == "dtype" and rank == 1:
            idx = idx.int()
        message = ""
        try:
            _dispatch(buf, x, idx, num_experts)
        except RuntimeError as exc:
            message = str(exc)
        idx = _routing(5, 8)
        _dispatch(buf, torch.randn(5, 32), idx, 8)  # still usable
        return message
    finally:
        buf.destroy()


def missing_peer(rank: int, world: int, timeout_s: float) -> str:
    """Rank 1 builds its Buffer but never joins the dispatch; rank 0 must time out naming it."""
    buf = Buffer(dist.group.WORLD, timeout_s=timeout_s)
    if rank == 1:
        time.sleep(timeout_s + 3)
        return ""
    start = time.monotonic()
    try:
        _dispatch(buf, torch.randn(4, 8), _routing(4, 8), 8)
    except TimeoutError as exc:
        return f"{time.monotonic() - start:.1f}|{exc}"
    return "no error"


def missing_peer_at_construction(rank: int, world: int, timeout_s: float) -> str:
    """Rank 1 never builds its Buffer (a collective, like DeepEP's); rank 0 must time out naming it."""
    if rank == 1:
        time.sleep(timeout_s + 3)
        return ""
    try:
        Buffer(dist.group.WORLD, timeout_s=timeout_s)
    except TimeoutError as exc:
        return str(exc)
    return "no error"


def dead_peer(rank: int, world: int) -> str:
    """Rank 1 dies before the exchange; rank 0 must raise naming it, not hang."""
    buf = Buffer(dist.group.WORLD, timeout_s=20)
    if rank == 1:
        os._exit(3)
    try:
        _dispatch(buf, torch.randn(4, 8), _routing(4, 8), 8)
    except (RuntimeError, TimeoutError) as exc:
        return str(exc)
    return "no error"


def local_failure(rank: int, world: int, op: str, kind: str) -> str:
    """Rank 1 alone fails in its local work before the first exchange of ``op``: either a check (bad
    weights for the fused op) or an unexpected exception (a fault injected into quantization). Every rank
    must raise a deepep error naming rank 1, and the group must stay usable afterwards."""
    from unittest import mock

    from cases_fused import FusedCase, local_weights
    from cases_low_latency import LLCase, make_inputs

    case = FusedCase(LLCase(tokens=(4,), m=4, hidden=256, num_experts=8, num_topk=2))
    xs, idx, w = make_inputs(case.base, world)
    weights, _ = local_weights(case, world, rank)
    buf = Buffer(dist.group.WORLD, low_latency_mode=True, timeout_s=30)

    def run():
        if op == "dispatch":
            lay = buf.get_dispatch_layout(idx[rank], 8)
            buf.dispatch(xs[rank], topk_idx=idx[rank], num_tokens_per_rank=lay[0], is_token_in_rank=lay[3],
                         num_tokens_per_expert=lay[2], quant_mode="int8")
        elif op == "low_latency_dispatch":
            buf.low_latency_dispatch(xs[rank], idx[rank], 4, 8, use_fp8=True)
        else:
            buf.fused_deep_moe(xs[rank], idx[rank], w[rank], *weights, 4, 8)

    def injected(*args, **kwargs):
        raise ValueError("injected fault")

    try:
        message = "no error"
        patch = mock.patch.object(buf._ctx.kernels, "quantize_int8" if op != "low_latency_dispatch" else "quantize_fp8",
                                  injected)
        if kind == "bad_weights" and rank == 1:
            weights = (weights[0][:, :-1], *weights[1:])
        try:
            if kind == "fault" and rank == 1:
                with patch:
                    run()
            else:
                run()
        except RuntimeError as exc:
            message = str(exc)
        weights, _ = local_weights(case, world, rank)
        run()  # still usable
        return message
    finally:
        buf.destroy()
