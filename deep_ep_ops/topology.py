"""Which ranks of a group share a host, and how the group splits into nodes.

Host identity is exchanged once per group (never taken from ``LOCAL_WORLD_SIZE``, which says nothing
about a subgroup). It combines the host name, the kernel's boot id and the device number of
``/dev/shm``, so two processes count as one host exactly when they can share memory: a simulated host
(its own UTS and mount namespace with a private ``/dev/shm``) is a host of its own.

Nodes are equal, contiguous blocks of ranks (node ``n`` holds ranks ``n·P … n·P + P - 1``), as DeepEP
assumes. ``P`` comes from ``Buffer(num_ranks_per_node=)``, else ``DEEP_EP_OPS_RANKS_PER_NODE``, else the
real hosts; an override may split a host into several simulated nodes, but never put two hosts in one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import socket

import torch


def host_identity() -> int:
    """A 63-bit number that is equal for two processes exactly when they share a host and ``/dev/shm``."""
    parts = [socket.gethostname()]
    for path in ("/proc/sys/kernel/random/boot_id",):
        try:
            with open(path) as f:
                parts.append(f.read().strip())
        except OSError:
            parts.append("")
    try:
        parts.append(str(os.stat("/dev/shm").st_dev))
    except OSError:
        parts.append("")
    digest = hashlib.blake2b("\0".join(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


@dataclasses.dataclass(frozen=True)
class Topology:
    """The hosts and nodes of one group, seen from ``rank``."""

    rank: int
    hosts: tuple[int, ...]  # host index of every rank (numbered in order of first appearance)
    num_ranks_per_node: int

    @property
    def num_ranks(self) -> int:
        return len(self.hosts)

    @property
    def num_nodes(self) -> int:
        return self.num_ranks // self.num_ranks_per_node

    @property
    def single_host(self) -> bool:
        """All ranks share one host (and its ``/dev/shm``)."""
        return len(set(self.hosts)) == 1

    def node_of(self, rank: int) -> int:
        return rank // self.num_ranks_per_node


def _blocks(hosts: list[int]) -> int | None:
    """Ranks per host when hosts hold equal contiguous blocks of ranks, else ``None``."""
    per = hosts.count(hosts[0])
    if len(hosts) % per:
        return None
    blocks = [hosts[i:i + per] for i in range(0, len(hosts), per)]
    if all(len(set(b)) == 1 for b in blocks) and len({b[0] for b in blocks}) == len(blocks):
        return per
    return None


def build(rank: int, identities: list[int], override: int | None) -> Topology:
    """The topology from every rank's :func:`host_identity` and an optional ranks-per-node override.

    Raises:
        ValueError: the override does not divide the group, or puts ranks of two hosts in one node.
    """
    numbering: dict[int, int] = {}
    hosts = [numbering.setdefault(h, len(numbering)) for h in identities]
    num_ranks = len(hosts)
    if override is None:
        # Uneven or interleaved hosts: one node for the layout (no node-aware path); shared memory is
        # still used only where every rank shares the host.
        per_node = _blocks(hosts) or num_ranks
    else:
        if override < 1 or num_ranks % override:
            raise ValueError(f"deepep: expected num_ranks_per_node (DEEP_EP_OPS_RANKS_PER_NODE) to divide the "
                             f"group size {num_ranks}, got {override}")
        for start in range(0, num_ranks, override):
            block = hosts[start:start + override]
            if len(set(block)) > 1:
                raise ValueError(
                    f"deepep: expected num_ranks_per_node={override} to match the hosts, got ranks "
                    f"{start}..{start + override - 1} in one node but on {len(set(block))} different hosts "
                    f"(a node may not span hosts; real hosts per rank: {hosts})")
        per_node = override
    return Topology(rank, tuple(hosts), per_node)


def exchange_identities(ctx) -> list[int]:
    """Every rank's :func:`host_identity`, through a bounded exchange on the group."""
    from . import _waits

    if ctx.num_ranks == 1:
        return [host_identity()]
    mine = torch.full((ctx.num_ranks, 1), host_identity(), dtype=torch.int64, device=ctx.transport.device)
    ones = [1] * ctx.num_ranks
    return _waits.wait(ctx, ctx.transport.all_to_all(mine, ones, ones), "Buffer", 0).flatten().tolist()
