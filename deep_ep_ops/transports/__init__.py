"""Transports move bytes between the ranks of a group; everything else (checks, layouts, packing,
quantization, ordering) is shared by all of them.

A transport implements one primitive, a variable-split all-to-all of rows:

    transport.all_to_all(send, send_splits, recv_splits) -> Pending

``send`` is ``[sum(send_splits), ...]`` (uint8 byte rows or int64 headers), rows ``[a, b)`` of it go to
rank ``r`` where ``a = sum(send_splits[:r])``, and the result stacks the rows received from every rank
in rank order. ``Pending.poll(timeout_s)`` waits at most that long and says whether the data arrived;
``Pending.result()`` returns it. Timeouts, naming missing peers and validation are shared code
(``deep_ep_ops._waits``, ``deep_ep_ops._handshake``).

Names (``Buffer(transport=...)`` or ``DEEP_USE_MODE``): ``all_to_all`` (alias ``alltoall``) — the portable
``torch.distributed`` baseline on any backend; ``default``/``auto`` — the best available, currently
``all_to_all``.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.distributed as dist


class Pending(Protocol):
    """An exchange in flight."""

    def poll(self, timeout_s: float) -> bool: ...

    def result(self) -> torch.Tensor: ...


class Transport(Protocol):
    """What an op needs from a transport (see the module docstring)."""

    name: str

    def all_to_all(self, send: torch.Tensor, send_splits: list[int], recv_splits: list[int]) -> Pending: ...


_ALIASES = {"all_to_all": "all_to_all", "alltoall": "all_to_all", "default": "all_to_all", "auto": "all_to_all"}
# Names that exist in DeepEP-Ascend but need hardware this install does not have.
_DEVICE_ONLY = {"ops": "the Ascend torch_npu.npu_moe_distribute_* ops (needs torch_npu and an NPU)"}


def resolve_transport_name(name: str | None) -> str:
    """Canonical transport name for ``name`` (``None`` = automatic).

    Raises:
        ValueError: unknown name (the message lists the valid ones), or a device transport that is not
            available here.
    """
    if name is None:
        return "all_to_all"
    key = name.lower()
    if key in _ALIASES:
        return _ALIASES[key]
    if key in _DEVICE_ONLY:
        raise ValueError(f"deepep: transport {name!r} uses {_DEVICE_ONLY[key]}, which is not available here")
    raise ValueError(f"deepep: expected a transport in {sorted(_ALIASES)}, got {name!r}")


def create_transport(name: str, group: dist.ProcessGroup) -> Transport:
    """Instantiates the transport ``name`` (canonical, see :func:`resolve_transport_name`) for ``group``."""
    if name == "all_to_all":
        from .all_to_all import AllToAllTransport

        return AllToAllTransport(group)
    raise ValueError(f"deepep: expected a transport in {sorted(_ALIASES)}, got {name!r}")
