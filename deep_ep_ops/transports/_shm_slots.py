"""The bounded-slot level of the ``shm`` backend: low-latency exchanges through per-(source, half) slots.

A sender writes the header of the op (when it has one) and only its real rows, straight into each
destination's slot, then publishes the count and the exchange number (protocol: ``_shm_engine``). At most
two exchanges are in flight (the two halves, DeepEP's double buffer): starting one reads out, first, the
one that used its half before, even if nobody asks for it any more (a receive hook never called).

Slots are sized from ``num_rdma_bytes``; when that is 0 they grow to what exchanges need. A rank whose rows
would not fit sends its header and a negative count (``-bytes needed``) instead of rows. Every rank reads
every header, so every rank then knows the same largest need: with ``num_rdma_bytes`` given they all raise
the same error naming the size needed; else they all grow the slots and send the exchange again.
"""

from __future__ import annotations

import torch

from .. import _waits
from .._wire import dense
from . import _shm_engine


class SlotExchange:
    """One exchange of :meth:`~deep_ep_ops.transports.base.Transport.exchange_slots` on a ``ShmTransport``."""

    def __init__(self, slots: Slots, rows, index, send_caps, counts, recv_caps, patch, patch_offset, header):
        self.slots, self.t = slots, slots.t
        self.rows, self.index, self.patch, self.patch_offset = dense(rows).contiguous(), index, patch, patch_offset
        self.send_caps, self.recv_caps, self.real_counts = send_caps, recv_caps, counts.tolist()
        self.header = header
        self.header_bytes = 0 if header is None else (header.shape[1] * 8 + 63) // 64 * 64
        self.row_bytes = rows.shape[1]
        self.recv_header = None if header is None else torch.empty_like(header)
        self.out = self.t.outputs.empty((sum(recv_caps), self.row_bytes), torch.uint8)
        self.done, self._result = False, None
        self._start()

    def _start(self) -> None:
        """Sends this exchange (under a new exchange number): rows if they fit, else a request for room."""
        slots, num_ranks = self.slots, self.t.num_ranks
        self.seq = slots.next_seq()
        need = self.header_bytes + max(max(self.send_caps), max(self.recv_caps)) * self.row_bytes
        self.counts = self.real_counts if need <= slots.bytes else [-need] * num_ranks
        self.recv_counts = torch.full((num_ranks,), -1, dtype=torch.int64)
        self.sent = torch.zeros(num_ranks, dtype=torch.int64)
        self.sent_all = False
        self.segments = [s.tensor for s in slots.segments]
        self.geometry = [_shm_engine.slot_base(num_ranks), slots.bytes, self.header_bytes]
        self.step(0.0)  # send now, so that peers can receive while this rank goes on (the receive hooks)

    def step(self, budget_s: float) -> bool:
        k, t = self.t.kernels, self.t
        if not self.sent_all:
            self.sent_all = bool(k.slots_send(self.segments, self.geometry, self.seq, self.rows, self.index, self.patch,
                                              self.patch_offset, self.header, self.send_caps, self.counts, t.rank,
                                              self.sent, budget_s))
            if not self.sent_all:
                return False
        if not k.slots_recv(self.segments, self.geometry, self.seq, self.rows, self.index, self.patch,
                            self.patch_offset, self.header, self.send_caps, self.counts, self.out, self.recv_counts,
                            self.recv_header, self.recv_caps, t.rank, budget_s):
            return False
        smallest = int(self.recv_counts.min())
        if smallest < -1:  # some rank's rows did not fit: every rank saw the same requests (-1 - need)
            self.slots.grow(-1 - smallest, self)
            self._start()
            return False
        return True

    def poll(self, timeout_s: float) -> bool:
        if not self.done:
            self.done = self.step(timeout_s)
            if not self.done:
                self.t.check_peers()
        return self.done

    def result(self):
        return self.out, self.recv_counts, self.recv_header


class Slots:
    """The slot segments of one ``ShmTransport`` and the exchanges in flight through them."""

    def __init__(self, transport):
        self.t = transport
        self.segments: list = []
        self.bytes, self.generation, self.seq = 0, 0, 0
        self.pending: list[SlotExchange] = []
        fixed = transport.ctx.num_rdma_bytes
        if fixed:
            self.bytes = (fixed - _shm_engine.slot_base(transport.num_ranks)) // (2 * transport.num_ranks) // 64 * 64

    def map(self, slot_bytes: int) -> None:
        """(Re)creates every rank's slot segment with ``slot_bytes`` per (source, half): collective."""
        for pending in self.pending:  # whatever is in the old slots is read out first
            if not pending.done:
                _waits.wait(self.t.ctx, pending, self.t.ctx.op or "shm slots", pending.seq)
        old = self.segments
        self.generation += 1
        num_ranks, seq = self.t.num_ranks, self.seq

        def init(segment: torch.Tensor) -> None:
            # Exchange numbers go on across segments: both halves count as read up to the last one so far.
            words = segment[:_shm_engine.slot_base(num_ranks)].view(torch.int64)
            for source in range(num_ranks):
                for half in (0, 1):
                    words[_shm_engine.slot_consumed(source, half)] = seq

        self.segments = self.t.map_segments("l", _shm_engine.slot_segment_bytes(num_ranks, slot_bytes),
                                            self.generation, init=init)
        self.bytes = slot_bytes
        for segment in old:
            segment.close()

    def grow(self, need: int, current: SlotExchange) -> None:
        """Every rank, on reading the same requests: the size error, or bigger slots (then the exchange reruns)."""
        fixed = self.t.ctx.num_rdma_bytes
        if fixed:
            required = _shm_engine.slot_segment_bytes(self.t.num_ranks, (need + 63) // 64 * 64)
            raise RuntimeError(f"deepep: expected num_rdma_bytes >= {required} (bounded slots that hold this "
                               f"low-latency exchange), got {fixed}")
        self.pending = [p for p in self.pending if p is not current]
        self.map(max(2 * need, 1 << 20) // 64 * 64)
        self.pending.append(current)

    def exchange(self, *args) -> SlotExchange:
        # Mapping the slots and reading out older exchanges wait for peers too: a dead one fails the op here.
        with _waits.guard(self.t.ctx):
            if not self.segments:
                self.map(self.bytes if self.t.ctx.num_rdma_bytes else 1 << 20)
            exchange = SlotExchange(self, *args)
        self.track(exchange)
        return exchange

    def next_seq(self) -> int:
        """The next exchange number, once the exchange that used its half before is read out (a receive hook
        never called still holds it)."""
        self.seq += 1
        self.drain(self.seq - 2)
        return self.seq

    def track(self, exchange) -> None:
        """Keeps ``exchange`` (anything with ``seq``, ``done`` and ``poll``) until it is done, so that reusing its
        half, or remapping the slots, reads it out first."""
        self.pending = [p for p in self.pending if not p.done] + [exchange]

    def drain(self, seq: int) -> None:
        """Reads out every exchange numbered ``seq`` or less that is still in flight."""
        for pending in self.pending:
            if pending.seq <= seq and not pending.done:
                _waits.wait(self.t.ctx, pending, self.t.ctx.op or "shm slots", seq)

    def close(self) -> None:
        for segment in self.segments:
            segment.close()
        self.segments = []
