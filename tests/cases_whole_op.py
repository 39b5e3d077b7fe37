"""Tier-2 cases of the shm backend's whole-op native paths (``transports/_shm_normal``, ``_shm_low_latency``).

The first call of each configuration runs the portable kernel; these cases run a configuration once, then
again with what the native path must handle on its own: bad input on one rank (every rank raises the same
error), a receive limit exceeded, and a rank that takes the portable path while its peers take the native
one (the two must agree on the wire). Results are compared exactly with the reference.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from cases_normal import assert_same
from deep_ep_ops import Buffer, _registry, reference


def _inputs(world: int, n: int = 6, hidden: int = 64, num_experts: int = 8, k: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(n, hidden, generator=g).bfloat16() for _ in range(world)]
    idx = [torch.rand(n, num_experts, generator=g).topk(k, dim=1).indices for _ in range(world)]
    w = [torch.rand(n, k, generator=g) for _ in range(world)]
    return xs, idx, w


def _native(buf: Buffer):
    ctx = _registry.get(buf.group_name)
    return ctx.transport._normal, ctx.transport._low_latency


def _dispatch(buf, x, idx, w, num_experts, **kwargs):
    per_rank, _, per_expert, in_rank, _ = buf.get_dispatch_layout(idx.clamp(-1, num_experts - 1), num_experts)
    in_rank = kwargs.pop("is_token_in_rank", in_rank)
    return buf.dispatch(x, topk_idx=idx, topk_weights=w, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
                        num_tokens_per_expert=per_expert, **kwargs)


def _message(fn) -> str:
    try:
        fn()
    except RuntimeError as exc:
        return str(exc)
    return "no error"


def normal_errors(rank: int, world: int) -> dict[str, str]:
    """After a good call of the configuration, rank 1's bad input on the native path fails every rank."""
    buf = Buffer(dist.group.WORLD, transport="shm", timeout_s=30)
    normal, _ = _native(buf)
    xs, idx, w = _inputs(world)
    x, i, wt = xs[rank], idx[rank], w[rank]
    try:
        _dispatch(buf, x, i, wt, 8)
        out = {}
        bad = i.clone()
        if rank == 1:
            bad[2, 1] = 11
        calls = normal.native_calls
        out["expert_id"] = _message(lambda: _dispatch(buf, x, bad, wt, 8))
        assert normal.native_calls == calls + 1
        _, _, _, in_rank, _ = buf.get_dispatch_layout(i, 8)
        wrong = in_rank.clone()
        if rank == 1:
            wrong[3] = ~wrong[3]
        out["layout"] = _message(lambda: _dispatch(buf, x, i, wt, 8, is_token_in_rank=wrong))
        limit = 6 * world - 1
        _dispatch(buf, x[:4], i[:4], wt[:4], 8, num_worst_tokens=limit)  # fits: the configuration is remembered
        many = torch.zeros_like(i)  # every token of every rank goes to rank 0
        out["limit"] = _message(lambda: _dispatch(buf, x, many, wt, 8, num_worst_tokens=limit))
        # Combine along a handle of another dispatch on rank 1 alone: the handshake tells every rank.
        recv_x, _, recv_w, _, handle, _ = _dispatch(buf, x, i, wt, 8)
        other = _dispatch(buf, x, torch.zeros_like(i), wt, 8)  # every token to rank 0: other counts
        buf.combine(recv_x, handle, recv_w)  # remembered
        calls = normal.native_calls
        stale = (other[0], other[4], other[2]) if rank == 1 else (recv_x, handle, recv_w)
        out["handle"] = _message(lambda: buf.combine(*stale))
        assert normal.native_calls == calls + 1
        _dispatch(buf, x, i, wt, 8)  # the group is still usable
        return out
    finally:
        buf.destroy()


def normal_mixed_paths(rank: int, world: int) -> int:
    """Rank 0 forgets its checked configurations (so it takes the portable path and offers no ring rows) while
    its peers take the native one: they agree, the rows go the portable way, and every output is exact."""
    buf = Buffer(dist.group.WORLD, transport="shm", timeout_s=30)
    normal, _ = _native(buf)
    xs, idx, w = _inputs(world, seed=3)
    try:
        refs = reference.dispatch(xs, idx, w, 8, is_token_in_rank=[
            reference.get_dispatch_layout(i, 8, world, world)[3] for i in idx])
        for attempt in range(3):
            if rank == 0 and attempt == 2:
                normal.configs.clear()
            calls, rings = normal.native_calls, normal.ring_rows
            recv_x, recv_idx, recv_w, counts, handle, _ = _dispatch(buf, xs[rank], idx[rank], w[rank], 8)
            assert_same("recv_x", recv_x, refs[rank].recv_x)
            assert_same("recv_topk_idx", recv_idx, refs[rank].recv_topk_idx)
            assert_same("recv_topk_weights", recv_w, refs[rank].recv_topk_weights)
            assert_same("handle", handle, refs[rank].handle)
            assert counts == refs[rank].num_recv_tokens_per_expert.tolist()
            if attempt == 1:
                assert (normal.native_calls, normal.ring_rows) == (calls + 1, rings + 1)
            if attempt == 2:
                assert normal.ring_rows == rings, "a rank on the portable path offered no ring rows"
        return normal.native_calls
    finally:
        buf.destroy()


def low_latency_paths(rank: int, world: int) -> dict[str, str]:
    """The low-latency native path: a bad id on rank 1 fails every rank; then rank 0 forgets its checked
    configurations and takes the portable path while its peers take the native one, with exact results."""
    m, num_experts = 8, 8
    buf = Buffer(dist.group.WORLD, transport="shm", low_latency_mode=True, timeout_s=30,
                 num_rdma_bytes=Buffer.get_low_latency_rdma_size_hint(m, 64, world, num_experts))
    _, ll = _native(buf)
    xs, idx, w = _inputs(world, seed=5)
    try:
        refs = reference.low_latency_dispatch(xs, idx, m, num_experts, use_fp8=False)
        out = {}
        for attempt in range(3):
            if rank == 0 and attempt == 2:
                ll.configs.clear()
            calls = ll.native_calls
            recv_x, count, handle, _, _ = buf.low_latency_dispatch(xs[rank], idx[rank], m, num_experts, use_fp8=False)
            valid = (refs[rank].layout_range & 0xFFFFFFFF).sum(dim=1)
            for e, v in enumerate(valid.tolist()):
                assert_same(f"expert {e} rows", recv_x[e, :v], refs[rank].packed_recv_x[e, :v])
                assert_same(f"expert {e} src_info", handle[0][e, :v], refs[rank].src_info[e, :v])
            assert_same("layout_range", handle[1], refs[rank].layout_range)
            assert_same("count", count, refs[rank].packed_recv_count)
            y = recv_x * 2
            want = reference.low_latency_combine([r.packed_recv_x * 2 for r in refs], idx, w, refs, num_experts)[rank]
            combined, _, _ = buf.low_latency_combine(y, idx[rank], w[rank], handle)
            assert_same("combined", combined, want)
            if attempt == 1 or (attempt == 2 and rank != 0):
                assert ll.native_calls == calls + 2, (attempt, calls, ll.native_calls)
        bad = idx[rank].clone()
        if rank == 1:
            bad[0, 0] = 99
        out["expert_id"] = _message(lambda: buf.low_latency_dispatch(xs[rank], bad, m, num_experts, use_fp8=False))
        return out
    finally:
        buf.destroy()


def low_latency_overlap(rank: int, world: int) -> int:
    """Two micro-batches in flight on the native path (DeepEP's overlap with receive hooks): send A, send B,
    receive A, receive B, for dispatch and combine, exact against the reference; then a send whose hook is never
    called, read out when its slot half is used again, and clean_low_latency_buffer."""
    m, num_experts = 8, 8
    buf = Buffer(dist.group.WORLD, transport="shm", low_latency_mode=True, timeout_s=30,
                 num_rdma_bytes=Buffer.get_low_latency_rdma_size_hint(m, 64, world, num_experts))
    _, ll = _native(buf)
    batches = [_inputs(world, seed=s) for s in (7, 8)]
    try:
        for xs, idx, w in batches:  # the configuration's first call runs the portable kernels
            recv_x, _, handle, _, _ = buf.low_latency_dispatch(xs[rank], idx[rank], m, num_experts, use_fp8=False)
            buf.low_latency_combine(recv_x, idx[rank], w[rank], handle)
        calls = ll.native_calls
        sent = [buf.low_latency_dispatch(xs[rank], idx[rank], m, num_experts, use_fp8=False, return_recv_hook=True)
                for xs, idx, w in batches]
        for _, _, _, _, hook in reversed(sent):  # hooks in any order
            hook()
        combines = []
        for (xs, idx, w), (recv_x, count, handle, _, _) in zip(batches, sent):
            refs = reference.low_latency_dispatch(xs, idx, m, num_experts, use_fp8=False)
            valid = (refs[rank].layout_range & 0xFFFFFFFF).sum(dim=1)
            for e, v in enumerate(valid.tolist()):
                assert_same(f"expert {e} rows", recv_x[e, :v], refs[rank].packed_recv_x[e, :v])
            assert_same("count", count, refs[rank].packed_recv_count)
            out = torch.full((xs[rank].shape[0], 64), float("nan")).bfloat16()
            combined, _, hook = buf.low_latency_combine(recv_x * 3, idx[rank], w[rank], handle,
                                                        return_recv_hook=True, out=out)
            want = reference.low_latency_combine([r.packed_recv_x * 3 for r in refs], idx, w, refs, num_experts)
            combines.append((hook, out, want[rank]))
        for hook, out, want in combines:
            hook()
            assert_same("combined", out, want)
        assert ll.native_calls == calls + 4, (calls, ll.native_calls)
        xs, idx, w = batches[0]
        forgotten = buf.low_latency_dispatch(xs[rank], idx[rank], m, num_experts, use_fp8=False,
                                             return_recv_hook=True)
        for _ in range(2):  # the second reuses the forgotten send's half: it is read out first
            recv_x, _, handle, _, _ = buf.low_latency_dispatch(xs[rank], idx[rank], m, num_experts, use_fp8=False)
        buf.clean_low_latency_buffer(m, 64, num_experts)
        del forgotten
        return ll.native_calls - calls
    finally:
        buf.destroy()


def normal_tight_rings(rank: int, world: int) -> int:
    """Rings that hold one 2 KB row: the packed rows of the ring path (payload + metadata, 2 KB and more) do not
    fit, so every rank takes the portable rows after the native handshake; results stay exact (a property
    example once hung here)."""
    from deep_ep_ops.transports import _shm_engine

    hidden, num_experts = 512, 8
    buf = Buffer(dist.group.WORLD, transport="shm", timeout_s=30,
                 num_nvl_bytes=_shm_engine.ring_segment_bytes(world, 4 * hidden))
    normal, _ = _native(buf)
    g = torch.Generator().manual_seed(11)
    xs = [torch.randn(5, hidden, generator=g) for _ in range(world)]
    idx = [torch.rand(5, num_experts, generator=g).topk(2, dim=1).indices for _ in range(world)]
    w = [torch.rand(5, 2, generator=g) for _ in range(world)]
    try:
        layouts = [reference.get_dispatch_layout(i, num_experts, world, world) for i in idx]
        refs = reference.dispatch(xs, idx, w, num_experts, is_token_in_rank=[lay[3] for lay in layouts])
        want_x, want_w = reference.combine([r.recv_x for r in refs], refs,
                                           topk_weights=[r.recv_topk_weights for r in refs])[rank]
        for _ in range(3):
            recv_x, _, recv_w, _, handle, _ = _dispatch(buf, xs[rank], idx[rank], w[rank], num_experts)
            assert_same("recv_x", recv_x, refs[rank].recv_x)
            combined, combined_w, _ = buf.combine(recv_x, handle, recv_w)
            assert_same("combined_x", combined, want_x)
            assert_same("combined_topk_weights", combined_w, want_w)
        assert normal.ring_rows == 0, "a packed row wider than the rings took them"
        return normal.native_calls
    finally:
        buf.destroy()
