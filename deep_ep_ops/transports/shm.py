"""``shm``: ranks of one host exchange rows through POSIX shared memory (DeepEP's NVLink buffer, on CPU).

Each rank creates its receive segments and maps its peers' (see ``_segments``): a ring segment for the
normal-mode levels (``rows`` and ``tokens``), sized from ``num_nvl_bytes``, and a slot segment for the
low-latency level (``bounded slots``), sized from ``num_rdma_bytes`` (or, when that is 0, to what the first
exchange needs, growing when a later one needs more). Senders write rows straight into the receiver's
segment; readiness is signalled by monotonic counters (the protocol is in ``_shm_engine``). The copy loops
are private ops: the C++ kernels of ``csrc/shm.cpp``, or their pure-torch versions in ``_shm_engine``.

Exchanges are collective and run in the same order on every rank, so each is queued and driven in order:
waiting for one first completes the ones before it. Every wait is a bounded :class:`Pending` poll, and a
dead peer (its process gone) is reported as soon as a wait on it runs out of its slice.
"""

from __future__ import annotations

import atexit
import math
import os
import secrets
import time
import weakref

import torch
from torch.multiprocessing.reductions import StorageWeakRef

from .. import _waits, compute
from .._wire import dense
from . import _segments, _shm_engine, _shm_low_latency, _shm_normal, _shm_slots
from .base import Transport

#: Ring bytes per source when ``num_nvl_bytes`` is 0: small enough that what a sender writes is still in the
#: shared cache when its receiver reads it (a combine of 4096 x 7168 bf16 rows at 2 ranks: 33 ms with 8 MB
#: rings, 26-29 ms with 2 MB; 1 MB stalls the senders, 45 ms), big enough for bursts.
DEFAULT_RING_BYTES = 2 << 20


def unavailable(topology, group) -> str | None:
    """``shm`` needs every rank of the group on this host, CPU tensors, and ``/dev/shm``."""
    if topology is None or not topology.single_host:
        return "its ranks are not all on one host (they must share /dev/shm)"
    if "nccl" in str(torch.distributed.get_backend(group)).lower():
        return "it moves CPU tensors, and this group's backend is NCCL"
    if not os.path.isdir(_segments.SHM_DIR):
        return f"{_segments.SHM_DIR} does not exist"
    return None


def _as_rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` ``[n, ...]`` as contiguous uint8 rows ``[n, bytes per row]``."""
    width = math.prod(t.shape[1:]) * t.element_size()
    if t.numel() == 0:
        return torch.empty(t.shape[0], width, dtype=torch.uint8)
    return dense(t).contiguous().view(torch.uint8).view(t.shape[0], width)


def _close_at_exit(ref) -> None:
    transport = ref()
    if transport is not None:
        transport.close()


class _Waiter:
    """Spin briefly, then yield the core; ``expired()`` once ``budget_s`` has passed."""

    def __init__(self, budget_s: float):
        self.deadline, self.spins = time.monotonic() + budget_s, 0

    def expired(self) -> bool:
        self.spins += 1
        if self.spins > 64:
            os.sched_yield()
        return time.monotonic() >= self.deadline


class _OutputBlocks:
    """Output buffers in shared memory, so that peers can write a dispatch's rows straight into them.

    Like ``deep_ep_ops._outputs.OutputPool``: a block belongs to the output tensor made from it until the
    caller drops that tensor, then serves the next output; blocks stay mapped, so reuse costs no page
    faults. A block's name stays under ``/dev/shm`` while it lives, since peers map blocks as they first
    meet them; it carries this process's id, so a crash leaves nothing that ``_segments.remove_stale``
    would not remove.
    """

    def __init__(self, transport: ShmTransport):
        self.transport = transport
        self._free: dict[int, list[_segments.Segment]] = {}
        self._busy: list[tuple[StorageWeakRef, _segments.Segment]] = []
        self._peers: dict[tuple[int, int], _segments.Segment] = {}
        self._count = 0

    def empty(self, nbytes: int) -> tuple[_segments.Segment, torch.Tensor]:
        """A block of at least ``nbytes`` and a uint8 tensor over its first ``nbytes`` that the caller owns."""
        busy = []
        for ref, block in self._busy:
            (self._free.setdefault(block.size, []).append(block) if ref.expired() else busy.append((ref, block)))
        self._busy = busy
        size = max(1 << 16, 1 << (max(nbytes, 1) - 1).bit_length())
        if self._free.get(size):
            block = self._free[size].pop()
        else:
            t = self.transport
            block = _segments.Segment(_segments.name(os.getpid(), t.run, t.rank, "o", self._count), size, create=True)
            block.index = self._count
            self._count += 1
        out = torch.frombuffer(block.mapping, dtype=torch.uint8, count=max(nbytes, 1))
        self._busy.append((StorageWeakRef(out.untyped_storage()), block))
        return block, out

    def peer(self, rank: int, index: int, size: int) -> torch.Tensor:
        """Rank ``rank``'s output block ``index``, mapped here on first use."""
        key = (rank, index)
        if key not in self._peers:
            t = self.transport
            self._peers[key] = _segments.Segment(_segments.name(t.pids[rank], t.run, rank, "o", index), size,
                                                 create=False, timeout_s=t.ctx.timeout_s, what=f"rank {rank}",
                                                 check=t.check_peers)
        return self._peers[key].tensor

    def close(self) -> None:
        for segment in self._peers.values():
            segment.close()
        for _, block in self._busy:
            _segments.unlink(block.name)
        for blocks in self._free.values():
            for block in blocks:
                _segments.unlink(block.name)
                block.close()
        self._peers, self._free, self._busy = {}, {}, []


class _Exchange:
    """One queued exchange: ``step(budget_s)`` advances it and says whether it is complete."""

    def __init__(self, transport: ShmTransport, step, result):
        self.transport, self.step, self._result, self.done = transport, step, result, False

    def poll(self, timeout_s: float) -> bool:
        return self.transport._drive(self, timeout_s)

    def result(self):
        return self._result() if callable(self._result) else self._result


class ShmTransport(Transport):
    """Shared-memory rings and slots between the ranks of one host."""

    name = "shm"
    carries_headers = True

    def __init__(self, ctx):
        super().__init__(ctx)
        _segments.remove_stale()
        run = secrets.randbits(48) if self.rank == 0 else 0
        info = self._bootstrap(torch.tensor([run, os.getpid()], dtype=torch.int64))
        self.run, self.pids = int(info[0, 0]), [int(p) for p in info[:, 1]]
        self.ring_bytes = DEFAULT_RING_BYTES
        if ctx.num_nvl_bytes:
            self.ring_bytes = (ctx.num_nvl_bytes - _shm_engine.ring_base(self.num_ranks)) // self.num_ranks // 64 * 64
        with _waits.guard(ctx, "Buffer", 0):
            self._rings = self.map_segments("n", _shm_engine.ring_segment_bytes(self.num_ranks,
                                                                                max(self.ring_bytes, 0)),
                                            0, via_bootstrap=True)
        self._ring_geometry = [_shm_engine.ring_base(self.num_ranks), self.ring_bytes]
        self._mirror = torch.zeros(2 * self.num_ranks, dtype=torch.int64)
        self._queue: list[_Exchange] = []
        self._slots = _shm_slots.Slots(self)
        self._low_latency = _shm_low_latency.LowLatency(self)
        self._normal = _shm_normal.Normal(self)
        self._blocks = _OutputBlocks(self)
        self._direct_seq = 0
        # Names that stay under /dev/shm while this backend lives (its output blocks) go at interpreter exit
        # too, when nobody destroyed the Buffer; a crash is cleaned up by _segments.remove_stale.
        atexit.register(_close_at_exit, weakref.ref(self))

    # --- setup ---------------------------------------------------------------------------------------------

    def _bootstrap(self, mine: torch.Tensor) -> torch.Tensor:
        """Every rank's ``mine`` (``[R, W]``), exchanged over the portable backend this one replaces."""
        ones = [1] * self.num_ranks
        rows = mine.expand(self.num_ranks, -1).contiguous()
        return _waits.wait(self.ctx, self.ctx.transport.all_to_all(rows, ones, ones), "Buffer", 0)

    def map_segments(self, kind: str, size: int, generation: int, via_bootstrap: bool = False, init=None) -> list:
        """Creates this rank's segment (``init(tensor)`` fills it before any peer may look), maps every peer's,
        waits until all are mapped, then unlinks the name."""
        names = [_segments.name(pid, self.run, r, kind, generation) for r, pid in enumerate(self.pids)]
        segments: list = [None] * self.num_ranks
        try:
            segments[self.rank] = _segments.Segment(names[self.rank], size, create=True)
            if init is not None:
                init(segments[self.rank].tensor)
            for r in range(self.num_ranks):
                if r != self.rank:
                    segments[r] = _segments.Segment(names[r], size, create=False, timeout_s=self.ctx.timeout_s,
                                                    what=f"rank {r}", check=self.check_peers)
            flag = torch.ones(1, dtype=torch.int64)
            if via_bootstrap:
                self._bootstrap(flag)
            else:
                ones = [1] * self.num_ranks
                _waits.wait(self.ctx, self.all_to_all(flag.expand(self.num_ranks, 1).contiguous(), ones, ones),
                            "shm setup", 0)
        finally:
            _segments.unlink(names[self.rank])
        return segments

    def override(self, op: str):
        """Normal dispatch, cached dispatch and combine (``_shm_normal``) and the low-latency ops
        (``_shm_low_latency``) in native calls."""
        if op == "dispatch":
            return self._normal.dispatch
        if op == "dispatch.cached":
            return self._normal.cached_dispatch
        if op == "combine":
            return self._normal.combine
        if op.startswith("low_latency_"):  # dispatch, combine, and their send and receive halves (hooks)
            return getattr(self._low_latency, op.removeprefix("low_latency_"))
        return None

    def close(self) -> None:
        """Unlinks and unmaps everything this backend made (idempotent), and what peers that died left behind."""
        self._blocks.close()
        self._slots.close()
        for segment in self._rings:
            segment.close()
        self._rings = []
        _segments.remove_stale(self.run)

    # --- driving ---------------------------------------------------------------------------------------

    def _drive(self, exchange: _Exchange, timeout_s: float) -> bool:
        """Advances the queue in order up to ``exchange``; raises naming a peer whose process is gone."""
        while not exchange.done:
            head = self._queue[0] if self._queue and exchange in self._queue else exchange
            if not head.step(timeout_s):
                self.check_peers()
                return False
            head.done = True
            if head in self._queue:
                self._queue.remove(head)
        return True

    def check_peers(self) -> None:
        """Raises :class:`~deep_ep_ops._waits.PeerLost` when a peer's process is gone, after removing the
        segment names it left (nobody else would until the next Buffer on this host)."""
        dead = [r for r, pid in enumerate(self.pids) if r != self.rank and not _segments._alive(pid)]
        if dead:
            _segments.remove_stale(self.run)
            raise _waits.PeerLost(dead, "; ".join(f"rank {r} (pid {self.pids[r]}) exited" for r in dead)
                                  + " while this rank was waiting for it in shared memory")

    def _enqueue(self, step, result) -> _Exchange:
        exchange = _Exchange(self, step, result)
        self._queue.append(exchange)
        return exchange

    def _segments(self, group: list) -> list[torch.Tensor]:
        return [s.tensor for s in group]

    # --- level 1 and 2: rings ---------------------------------------------------------------------------

    def _check_ring(self, row_bytes: int) -> None:
        if row_bytes > self.ring_bytes:
            need = _shm_engine.ring_segment_bytes(self.num_ranks, (row_bytes + 63) // 64 * 64)
            raise RuntimeError(f"deepep: expected num_nvl_bytes >= {need} (a ring per rank that holds one "
                               f"{row_bytes}-byte row), got {self.ctx.num_nvl_bytes}")

    def _copy(self, src: torch.Tensor, index: torch.Tensor | None, send_counts: list[int], recv_counts: list[int],
              dtype: torch.dtype, tail: tuple[int, ...]) -> _Exchange:
        self._check_ring(src.shape[1])
        total = sum(recv_counts)
        out = self.outputs.empty((total, src.shape[1]), torch.uint8)
        cursor = torch.zeros(2 * self.num_ranks, dtype=torch.int64)
        segments = self._segments(self._rings)

        def step(budget_s: float) -> bool:
            return bool(self.kernels.ring_copy(segments, self._ring_geometry, self._mirror, cursor, src, index,
                                               send_counts, out, recv_counts, self.rank, budget_s))

        return self._enqueue(step, lambda: out.view(dtype).view(total, *tail))

    def all_to_all(self, send, send_splits, recv_splits):
        self.count(send_splits, math.prod(send.shape[1:]) * send.element_size())
        return self._copy(_as_rows(send), None, send_splits, recv_splits, send.dtype, tuple(send.shape[1:]))

    def dispatch_tokens(self, rows, route):
        """Direct: each sender writes its rows straight into the receiver's output (see ``_shm_engine``)."""
        src = _as_rows(rows)
        token = compute.destination_major_tokens(route.is_token_in_rank)
        send_counts, recv_counts = route.counts()
        self.count(send_counts, src.shape[1])
        self._direct_seq += 1
        seq, num_ranks, row_bytes = self._direct_seq, self.num_ranks, src.shape[1]
        total = sum(recv_counts)
        block, out = self._blocks.empty(total * row_bytes)
        send_off = [sum(send_counts[:d]) for d in range(num_ranks)]
        recv_off = [sum(recv_counts[:s]) for s in range(num_ranks)]
        mine = self._rings[self.rank].tensor[:self._ring_geometry[0]].view(torch.int64)
        state = {"published": False, "sent": [d == self.rank for d in range(num_ranks)]}

        def copy_rows(dst: torch.Tensor, d: int) -> None:
            n = send_counts[d]
            if n:
                self.kernels.gather_rows_into(dst.view(n, row_bytes), src, token[send_off[d]:send_off[d] + n])

        def step(budget_s: float) -> bool:
            if not state["published"]:
                first = recv_off[self.rank] * row_bytes
                copy_rows(out[first:first + send_counts[self.rank] * row_bytes], self.rank)
                for s in range(num_ranks):
                    word = _shm_engine.landing(s)
                    mine[word + 1], mine[word + 2], mine[word + 3] = block.index, block.size, recv_off[s] * row_bytes
                    mine[word] = seq  # last: a sender that sees the number sees the rest
                state["published"] = True
            waiter = _Waiter(budget_s)
            while True:
                for d in range(num_ranks):
                    if state["sent"][d]:
                        continue
                    peer = self._rings[d].tensor[:self._ring_geometry[0]].view(torch.int64)
                    word = _shm_engine.landing(self.rank)
                    if int(peer[word]) != seq:
                        continue
                    target = self._blocks.peer(d, int(peer[word + 1]), int(peer[word + 2]))
                    offset = int(peer[word + 3])
                    copy_rows(target[offset:offset + send_counts[d] * row_bytes], d)
                    peer[_shm_engine.delivered(self.rank)] = seq
                    state["sent"][d] = True
                if all(state["sent"]) and all(s == self.rank or int(mine[_shm_engine.delivered(s)]) == seq
                                              for s in range(num_ranks)):
                    return True
                if waiter.expired():
                    return False

        return self._enqueue(step, lambda: out[:total * row_bytes].view(rows.dtype).view(total, *rows.shape[1:]))

    def combine_tokens(self, rows, route, bias=(), out_dtype=None):
        send_counts, recv_counts = route.counts(reverse=True)
        is_token_in_rank = route.is_token_in_rank
        rows = dense(rows).contiguous()
        self.count(send_counts, math.prod(rows.shape[1:]) * rows.element_size())
        self._check_ring(math.prod(rows.shape[1:]) * rows.element_size())
        bias = tuple(bias) + (None,) * (2 - len(bias))
        num_tokens, width = is_token_in_rank.shape[0], rows.shape[1]
        out = self.outputs.empty((num_tokens, width), rows.dtype if out_dtype is None else out_dtype)
        cursor = torch.zeros(3 * self.num_ranks + 2, dtype=torch.int64)  # see csrc/shm.cpp, ring_combine
        segments, scratch = self._segments(self._rings), {}
        token_in_rank = is_token_in_rank.contiguous()

        def step(budget_s: float) -> bool:
            return bool(self.kernels.ring_combine(segments, self._ring_geometry, self._mirror, cursor, rows,
                                                  send_counts, recv_counts, token_in_rank, bias[0], bias[1], out,
                                                  self.rank, budget_s, scratch))

        return self._enqueue(step, out)

    # --- level 3: slots (see _shm_slots) --------------------------------------------------------------------

    def exchange_slots(self, rows, index, send_caps, counts, recv_caps, patch=None, patch_offset=0, header=None):
        return self._slots.exchange(rows, index, send_caps, counts, recv_caps, patch, patch_offset, header)
