"""The backend registry: every backend name, alias and ``DEEP_USE_MODE`` value, and how one is chosen.

``Buffer(transport=...)``, else ``DEEP_USE_MODE``, else automatic. Names (case-insensitive):

| name | aliases | moves data with |
|---|---|---|
| ``all_to_all`` | ``alltoall`` | ``torch.distributed.all_to_all_single`` on any collective backend |
| ``shm`` | ``shared_memory`` | POSIX shared memory between the ranks of one host (CPU) |
| ``hierarchical`` | ``internode`` | node-aware normal mode: a token crosses to a node once (several nodes) |
| ``default`` | ``auto`` | the best backend for the group: ``hierarchical`` across nodes, ``shm`` on one host, else ``all_to_all`` |
| ``ops`` | | Ascend's ``torch_npu.npu_moe_distribute_*`` ops (needs torch_npu and an NPU; not in this build) |

How to add a backend: write ``transports/<name>.py`` with a subclass of
:class:`~deep_ep_ops.transports.base.Transport` that implements ``all_to_all`` and whichever higher levels
it does better (see ``base.py``), add a :class:`Entry` to ``BACKENDS`` below, and run the tier-2 matrix
with ``Buffer(transport=<name>)``.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable

from .base import Done, Pending, Transport

__all__ = ["BACKENDS", "Done", "Pending", "Transport", "create", "names", "resolve"]


@dataclasses.dataclass(frozen=True)
class Entry:
    """A registered backend: ``factory`` is ``"module:Class"`` (imported on first use)."""

    factory: str
    aliases: tuple[str, ...] = ()
    #: Why the backend cannot serve a group here (``None`` when it can); gets its topology and the group.
    unavailable: Callable[[object, object], str | None] = lambda topology, group: None


def _needs_torch_npu(topology, group) -> str | None:
    return "it needs torch_npu and an Ascend NPU, which this build does not include"


def _shm_unavailable(topology, group) -> str | None:
    from .shm import unavailable

    return unavailable(topology, group)


def _hierarchical_unavailable(topology, group) -> str | None:
    from .hierarchical import unavailable

    return unavailable(topology, group)


BACKENDS: dict[str, Entry] = {
    "all_to_all": Entry("deep_ep_ops.transports.all_to_all:AllToAllTransport", aliases=("alltoall",)),
    "shm": Entry("deep_ep_ops.transports.shm:ShmTransport", aliases=("shared_memory",), unavailable=_shm_unavailable),
    "hierarchical": Entry("deep_ep_ops.transports.hierarchical:HierarchicalTransport", aliases=("internode",),
                          unavailable=_hierarchical_unavailable),
    "ops": Entry("", unavailable=_needs_torch_npu),
}
AUTO = ("default", "auto")


def names() -> list[str]:
    """Every accepted name: backends, their aliases and the automatic choice."""
    return sorted([*BACKENDS, *(a for e in BACKENDS.values() for a in e.aliases), *AUTO])


def canonical(name: str, what: str = "a transport") -> str:
    """The registry name behind ``name`` (``default``/``auto`` stay as they are).

    Raises:
        ValueError: an unknown name; the message lists the valid ones.
    """
    key = name.lower()
    if key in BACKENDS or key in AUTO:
        return key
    for backend, entry in BACKENDS.items():
        if key in entry.aliases:
            return backend
    raise ValueError(f"deepep: expected {what} in {names()}, got {name!r}")


def resolve(name: str | None, topology, group) -> str:
    """The backend to build for a group: ``name`` (``None`` = automatic) checked against ``topology``.

    Automatic choice: the first available backend of ``_PREFERENCE``.

    Raises:
        ValueError: unknown name, or a backend that cannot serve this group (the message says why).
    """
    key = canonical(name) if name is not None else "default"
    if key in AUTO:
        return next(n for n in _PREFERENCE if BACKENDS[n].unavailable(topology, group) is None)
    reason = BACKENDS[key].unavailable(topology, group)
    if reason is not None:
        raise ValueError(f"deepep: transport {name!r} cannot serve this group: {reason}")
    return key


#: Automatic choice, best first; the first available one wins.
_PREFERENCE = ("hierarchical", "shm", "all_to_all")


def create(name: str, ctx) -> Transport:
    """Builds the backend ``name`` (a :func:`resolve` result) for the group of ``ctx``."""
    module, cls = BACKENDS[name].factory.split(":")
    return getattr(importlib.import_module(module), cls)(ctx)
