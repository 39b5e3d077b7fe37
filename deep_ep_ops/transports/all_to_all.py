"""``all_to_all``: the portable backend, one ``torch.distributed.all_to_all_single`` per exchange.

Works on every collective backend (gloo, NCCL, HCCL) and implements only the ``rows`` level; the other
levels use the shared fallbacks of :class:`~deep_ep_ops.transports.base.Transport`. Payloads travel as
bytes (gloo rejects float8 and int16 tensors). On CPU the exchange is asynchronous and polled, so a
missing peer becomes a timeout that names it instead of a hang; on accelerators the work is
stream-ordered and completes without a host wait.
"""

from __future__ import annotations

import datetime

import torch
import torch.distributed as dist

from .._wire import dense
from .base import Done, Transport

#: dtypes gloo's all_to_all takes as they are; anything else is moved as its bytes.
_NATIVE_DTYPES = (torch.uint8, torch.int8, torch.int32, torch.int64, torch.bfloat16, torch.float16, torch.float32)


class _Pending:
    def __init__(self, work: dist.Work, output: torch.Tensor, stream_ordered: bool):
        self._work = work
        self._output = output
        self._done = False
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


class AllToAllTransport(Transport):
    """``all_to_all_single`` over the group's own collective backend."""

    name = "all_to_all"

    def all_to_all(self, send: torch.Tensor, send_splits: list[int], recv_splits: list[int]):
        dtype = send.dtype
        send = dense(send)
        if dtype not in _NATIVE_DTYPES:
            send = send.view(torch.uint8)
        self.count(send_splits, send[0:1].numel() * send.element_size() if send.dim() else 0)
        shape = (sum(recv_splits), *send.shape[1:])
        output = self.outputs.empty(shape, send.dtype) if send.device.type == "cpu" else send.new_empty(shape)
        if self.num_ranks == 1:
            output.copy_(send)
            return Done(output.view(dtype))
        work = dist.all_to_all_single(
            output, send.contiguous(), recv_splits, send_splits, group=self.group, async_op=True
        )
        pending = _Pending(work, output, stream_ordered=send.device.type != "cpu")
        return pending if dtype in _NATIVE_DTYPES else Done(None, (pending,), lambda: output.view(dtype))
