"""The package's one piece of module-level mutable state: ``group_name`` → :class:`GroupContext`.

Ops receive only ``group_name``; everything a kernel needs about the group (transport, timeout, node
topology, the op counter used to check that all ranks run the same op sequence, outstanding receive
hooks) lives here. ``Buffer`` registers its group; a raw op on an unregistered group gets a default
context (transport from ``DEEP_USE_MODE`` or automatic, one node, timeout from the environment).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.distributed_c10d import _resolve_process_group

from . import config
from .transports import Transport, create_transport, resolve_transport_name


@dataclasses.dataclass(eq=False)
class GroupContext:
    """Per-group state shared by every op and ``Buffer`` on that group."""

    group: dist.ProcessGroup
    group_name: str
    rank: int
    num_ranks: int
    num_ranks_per_node: int
    transport: Transport
    timeout_s: float
    seq: int = 0
    refs: int = 0
    pending: dict[int, Any] = dataclasses.field(default_factory=dict)
    #: Set to a list to record ``(seq, op, rows)`` of every communicating op as it executes (debugging,
    #: and the tests that check compiled code keeps the program's communication order).
    log: list | None = None

    @property
    def device(self) -> torch.device:
        """Where the group's backend exchanges tensors (CUDA for NCCL, else CPU)."""
        backend = str(dist.get_backend(self.group)).lower()
        return torch.device("cuda", torch.cuda.current_device()) if "nccl" in backend else torch.device("cpu")

    @property
    def num_nodes(self) -> int:
        return self.num_ranks // self.num_ranks_per_node

    def next_seq(self, op: str, rows: int) -> int:
        """Numbers communicating ops so the handshake can tell when ranks diverge."""
        self.seq += 1
        if self.log is not None:
            self.log.append((self.seq, op, rows))
        return self.seq


_GROUPS: dict[str, GroupContext] = {}


def _new_context(group: dist.ProcessGroup, transport: str | None, timeout_s: float | None,
                 num_ranks_per_node: int | None) -> GroupContext:
    env = config.read_env()
    name = resolve_transport_name(transport if transport is not None else env.use_mode)
    num_ranks = group.size()
    per_node = num_ranks if num_ranks_per_node is None else num_ranks_per_node
    if per_node <= 0 or num_ranks % per_node != 0:
        raise ValueError(
            f"deepep: expected num_ranks_per_node to divide the group size {num_ranks}, got {per_node}"
        )
    return GroupContext(
        group=group,
        group_name=group.group_name,
        rank=group.rank(),
        num_ranks=num_ranks,
        num_ranks_per_node=per_node,
        transport=create_transport(name, group),
        timeout_s=env.timeout_s if timeout_s is None else float(timeout_s),
    )


def get(group_name: str) -> GroupContext:
    """The context of ``group_name``, created with defaults on first use."""
    ctx = _GROUPS.get(group_name)
    if ctx is None:
        try:
            group = _resolve_process_group(group_name)
        except Exception as exc:  # the C++ resolver raises a bare RuntimeError
            raise ValueError(
                f"deepep: expected group_name of an initialized process group, got {group_name!r}"
            ) from exc
        ctx = _GROUPS[group_name] = _new_context(group, None, None, None)
    return ctx


def register(group: dist.ProcessGroup, transport: str | None = None, timeout_s: float | None = None,
             num_ranks_per_node: int | None = None) -> GroupContext:
    """Registers (or re-uses) the context of ``group``; one reference per call, see :func:`release`.

    Raises:
        ValueError: the group is already registered with a different transport.
    """
    name = group.group_name
    ctx = _GROUPS.get(name)
    if ctx is not None and ctx.refs > 0:
        wanted = resolve_transport_name(transport if transport is not None else config.read_env().use_mode)
        if wanted != ctx.transport.name:
            raise ValueError(
                f"deepep: expected one transport per process group, got {wanted!r} for group {name!r} "
                f"which another Buffer uses with {ctx.transport.name!r}"
            )
    else:
        ctx = _GROUPS[name] = _new_context(group, transport, timeout_s, num_ranks_per_node)
    ctx.refs += 1
    return ctx


def release(group_name: str) -> None:
    """Drops one reference; the context goes away with the last one."""
    ctx = _GROUPS.get(group_name)
    if ctx is None:
        return
    ctx.refs -= 1
    if ctx.refs <= 0:
        del _GROUPS[group_name]
