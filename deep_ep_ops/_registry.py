"""The package's one piece of module-level mutable state: ``group_name`` → :class:`GroupContext`.

Ops receive only ``group_name``; everything a kernel needs about the group lives in its context: the
backend, the kernels (native or pure torch), the topology (hosts and nodes, exchanged once per group),
the timeout, the op counter that checks that all ranks run the same op sequence, and outstanding receive
hooks. ``Buffer`` registers its group with its settings; a raw op on an unregistered group gets a context
built from the environment (``DEEP_USE_MODE``, ``DEEP_EP_OPS_RANKS_PER_NODE``, ``DEEP_EP_OPS_KERNELS``,
``DEEP_EP_OPS_TIMEOUT_S``). Building a context is collective: it exchanges host identities.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import gc
import inspect
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.distributed_c10d import _resolve_process_group

from . import _waits, compute, config, topology, transports
from ._outputs import OutputPool


@dataclasses.dataclass(eq=False)
class GroupContext:
    """Per-group state shared by every op and ``Buffer`` on that group."""

    group: dist.ProcessGroup
    group_name: str
    rank: int
    num_ranks: int
    timeout_s: float
    kernels: compute.Kernels
    transport: transports.Transport | None = None
    topology: topology.Topology | None = None
    outputs: OutputPool = dataclasses.field(default_factory=OutputPool)
    #: Buffer sizes the backend may size its buffers from (0: its own default).
    num_nvl_bytes: int = 0
    num_rdma_bytes: int = 0
    seq: int = 0
    refs: int = 0
    pending: dict[int, Any] = dataclasses.field(default_factory=dict)
    #: Set to a list to record ``(seq, op, rows)`` of every communicating op as it executes (debugging,
    #: and the tests that check compiled code keeps the program's communication order).
    log: list | None = None
    #: The op being run (named by errors of waits inside the backend).
    op: str = ""
    #: Every rank's process ``(host, pid namespace, pid)``, to tell a dead peer (see ``_waits``).
    processes: list | None = None
    #: The first error of the c10d store, once it stopped answering (then it is not asked again).
    store_error: str | None = None
    #: The error of the exchange that failed (a peer died or stalled): the group is unusable from then on.
    failure: str | None = None

    @property
    def num_ranks_per_node(self) -> int:
        return self.topology.num_ranks_per_node

    @property
    def num_nodes(self) -> int:
        return self.topology.num_nodes

    def next_seq(self, op: str, rows: int) -> int:
        """Numbers communicating ops so the handshake can tell when ranks diverge."""
        self.seq += 1
        self.op = op
        if self.log is not None:
            self.log.append((self.seq, op, rows))
        return self.seq


_GROUPS: dict[str, GroupContext] = {}


@atexit.register
def _drop_all() -> None:
    """At interpreter exit, while Python still runs: closes every backend, drops the contexts (a context and
    its backend refer to each other, so only the cycle collector frees them) and collects them.

    Otherwise a process group outlives ``destroy_process_group`` through them and is freed by the last
    collection of interpreter finalization. A gloo worker thread that then drops its last finished work
    must take the GIL to free the work's tensors, cannot during finalization, and the process aborts
    ("terminate called without an active exception"; seen in a core dump of the demo, about 1 run in 8)."""
    while _GROUPS:
        _, ctx = _GROUPS.popitem()
        ctx.pending.clear()
        with contextlib.suppress(Exception):
            ctx.transport.close()
    gc.collect()


def _kernels(choice: str) -> compute.Kernels:
    if choice == "python" or (choice == "auto" and not compute.native_loaded()):
        return compute.PYTHON
    if not compute.native_loaded():
        raise ValueError(f"deepep: expected the C++ kernels of csrc/ to be built for kernels='native', got none "
                         f"({compute.why_not_native()})")
    return compute.NATIVE


def _new_context(group: dist.ProcessGroup, transport: str | None, timeout_s: float | None,
                 num_ranks_per_node: int | None, kernels: str | None, num_nvl_bytes: int = 0,
                 num_rdma_bytes: int = 0) -> GroupContext:
    env = config.read_env()
    if kernels is not None and kernels not in config.KERNELS:
        raise ValueError(f"deepep: expected kernels in {list(config.KERNELS)}, got {kernels!r}")
    chosen = _kernels(kernels or env.kernels)
    ctx = GroupContext(group=group, group_name=group.group_name, rank=group.rank(), num_ranks=group.size(),
                       timeout_s=env.timeout_s if timeout_s is None else float(timeout_s), kernels=chosen,
                       num_nvl_bytes=num_nvl_bytes, num_rdma_bytes=num_rdma_bytes)
    # The host exchange runs over the portable backend; the chosen backend may depend on its result, and
    # builds itself with the portable one still in ctx.transport.
    ctx.transport = transports.create("all_to_all", ctx)
    per_node = num_ranks_per_node if num_ranks_per_node is not None else env.num_ranks_per_node
    _waits.publish_process(ctx)
    ctx.topology = topology.build(ctx.rank, topology.exchange_identities(ctx), per_node)
    ctx.processes = _waits.read_processes(ctx)
    name = transports.resolve(transport if transport is not None else env.use_mode, ctx.topology, group)
    if name != ctx.transport.name:
        ctx.transport = transports.create(name, ctx)
    return ctx


def node_context(group: dist.ProcessGroup, parent: GroupContext, transport: str) -> GroupContext:
    """A context for ``group``, the ranks of one node of ``parent``'s group, with ``parent``'s timeout and
    kernels, outside the registry: the backend that asked for it owns it (and closes it)."""
    return _new_context(group, transport, parent.timeout_s, group.size(), parent.kernels.name)


def get(group_name: str) -> GroupContext:
    """The context of ``group_name``, created from the environment on first use (a collective)."""
    ctx = _GROUPS.get(group_name)
    if ctx is None:
        try:
            group = _resolve_process_group(group_name)
        except Exception as exc:  # the C++ resolver raises a bare RuntimeError
            raise ValueError(
                f"deepep: expected group_name of an initialized process group, got {group_name!r}"
            ) from exc
        ctx = _GROUPS[group_name] = _new_context(group, None, None, None, None)
    return ctx


def register(group: dist.ProcessGroup, transport: str | None = None, timeout_s: float | None = None,
             num_ranks_per_node: int | None = None, kernels: str | None = None, num_nvl_bytes: int = 0,
             num_rdma_bytes: int = 0) -> GroupContext:
    """Registers (or re-uses) the context of ``group``; one reference per call, see :func:`release`.

    Raises:
        ValueError: the group is already registered with a different transport, kernels, timeout or node
            size.
    """
    name = group.group_name
    ctx = _GROUPS.get(name)
    if ctx is not None and ctx.refs > 0:
        wanted = transport if transport is not None else config.read_env().use_mode
        held = {"transport": ctx.transport.name, "kernels": ctx.kernels.name, "timeout_s": ctx.timeout_s,
                "num_ranks_per_node": ctx.num_ranks_per_node}
        asked = {"transport": None if wanted is None else transports.resolve(wanted, ctx.topology, group),
                 "kernels": None if kernels is None else _kernels(kernels).name,
                 "timeout_s": None if timeout_s is None else float(timeout_s),
                 "num_ranks_per_node": num_ranks_per_node}
        for key, value in asked.items():
            # One context per group: a second Buffer may not silently run with other settings than it asked.
            if value is not None and value != held[key]:
                raise ValueError(
                    f"deepep: expected one {key} per process group, got {value!r} for group {name!r} "
                    f"which another Buffer uses with {held[key]!r}"
                )
        for key, value in (("num_nvl_bytes", num_nvl_bytes), ("num_rdma_bytes", num_rdma_bytes)):
            # The backend sized its buffers for the first Buffer (0: they grow on demand); a bigger fixed size
            # needs that Buffer destroyed first, as DeepEP's own get_buffer does.
            if getattr(ctx, key) and value > getattr(ctx, key):
                raise ValueError(
                    f"deepep: expected {key} <= {getattr(ctx, key)} (the size another Buffer on group {name!r} "
                    f"fixed; destroy it first to grow), got {value}"
                )
    else:
        if ctx is not None:
            ctx.transport.close()
        ctx = _GROUPS[name] = _new_context(group, transport, timeout_s, num_ranks_per_node, kernels, num_nvl_bytes,
                                           num_rdma_bytes)
    ctx.refs += 1
    return ctx


def impl(lib, name: str, kernel) -> Callable:
    """Registers ``kernel`` as ``deepep::<name>`` behind the whole-op level of the group's backend: a
    backend whose :meth:`~deep_ep_ops.transports.Transport.override` returns a callable for the op runs
    that instead (a vendor op), with the same arguments. Returns the registered kernel."""
    position = list(inspect.signature(kernel).parameters).index("group_name")

    def run(*args, **kwargs):
        group_name = args[position] if len(args) > position else kwargs["group_name"]
        vendor = _GROUPS[group_name].transport.override(name) if group_name in _GROUPS else \
            get(group_name).transport.override(name)
        return (kernel if vendor is None else vendor)(*args, **kwargs)

    lib.impl(name, run, "CompositeExplicitAutograd")
    return run


def register_autograd(lib, name: str, backward, setup_context, kernel) -> None:
    """``torch.library.register_autograd`` for ``deepep::<name>``, whose registered kernel is ``kernel`` (what
    :func:`impl` returned), with one shortcut: a call on plain CPU tensors that needs no gradient runs
    ``kernel`` straight from the autograd kernel, as torch's would after a round trip through the dispatcher
    (``redispatch``), which costs about a fifth of a small dispatch's host time. Every other call (gradients,
    fake tensors, tracing, dispatch modes, other devices) takes torch's autograd kernel unchanged."""
    torch.library.register_autograd(f"deepep::{name}", backward, setup_context=setup_context,
                                    lib=_NoGradShortcut(lib, kernel))


class _NoGradShortcut:
    """The ``lib`` that ``register_autograd`` registers its autograd kernel through: registers that kernel
    behind the shortcut instead (the only call ``register_autograd`` makes on it)."""

    def __init__(self, lib, kernel):
        self.lib, self.kernel = lib, kernel

    def impl(self, name: str, autograd_kernel, dispatch_key: str, with_keyset: bool = False) -> None:
        assert dispatch_key == "Autograd" and with_keyset, "torch.library.register_autograd changed"
        kernel = self.kernel

        def shortcut(keyset, *args, **kwargs):
            if ((keyset & torch._C._after_autograd_keyset).highestPriorityTypeId() == _CPU
                    and not (torch.is_grad_enabled() and torch._C._any_requires_grad(*args))):
                with torch._C._AutoDispatchBelowAutograd():
                    return kernel(*args, **kwargs)
            return autograd_kernel(keyset, *args, **kwargs)

        self.lib.impl(name, shortcut, dispatch_key, with_keyset=True)


_CPU = torch._C.DispatchKey.CPU


def release(group_name: str) -> None:
    """Drops one reference; the context (and what its backend holds) goes away with the last one."""
    ctx = _GROUPS.get(group_name)
    if ctx is None:
        return
    ctx.refs -= 1
    if ctx.refs <= 0:
        del _GROUPS[group_name]
        ctx.transport.close()
