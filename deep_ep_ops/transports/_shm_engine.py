"""The shared-memory protocol, and its pure-torch implementation (the fallback and oracle of ``csrc/shm.cpp``).

**Rings (normal mode).** Rank ``r``'s normal segment holds one ring per source ``s`` plus two counters per
source, each on its own cache line: ``written[s]`` (bytes ``s`` has written into its ring here, ever) and
``consumed[s]`` (bytes ``r`` has read out of it, ever). Both only grow, so a value is never ambiguous across
back-to-back exchanges and no flag is ever reset. Every exchange is collective and in the same order on
every rank, so each ring carries the exchanges' rows in order as one byte stream. A row never straddles
the end of a ring: when one would, both sides skip to the start (the skipped bytes count in both counters).
Senders write whole rows into the destination's ring as space allows, then publish ``written``; receivers
copy (or reduce) whole rows out, then publish ``consumed``. A rank drives its sends and its receives in
one loop, so no rank waits on a peer that waits on it.

**Direct (normal dispatch).** The receiver allocates the output of a dispatch in shared memory (an output
block, reused once the caller drops the tensor, see ``shm.py``) and publishes, per source, where that
source's rows go (``landing``: exchange number, block, offset). Each sender writes its rows straight there
and publishes ``delivered``. One copy per row, no flow control: the block holds them all.

**Slots (low-latency).** Rank ``r``'s low-latency segment holds, per source and per half (exchange
number parity), a bounded slot area and three words: ``stamp`` (the exchange number of the data there),
``count`` (its real rows) and ``consumed`` (the last exchange number ``r`` read out of it). A sender waits
until the half it needs was read two exchanges ago, writes only its real rows and their count, then
publishes the stamp. Two exchanges may be in flight at once (DeepEP's double buffer), for the receive hooks.

Counters are aligned 8-byte words: on x86 a plain store and load of one is atomic, and stores are seen in
program order, so a reader that sees a counter also sees the rows written before it. The C++ engine uses
release stores and acquire loads. Waits yield the core (4 ranks may share 2 cores): spin briefly, then
``sched_yield``.
"""

from __future__ import annotations

import os
import time

import torch

LINE = 64  # bytes per control line
CTRL_WORDS_PER_SOURCE = 16  # two lines: [written, delivered | ...] (the sender's) [consumed, landing | ...] (mine)


def ring_base(num_ranks: int) -> int:
    """Byte offset of the first ring: the header line, then two lines per source, page aligned."""
    return (LINE + num_ranks * 2 * LINE + 4095) // 4096 * 4096


def ring_segment_bytes(num_ranks: int, ring_bytes: int) -> int:
    return ring_base(num_ranks) + num_ranks * ring_bytes


def _written(source: int) -> int:
    return 8 + CTRL_WORDS_PER_SOURCE * source


def _consumed(source: int) -> int:
    return 8 + CTRL_WORDS_PER_SOURCE * source + 8


def delivered(source: int) -> int:
    """Word of the last direct exchange ``source`` has delivered here (written by ``source``)."""
    return _written(source) + 1


def landing(source: int) -> int:
    """First of four words, written by the receiver: ``[seq, block id, block bytes, byte offset]`` of where
    ``source`` may write its rows of direct exchange ``seq``."""
    return _consumed(source) + 1


def slot_base(num_ranks: int) -> int:
    """Byte offset of the first slot: the header line, then two lines per (source, half), page aligned."""
    return (LINE + num_ranks * 2 * 2 * LINE + 4095) // 4096 * 4096


def slot_segment_bytes(num_ranks: int, slot_bytes: int) -> int:
    return slot_base(num_ranks) + num_ranks * 2 * slot_bytes


def _stamp(source: int, half: int) -> int:
    return 8 + CTRL_WORDS_PER_SOURCE * (2 * source + half)


def slot_consumed(source: int, half: int) -> int:
    """Word of the last exchange number read out of ``source``'s slot ``half`` (written by the receiver)."""
    return _stamp(source, half) + 8


def _yield(spins: int) -> int:
    if spins > 64:
        os.sched_yield()
    return spins + 1


def _run(position: int, consumed_or_written: int, row_bytes: int, ring_bytes: int, remaining: int, sending: bool):
    """The next contiguous run of rows at stream ``position``: ``(position after a skip, rows)``.

    A sender may write while ``position + rows * row_bytes - consumed <= ring_bytes``; a receiver may read
    while ``position + rows * row_bytes <= written``.
    """
    offset = position % ring_bytes
    if offset + row_bytes > ring_bytes:
        if sending and consumed_or_written >= position:
            # Every row written was read, so the skipped tail is free as well; without this, a ring holding
            # fewer than two rows of this size after a run of another size waits for bytes nobody reads.
            consumed_or_written = position + ring_bytes - offset
        position += ring_bytes - offset
        offset = 0
    limit = (consumed_or_written + ring_bytes - position) if sending else (consumed_or_written - position)
    return position, max(0, min(remaining, (ring_bytes - offset) // row_bytes, limit // row_bytes))


def ring_copy(segments: list[torch.Tensor], geometry: list[int], mirror: torch.Tensor, cursor: torch.Tensor,
              src: torch.Tensor, index: torch.Tensor | None, send_counts: list[int], out: torch.Tensor,
              recv_counts: list[int], rank: int, budget_s: float) -> int:
    """Moves this rank's part of one exchange through the rings; returns 1 when it is complete.

    Args:
        segments: every rank's ring segment (uint8), this rank's own at ``rank``.
        geometry: ``[ring_base, ring_bytes]``.
        mirror: int64 ``[2R]``, persistent: bytes this rank has written into each peer's ring for it, and bytes
            it has consumed from each of its own rings.
        cursor: int64 ``[2R]``, zeros at the start of the exchange: rows sent to each rank, received from each.
        src: uint8 ``[N, B]``; outgoing row ``j`` (destination-major, ``send_counts`` per rank) is
            ``src[index[j]]`` (``src[j]`` without ``index``).
        out: uint8 ``[sum(recv_counts), B]``: rows from rank ``s`` land at ``sum(recv_counts[:s])`` on.
        budget_s: how long to try before returning 0.
    """
    base, ring_bytes = geometry
    num_ranks, row_bytes = len(segments), src.shape[1]
    send_off = [sum(send_counts[:d]) for d in range(num_ranks)]
    recv_off = [sum(recv_counts[:s]) for s in range(num_ranks)]
    mine = segments[rank][:base].view(torch.int64)
    deadline, spins = time.monotonic() + budget_s, 0
    while True:
        moved = False
        for d in range(num_ranks):
            done = int(cursor[d])
            if done >= send_counts[d]:
                continue
            rows = index[send_off[d] + done:send_off[d] + send_counts[d]] if index is not None else None
            if d == rank:
                n = send_counts[d]
                chunk = src[rows] if rows is not None else src[send_off[d]:send_off[d] + n]
                out[recv_off[d]:recv_off[d] + n] = chunk
                cursor[d] = cursor[num_ranks + d] = n
                moved = True
                continue
            peer = segments[d][:base].view(torch.int64)
            position, n = _run(int(mirror[d]), int(peer[_consumed(rank)]), row_bytes, ring_bytes,
                               send_counts[d] - done, sending=True)
            if n:
                offset = base + rank * ring_bytes + position % ring_bytes
                chunk = src[rows[:n]] if rows is not None else src[send_off[d] + done:send_off[d] + done + n]
                segments[d][offset:offset + n * row_bytes].view(n, row_bytes).copy_(chunk)
                mirror[d] = position + n * row_bytes
                peer[_written(rank)] = position + n * row_bytes
                cursor[d] = done + n
                moved = True
        for s in range(num_ranks):
            done = int(cursor[num_ranks + s])
            if s == rank or done >= recv_counts[s]:
                continue
            position, n = _run(int(mirror[num_ranks + s]), int(mine[_written(s)]), row_bytes, ring_bytes,
                               recv_counts[s] - done, sending=False)
            if n:
                offset = base + s * ring_bytes + position % ring_bytes
                out[recv_off[s] + done:recv_off[s] + done + n] = segments[rank][offset:offset + n * row_bytes].view(
                    n, row_bytes)
                mirror[num_ranks + s] = position + n * row_bytes
                mine[_consumed(s)] = position + n * row_bytes
                cursor[num_ranks + s] = done + n
                moved = True
        if all(int(cursor[d]) >= send_counts[d] for d in range(num_ranks)) and \
                all(int(cursor[num_ranks + s]) >= recv_counts[s] for s in range(num_ranks)):
            return 1
        if not moved:
            if time.monotonic() >= deadline:
                return 0
            spins = _yield(spins)


def slots_send(segments: list[torch.Tensor], geometry: list[int], seq: int, rows: torch.Tensor,
               index: torch.Tensor | None, patch: torch.Tensor | None, patch_offset: int, header: torch.Tensor | None,
               send_caps: list[int], counts: list[int], rank: int, sent: torch.Tensor, budget_s: float) -> int:
    """Writes this rank's part of slot exchange ``seq`` into every peer's slots; 1 when all are sent.

    Outgoing chunk ``d`` holds ``send_caps[d]`` rows of which the first ``counts[d]`` are real; its row ``j``
    is ``rows[index[o_d + j]]`` (``rows[o_d + j]`` without ``index``), with ``patch[o_d + j]`` written over its
    bytes from ``patch_offset`` when given. ``header[d]`` (int64 words) goes first in the slot, when given. A
    negative ``counts[d]`` sends the header and that count only (the transport uses it to ask for bigger
    slots). ``sent`` (int64 ``[R]``) marks the peers done so far; this rank's own chunk is left to
    :func:`slots_recv`. ``geometry`` is ``[slot_base, slot_bytes, header_bytes]``.
    """
    base, slot_bytes, header_bytes = geometry
    num_ranks = len(segments)
    half = seq % 2
    deadline, spins = time.monotonic() + budget_s, 0
    while True:
        for d in range(num_ranks):
            if d == rank or int(sent[d]):
                continue
            ctrl = segments[d][:base].view(torch.int64)
            word = _stamp(rank, half)
            if int(ctrl[word + 8]) < seq - 2:  # the receiver has not read what this half held before
                continue
            offset = base + (rank * 2 + half) * slot_bytes
            if header is not None:
                segments[d][offset:offset + header.shape[1] * 8].copy_(header[d].view(torch.uint8))
            if counts[d] > 0:
                chunk = _chunk_rows(rows, index, patch, patch_offset, sum(send_caps[:d]), counts[d])
                segments[d][offset + header_bytes:offset + header_bytes + chunk.numel()].copy_(chunk.flatten())
            ctrl[word + 1] = counts[d]
            ctrl[word] = seq
            sent[d] = 1
        if all(int(sent[d]) or d == rank for d in range(num_ranks)):
            return 1
        if time.monotonic() >= deadline:
            return 0
        spins = _yield(spins)


def _chunk_rows(rows, index, patch, patch_offset: int, first: int, n: int) -> torch.Tensor:
    chunk = rows[index[first:first + n]] if index is not None else rows[first:first + n].clone()
    if patch is not None:
        chunk[:, patch_offset:patch_offset + patch.shape[1]] = patch[first:first + n]
    return chunk


def slots_recv(segments: list[torch.Tensor], geometry: list[int], seq: int, rows: torch.Tensor,
               index: torch.Tensor | None, patch: torch.Tensor | None, patch_offset: int, header: torch.Tensor | None,
               send_caps: list[int], counts: list[int], out: torch.Tensor, recv_counts: torch.Tensor,
               recv_header: torch.Tensor | None, recv_caps: list[int], rank: int, budget_s: float) -> int:
    """Reads slot exchange ``seq`` from every source: rows into ``out`` (``recv_caps`` rows per source, the
    first ``recv_counts[s]`` real, the rest left as they were) and headers into ``recv_header``; this rank's
    own part comes straight from ``rows`` and ``header``. ``recv_counts[s]`` is ``-1`` until source ``s`` is
    read (``-1 - n`` for a source that sent a header and count ``-n`` only)."""
    base, slot_bytes, header_bytes = geometry
    num_ranks, row_bytes = len(segments), out.shape[1]
    half = seq % 2
    mine = segments[rank][:base].view(torch.int64)
    deadline, spins = time.monotonic() + budget_s, 0
    while True:
        for s in range(num_ranks):
            if int(recv_counts[s]) != -1:
                continue
            o = sum(recv_caps[:s])
            if s == rank:
                n = counts[rank]
                if recv_header is not None:
                    recv_header[s] = header[s]
                if n > 0:
                    out[o:o + n] = _chunk_rows(rows, index, patch, patch_offset, sum(send_caps[:rank]), n)
                recv_counts[s] = n if n >= 0 else -1 + n
                continue
            word = _stamp(s, half)
            if int(mine[word]) != seq:
                continue
            n = int(mine[word + 1])
            offset = base + (s * 2 + half) * slot_bytes
            if recv_header is not None:
                recv_header[s] = segments[rank][offset:offset + recv_header.shape[1] * 8].view(torch.int64)
            # Never more than this rank has room for, whatever the sender claims: a sender that disagrees on
            # the settings is reported by the header check, after this copy.
            fit = min(n, recv_caps[s], (slot_bytes - header_bytes) // max(row_bytes, 1))
            if fit > 0:
                out[o:o + fit] = segments[rank][offset + header_bytes:offset + header_bytes + fit * row_bytes].view(
                    fit, row_bytes)
            mine[word + 8] = seq
            recv_counts[s] = n if n >= 0 else -1 + n
        if bool((recv_counts != -1).all()):
            return 1
        if time.monotonic() >= deadline:
            return 0
        spins = _yield(spins)
