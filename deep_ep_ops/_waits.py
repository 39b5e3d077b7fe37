"""Bounded waits: no exchange blocks longer than the group's timeout, and the error names the peers.

A wait polls the transport in short slices. Only when a slice runs out does the rank record in the
c10d store that it is waiting at ``(op, seq)`` (so the fast path costs nothing). Every rank that reached the
exchange records itself within one slice. At the deadline the ranks without a record are the ones that never
arrived, and the error names them together with the op they were last seen waiting in, if any.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

from .transports import Pending

_SLICE_S = 0.5


def store():
    """The default group's c10d store, or ``None`` without one."""
    try:
        return dist.distributed_c10d._get_default_store()
    except Exception:  # no default group (e.g. groups made without init_process_group)
        return None


def _key(ctx, op: str, seq: int, rank: int) -> str:
    return f"deepep_ops/{ctx.group_name}/{op}/{seq}/{rank}"


def _last_key(ctx, rank: int) -> str:
    return f"deepep_ops/{ctx.group_name}/last/{rank}"


def announce(ctx, op: str, seq: int) -> None:
    """Records in the store that this rank is waiting in ``op`` number ``seq``."""
    kv = store()
    if kv is not None:
        kv.set(_key(ctx, op, seq, ctx.rank), "1")
        kv.set(_last_key(ctx, ctx.rank), f"{op} #{seq}")


def _absent(ctx, op: str, seq: int, grace_s: float) -> list[int] | None:
    kv = store()
    if kv is None:
        return None
    deadline = time.monotonic() + grace_s
    while True:
        missing = [r for r in range(ctx.num_ranks)
                   if r != ctx.rank and not kv.check([_key(ctx, op, seq, r)])]
        if not missing or time.monotonic() >= deadline:
            return missing
        time.sleep(0.05)


def describe_peers(ctx, ranks: list[int]) -> str:
    """``rank 1 (last seen waiting in deepep::combine #7)`` for each rank, from the store."""
    kv = store()
    parts = []
    for r in ranks:
        where = "not seen in any deepep op"
        if kv is not None and kv.check([_last_key(ctx, r)]):
            where = f"last seen waiting in deepep::{kv.get(_last_key(ctx, r)).decode()}"
        global_rank = dist.get_global_rank(ctx.group, r) if dist.is_initialized() else r
        name = f"rank {r}" if global_rank == r else f"rank {r} (global rank {global_rank})"
        parts.append(f"{name}, {where}")
    return "; ".join(parts)


def wait(ctx, pending: Pending, op: str, seq: int) -> torch.Tensor:
    """Waits for ``pending`` at most ``ctx.timeout_s`` seconds.

    Returns:
        The exchanged tensor.

    Raises:
        TimeoutError: some peers did not reach this exchange in time; the message names them.
        RuntimeError: the transport failed (e.g. a peer process died); the message names the peers
            that never reached this exchange.
    """
    deadline = time.monotonic() + ctx.timeout_s
    slice_s = min(_SLICE_S, ctx.timeout_s)
    announced = False
    while True:
        try:
            if pending.poll(slice_s):
                return pending.result()
        except RuntimeError as exc:
            announce(ctx, op, seq)
            missing = _absent(ctx, op, seq, grace_s=min(2.0, ctx.timeout_s))
            who = describe_peers(ctx, missing) if missing else "could not tell which peer failed"
            raise RuntimeError(
                f"deepep::{op}: expected every rank of group {ctx.group_name!r} to complete exchange #{seq}, "
                f"got a transport failure ({exc}); peers that did not reach it: {who}"
            ) from exc
        if not announced:
            announce(ctx, op, seq)
            announced = True
        if time.monotonic() >= deadline:
            missing = _absent(ctx, op, seq, grace_s=2 * slice_s)
            if missing is None:
                who = "(no c10d store to tell which rank is missing)"
            elif missing:
                who = describe_peers(ctx, missing)
            else:
                who = "(every rank arrived; the transport stalled)"
            raise TimeoutError(
                f"deepep::{op}: expected all {ctx.num_ranks} ranks of group {ctx.group_name!r} in exchange "
                f"#{seq} within {ctx.timeout_s:g} s, got no answer from {who}. The process group cannot be "
                f"used after this; raise the timeout with Buffer(timeout_s=) or DEEP_EP_OPS_TIMEOUT_S if "
                f"the peer is only slow"
            )
