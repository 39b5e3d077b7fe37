"""``all_to_all``: the portable transport, one ``torch.distributed.all_to_all_single`` per exchange.

Works on every backend (gloo, NCCL, HCCL). Payloads travel as uint8 byte rows because gloo rejects
float8 and int16 tensors. On CPU the exchange is asynchronous and polled, so a missing peer becomes a
timeout that names it instead of a hang; on accelerators the work is stream-ordered and completes
without a host wait.
"""

from __future__ import annotations

import datetime

import torch
import torch.distributed as dist


class _Pending:
    def __init__(self, work: dist.Work | None, output: torch.Tensor, stream_ordered: bool):
        self._work = work
        self._output = output
        self._done = work is None
        self._stream_ordered = stream_ordered

    def poll(self, timeout_s: float) -> bool:
        if self._done:
            return True
        if self._stream_ordered:
            self._work.wait()  # enqueues a stream wait; no host blocking
            self._done = True
            return True
        try:
            self._work.wait(timeout=datetime.timedelta(seconds=timeout_s))
        except RuntimeError as exc:
            if "timed out" in str(exc).lower():
                return False
            raise
        self._done = True
        return True

    def result(self) -> torch.Tensor:
        return self._output


class AllToAllTransport:
    """``all_to_all_single`` over the group's own backend."""

    name = "all_to_all"

    def __init__(self, group: dist.ProcessGroup):
        self.group = group

    def all_to_all(self, send: torch.Tensor, send_splits: list[int], recv_splits: list[int]) -> _Pending:
        output = send.new_empty((sum(recv_splits), *send.shape[1:]))
        if self.group.size() == 1:
            output.copy_(send)
            return _Pending(None, output, stream_ordered=False)
        work = dist.all_to_all_single(
            output, send.contiguous(), recv_splits, send_splits, group=self.group, async_op=True
        )
        return _Pending(work, output, stream_ordered=send.device.type != "cpu")
