"""Bounded waits: no exchange blocks longer than the group's timeout, and every failure names the peers.

A wait polls the transport in short slices. Only when a slice runs out does the rank record in the
c10d store that it is waiting at ``(op, seq)`` (so the fast path costs nothing). Every rank that reached the
exchange records itself within one slice. At the deadline the ranks without a record are the ones that never
arrived, and the error names them together with the op they were last seen waiting in, if any.

A peer that dies shows up sooner: as a transport error (a gloo IO error, :class:`PeerLost` from the
shared-memory backend) or as a store that no longer answers. When a group's context is built every rank
records its process (host, pid namespace, pid) in the store and reads its peers' (:func:`publish_process`,
:func:`read_processes`), so that a survivor names a dead peer of its own host from the process table, even
after the dead peer took the store down with it. Other peers are named from the store records, and when
the store itself is gone, its host.

Either way the rank raises ``deepep::<op>: expected …, got no answer from <rank>, …`` (a ``TimeoutError`` for
a stall, else a ``RuntimeError``), never the transport's or the store's own exception, and the context
remembers the failure: every later use of the group raises at once, quoting it (:func:`check_usable`).
"""

from __future__ import annotations

import contextlib
import os
import time

import torch
import torch.distributed as dist

from . import topology
from .transports import Pending
from .transports._segments import _alive

_SLICE_S = 0.5
#: How long a rank whose exchange failed gives its live peers to record that they reached it.
_GRACE_S = 2.0


class PeerLost(RuntimeError):
    """Raised by a backend that saw peers' processes gone; ``ranks`` are their ranks in the group."""

    def __init__(self, ranks: list[int], detail: str):
        super().__init__(detail)
        self.ranks = ranks


def store():
    """The default group's c10d store, or ``None`` without one."""
    try:
        return dist.distributed_c10d._get_default_store()
    except Exception:  # no default group (e.g. groups made without init_process_group)
        return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]


def ask_store(ctx, call, default=None):
    """``call(store)``, or ``default`` without a store or once it stopped answering. The first failure is
    remembered in the context (``store_error``), so a dead store costs one failed request, not one per wait."""
    kv = store()
    if kv is None or ctx.store_error is not None:
        return default
    try:
        return call(kv)
    except Exception as exc:  # DistNetworkError, DistStoreError, or a bare RuntimeError of the client
        ctx.store_error = f"{type(exc).__name__}: {_first_line(exc)}"
        return default


def _key(ctx, op: str, seq: int, rank: int) -> str:
    return f"deepep_ops/{ctx.group_name}/{op}/{seq}/{rank}"


def _last_key(ctx, rank: int) -> str:
    return f"deepep_ops/{ctx.group_name}/last/{rank}"


def _process_key(ctx, rank: int) -> str:
    return f"deepep_ops/{ctx.group_name}/process/{rank}"


def _this_process() -> tuple[int, int, int]:
    try:
        namespace = os.stat("/proc/self/ns/pid").st_ino  # pids mean the same only within one pid namespace
    except OSError:
        namespace = 0
    return topology.host_identity(), namespace, os.getpid()


def publish_process(ctx) -> None:
    """Records this rank's process in the store; call it before the group's first collective."""
    ask_store(ctx, lambda kv: kv.set(_process_key(ctx, ctx.rank), ":".join(map(str, _this_process()))))


def read_processes(ctx) -> list[tuple[int, int, int]] | None:
    """Every rank's ``(host identity, pid namespace, pid)``; call it after a collective that followed
    :func:`publish_process` on every rank (``None`` without a store)."""
    keys = [_process_key(ctx, r) for r in range(ctx.num_ranks)]
    deadline = time.monotonic() + min(1.0, ctx.timeout_s)
    # A record is sent before its rank's collective, but on another connection: give it a moment to land.
    while not ask_store(ctx, lambda kv: kv.check(keys), False):
        if ctx.store_error is not None or time.monotonic() >= deadline:
            return None
        time.sleep(0.01)
    values = ask_store(ctx, lambda kv: kv.multi_get(keys))
    return None if values is None else [tuple(int(v) for v in value.decode().split(":")) for value in values]


def dead_peers(ctx) -> dict[int, int]:
    """``{rank: pid}`` of the peers on this host (and pid namespace) whose process has exited."""
    if not ctx.processes:
        return {}
    host, namespace, _ = _this_process()
    return {r: pid for r, (h, ns, pid) in enumerate(ctx.processes)
            if r != ctx.rank and (h, ns) == (host, namespace) and not _alive(pid)}


def announce(ctx, op: str, seq: int) -> None:
    """Records in the store that this rank is waiting in ``op`` number ``seq``."""
    ask_store(ctx, lambda kv: (kv.set(_key(ctx, op, seq, ctx.rank), "1"),
                            kv.set(_last_key(ctx, ctx.rank), f"{op} #{seq}")))


def _absent(ctx, op: str, seq: int, grace_s: float) -> list[int] | None:
    """The peers that did not record reaching ``(op, seq)`` within ``grace_s`` (``None`` without a store)."""
    deadline = time.monotonic() + grace_s
    while True:
        present = ask_store(ctx, lambda kv: [kv.check([_key(ctx, op, seq, r)]) for r in range(ctx.num_ranks)])
        if present is None:
            return None
        missing = [r for r in range(ctx.num_ranks) if r != ctx.rank and not present[r]]
        if not missing or time.monotonic() >= deadline:
            return missing
        time.sleep(0.05)


def _store_host(ctx) -> str:
    """The rank that hosted the store (``init_process_group``'s rank 0), for when the store is gone."""
    try:
        rank = dist.get_group_rank(ctx.group, 0)
    except Exception:  # global rank 0 is not in this group
        return f"global rank 0 (the host of the c10d store, outside this group; the store is unreachable: " \
               f"{ctx.store_error})"
    return f"{_name(ctx, rank)}, the host of the c10d store (unreachable: {ctx.store_error})"


def _name(ctx, rank: int) -> str:
    global_rank = dist.get_global_rank(ctx.group, rank) if dist.is_initialized() else rank
    return f"rank {rank}" if global_rank == rank else f"rank {rank} (global rank {global_rank})"


def describe_peers(ctx, ranks: list[int], dead: dict[int, int | None] | None = None) -> str:
    """``rank 1 (global rank 3), dead (process 42 exited), last seen waiting in deepep::combine #7`` for each
    rank: whether it is known dead (``dead``), and where the store last saw it."""
    parts = []
    for r in ranks:
        where = ", not seen in any deepep op"
        last = ask_store(ctx, lambda kv: kv.get(_last_key(ctx, r)) if kv.check([_last_key(ctx, r)]) else None)
        if last is not None:
            where = f", last seen waiting in deepep::{last.decode()}"
        elif ctx.store_error is not None:
            where = ""  # the store that knew is gone
        name = _name(ctx, r)
        if dead and r in dead:
            name += ", dead" + (f" (process {dead[r]} exited)" if dead[r] is not None else "")
            if dist.is_initialized() and dist.get_global_rank(ctx.group, r) == 0 and ctx.store_error is not None:
                name += ", the host of the c10d store"
        parts.append(name + where)
    return "; ".join(parts)


def check_usable(ctx, op: str) -> None:
    """Raises, quoting the first failure, when an exchange of the group failed before."""
    if ctx.failure is not None:
        raise RuntimeError(
            f"deepep::{op}: expected a usable process group, got group {ctx.group_name!r}, whose exchange failed "
            f"earlier; its ranks no longer agree on where they are. Destroy the Buffer, rebuild the process group "
            f"and create a new Buffer. The earlier error: {ctx.failure}")


def _fail(ctx, error: Exception) -> Exception:
    ctx.failure = str(error)
    return error


def _lost(ctx, op: str, seq: int, exc: BaseException) -> RuntimeError:
    """The error for an exchange that failed because peers died or left (see the module docstring).

    Peers known dead are named at once. Otherwise the rank records that it reached the exchange and, for a
    short grace, watches for a peer's process to go (one that is still exiting) and for the live peers to
    record themselves; then it names the peers that never did, or the store's host when the store is gone.
    """
    announce(ctx, op, seq)
    deadline = time.monotonic() + min(_GRACE_S, ctx.timeout_s)
    while True:
        dead: dict[int, int | None] = dict(dead_peers(ctx))
        for r in getattr(exc, "ranks", ()):
            dead.setdefault(r, ctx.processes[r][2] if ctx.processes else None)
        if dead:
            who = describe_peers(ctx, sorted(dead), dead)
            break
        if time.monotonic() >= deadline:
            missing = _absent(ctx, op, seq, grace_s=0.0)
            if missing is None:
                who = _store_host(ctx) if ctx.store_error is not None else "a peer it could not tell (no c10d store)"
            elif missing:
                who = describe_peers(ctx, missing)
            else:
                who = "a peer it could not tell (every rank reached the exchange)"
            break
        time.sleep(0.05)
    return RuntimeError(
        f"deepep::{op}: expected every rank of group {ctx.group_name!r} to complete exchange #{seq}, got no answer "
        f"from {who} (the transport failed: {_first_line(exc)}). The group cannot be used after this; destroy the "
        f"Buffer and rebuild the process group")


def _is_loss(ctx, exc: BaseException) -> bool:
    """Whether ``exc`` says that peers are gone (rather than being one of this package's own errors, which
    every rank raises alike and which leave the group usable)."""
    if ctx.failure is not None and str(exc) == ctx.failure:
        return False  # already converted
    if str(exc).startswith("deepep") and not isinstance(exc, TimeoutError):
        return False
    return isinstance(exc, (RuntimeError, OSError))


@contextlib.contextmanager
def guard(ctx, op: str | None = None, seq: int | None = None):
    """Turns a peer's loss seen inside the block (a transport, socket or store error, or a missing
    shared-memory segment) into the group's failure, raised as a deepep error naming the peer."""
    try:
        yield
    except Exception as exc:
        _raise_loss(ctx, op, seq, exc)
        raise


def _raise_loss(ctx, op: str | None, seq: int | None, exc: Exception) -> None:
    """Raises the group's failure naming the peer when ``exc`` is a peer's loss; returns otherwise."""
    if _is_loss(ctx, exc):
        raise _fail(ctx, _lost(ctx, op or ctx.op or "?", ctx.seq if seq is None else seq, exc)) from exc


def _timeout(ctx, op: str, seq: int, slice_s: float) -> TimeoutError:
    missing = _absent(ctx, op, seq, grace_s=2 * slice_s)
    if missing is None:
        who = _store_host(ctx) if ctx.store_error is not None else "a rank it could not tell (no c10d store)"
    elif missing:
        who = describe_peers(ctx, missing, dead_peers(ctx))
    else:
        who = "any rank in time, though every rank reached the exchange (the transport stalled)"
    return TimeoutError(
        f"deepep::{op}: expected all {ctx.num_ranks} ranks of group {ctx.group_name!r} in exchange "
        f"#{seq} within {ctx.timeout_s:g} s, got no answer from {who}. The process group cannot be "
        f"used after this; raise the timeout with Buffer(timeout_s=) or DEEP_EP_OPS_TIMEOUT_S if "
        f"the peer is only slow")


def wait(ctx, pending: Pending, op: str, seq: int) -> torch.Tensor:
    """Waits for ``pending`` at most ``ctx.timeout_s`` seconds.

    Returns:
        The exchanged tensor.

    Raises:
        TimeoutError: some peers did not reach this exchange in time; the message names them.
        RuntimeError: the transport failed (e.g. a peer process died); the message names the peers that
            died or never reached this exchange. Also when the group failed before (see :func:`check_usable`).
    """
    check_usable(ctx, op)
    deadline = time.monotonic() + ctx.timeout_s
    slice_s = min(_SLICE_S, ctx.timeout_s)
    # The first slice outside the generator-based guard: most exchanges end in it, and a decode step's ops
    # are short enough that the guard's enter and exit showed up in their host cost. Same error handling.
    try:
        if pending.poll(slice_s):
            return pending.result()
    except Exception as exc:
        _raise_loss(ctx, op, seq, exc)
        raise
    with guard(ctx, op, seq):
        announce(ctx, op, seq)
        while True:
            if time.monotonic() >= deadline:
                raise _fail(ctx, _timeout(ctx, op, seq, slice_s))
            if pending.poll(slice_s):
                return pending.result()
