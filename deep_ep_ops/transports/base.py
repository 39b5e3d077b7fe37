"""The interface every backend implements, and the shared fallbacks between its levels.

A backend moves data between the ranks of one group. The ops (checks, handshake, layouts, quantization,
ordering) are shared; a backend sees the data at up to four levels and implements the ones it can do
better than the level below. :class:`Transport` implements every level above ``rows`` on top of the one
below it, so a new backend needs only ``all_to_all``:

1. **rows** — :meth:`Transport.all_to_all`: a variable-split all-to-all of rows already expanded per
   destination. Required.
2. **tokens** — :meth:`Transport.dispatch_tokens` / :meth:`Transport.combine_tokens`: token rows with
   their destination mask (normal mode). A node-aware backend sends a token once per node and fans out
   inside it; combine reduces inside the node first. Fallback: gather per destination, then ``rows``.
3. **bounded slots** — :meth:`Transport.exchange_slots`: per (source, destination) chunks of fixed
   capacity plus the number of real rows in each (low-latency mode), so a one-sided backend moves only
   the real rows while shapes stay static. Fallback: the whole padded chunks through ``rows``, with the
   counts in a second exchange.
4. **whole op** — :meth:`Transport.override`: a vendor op that implements a whole deepep op itself (the
   Ascend ``npu_moe_distribute_*`` ops). Default: none.

Every level returns a :class:`Pending`; ``deep_ep_ops._waits.wait`` bounds how long anyone waits for it.
Received buffers are fresh tensors that the ops may hand to the caller as outputs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Protocol

import torch
import torch.distributed as dist

from .. import compute


class Pending(Protocol):
    """An exchange in flight."""

    def poll(self, timeout_s: float) -> bool:
        """Waits at most ``timeout_s`` seconds; says whether the exchange completed."""

    def result(self):
        """The received data (only after ``poll`` returned True)."""


class Done:
    """A :class:`Pending` that completed already (or whose result is computed from other pendings)."""

    def __init__(self, result, waits: tuple[Pending, ...] = (), finish: Callable | None = None):
        self._result, self._waits, self._finish = result, list(waits), finish

    def poll(self, timeout_s: float) -> bool:
        while self._waits:
            if not self._waits[0].poll(timeout_s):
                return False
            self._waits.pop(0)
        if self._finish is not None:
            self._result, self._finish = self._finish(), None
        return True

    def result(self):
        return self._result


class Resumable:
    """A :class:`Pending` around a native call that takes its budget last and returns 0 (or ``(0, ...)``) while
    its exchange is incomplete; ``check()`` runs after each slice that ran out (e.g. to tell a dead peer)."""

    def __init__(self, call: Callable, args: tuple, check: Callable[[], None]):
        self.call, self.args, self.check, self._result = call, args, check, None

    def poll(self, timeout_s: float) -> bool:
        result = self.call(*self.args, timeout_s)
        if (result[0] if isinstance(result, tuple) else result) == 0:
            self.check()
            return False
        self._result = result
        return True

    def result(self):
        return self._result


@dataclasses.dataclass
class Route:
    """One dispatch's routing, as the tokens level sees it.

    Attributes:
        is_token_in_rank: bool ``[N, R]``: this rank's token ``t`` goes to rank ``r``.
        matrix: int64 ``[R, R]``: ``[i, j]`` rows rank ``i`` sends rank ``j`` (the handshake's traffic matrix).
        rank: this rank.
        recv_src_idx: int ``[n]``: the source token of each row this rank received (combine only).
    """

    is_token_in_rank: torch.Tensor
    matrix: torch.Tensor
    rank: int
    recv_src_idx: torch.Tensor | None = None

    def counts(self, reverse: bool = False) -> tuple[list[int], list[int]]:
        """``(send counts, receive counts)`` per rank of the dispatch, or of its combine with ``reverse``."""
        sent, received = self.matrix[self.rank].tolist(), self.matrix[:, self.rank].tolist()
        return (received, sent) if reverse else (sent, received)


def exchange_device(group: dist.ProcessGroup) -> torch.device:
    """Where the group's collective backend takes its tensors (CUDA for NCCL, NPU for HCCL, else CPU)."""
    backend = str(dist.get_backend(group)).lower()
    if "nccl" in backend:
        return torch.device("cuda", torch.cuda.current_device())
    if "hccl" in backend:
        return torch.device("npu", torch.npu.current_device())  # type: ignore[attr-defined]
    return torch.device("cpu")


class Transport:
    """Base class of the backends (see the module docstring). ``name`` is the registry name."""

    name = "?"
    #: Whether :meth:`exchange_slots` carries the op's header safely without an agreement before it (a
    #: one-sided backend, where rows of a rank that disagrees can land nowhere they should not).
    carries_headers = False

    def __init__(self, ctx):
        """``ctx`` is the group's context (``deep_ep_ops._registry.GroupContext``): group, topology, kernels,
        timeout, output pool, and (while this backend is being built) the portable backend in ``ctx.transport``."""
        self.ctx = ctx
        self.group, self.kernels, self.outputs = ctx.group, ctx.kernels, ctx.outputs
        self.num_ranks, self.rank = ctx.num_ranks, ctx.rank
        #: Bytes this rank has sent to ranks of its own node and of other nodes (see :meth:`count`).
        self.bytes_sent = {"intra_node": 0, "inter_node": 0}

    def count(self, send_splits: list[int], row_bytes: int) -> None:
        """Adds one exchange's outgoing bytes to :attr:`bytes_sent` (a rank's rows to itself count nowhere)."""
        topology = self.ctx.topology
        if topology is None:
            return
        me = topology.node_of(self.rank)
        for dst, rows in enumerate(send_splits):
            if rows and dst != self.rank:
                self.bytes_sent["intra_node" if topology.node_of(dst) == me else "inter_node"] += rows * row_bytes

    @property
    def device(self) -> torch.device:
        """The device this backend exchanges tensors on."""
        return exchange_device(self.group)

    # --- level 1: rows ---------------------------------------------------------------------------------

    def all_to_all(self, send: torch.Tensor, send_splits: list[int], recv_splits: list[int]) -> Pending:
        """Rows ``[a, b)`` of ``send`` go to rank ``r`` (``a = sum(send_splits[:r])``); the result stacks
        the rows received from every rank in rank order."""
        raise NotImplementedError

    # --- level 2: tokens ---------------------------------------------------------------------------------

    def dispatch_tokens(self, rows: torch.Tensor, route: Route) -> Pending:
        """Sends token ``t``'s row to every rank ``r`` with ``route.is_token_in_rank[t, r]``.

        Args:
            rows: ``[N, ...]`` one row per token, any dtype (bytes are moved as they are).
            route: the dispatch's routing.

        Returns:
            A pending whose result is the received rows, ordered by (source rank, source token).
        """
        token = compute.destination_major_tokens(route.is_token_in_rank)
        return self.all_to_all(self.kernels.gather_rows(rows, token), *route.counts())

    def combine_tokens(self, rows: torch.Tensor, route: Route, bias: tuple[torch.Tensor | None, ...] = (),
                       out_dtype: torch.dtype | None = None) -> Pending:
        """The inverse of :meth:`dispatch_tokens`, reducing: each token's rows are summed on its source rank.

        Args:
            rows: ``[n, W]`` floating, in the receive order of the dispatch this combines.
            route: that dispatch's routing (with ``recv_src_idx``).
            bias: up to two ``[N, W]`` tensors the sum starts from.
            out_dtype: dtype of the result (default ``rows.dtype``).

        Returns:
            A pending whose result is ``[N, W]``: ``round(bias_0 + bias_1 + Σ_r row_r)`` accumulated in fp32,
            rows added in rank order, rounded once (a node-aware backend adds each remote node's rows as one
            partial sum, see its module).
        """
        pending = self.all_to_all(rows, *route.counts(reverse=True))
        token = compute.destination_major_tokens(route.is_token_in_rank)
        num_tokens = route.is_token_in_rank.shape[0]
        dtype = rows.dtype if out_dtype is None else out_dtype
        return Done(None, (pending,), lambda: self.kernels.combine_reduce(pending.result(), token, num_tokens,
                                                                          *bias, out_dtype=dtype))

    # --- level 3: bounded slots ---------------------------------------------------------------------------

    def exchange_slots(self, rows: torch.Tensor, index: torch.Tensor | None, send_caps: list[int],
                       counts: torch.Tensor, recv_caps: list[int], patch: torch.Tensor | None = None,
                       patch_offset: int = 0, header: torch.Tensor | None = None) -> Pending:
        """Chunk ``r`` of the send buffer (``send_caps[r]`` rows) goes to rank ``r``; only its first
        ``counts[r]`` rows are real. ``header[r]`` goes along with it.

        The send buffer is described, not built: its row ``j`` is ``rows[index[j]]`` (``rows[j]`` without
        ``index``), bytes ``[patch_offset, …)`` of it replaced by ``patch[j]`` when given. A one-sided backend
        copies only the real rows, straight into the destination. The op's handshake travels in ``header``,
        so that the exchange needs no round trip of its own before it.

        Args:
            rows: ``[n, B]`` uint8.
            index: int64 ``[sum(send_caps)]`` or ``None``.
            counts: int64 ``[R]`` on ``rows``' device (never read on the host here, so graphs can capture it).
            recv_caps: the capacity of the chunk each rank sends here.
            patch: uint8 ``[sum(send_caps), P]``.
            header: int64 ``[R, W]``, the same ``W`` on every rank, or ``None``.

        Returns:
            A pending whose result is ``(recv [sum(recv_caps), B], recv_counts int64 [R], recv_header [R, W] or
            None)``; rows of chunk ``s`` past ``recv_counts[s]`` are undefined.
        """
        send = rows if index is None else self.kernels.gather_rows(rows, index)
        if patch is not None:
            send = send.clone() if index is None else send
            send[:, patch_offset:patch_offset + patch.shape[1]] = patch
        ones = [1] * self.num_ranks
        pendings = [self.all_to_all(send, send_caps, recv_caps), self.all_to_all(counts.view(-1, 1).to(torch.int64),
                                                                               ones, ones)]
        if header is not None:
            pendings.append(self.all_to_all(header, ones, ones))
        return Done(None, tuple(pendings), lambda: (pendings[0].result(), pendings[1].result().view(-1),
                                                    pendings[2].result() if header is not None else None))

    # --- level 4: whole op ----------------------------------------------------------------------------

    def override(self, op: str) -> Callable | None:
        """A vendor implementation of the whole ``deepep::<op>``, called with the op's arguments."""
        return None

    def close(self) -> None:
        """Releases what the backend holds (shared memory, subgroups)."""
