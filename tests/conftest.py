"""Shared fixtures: ``pools`` (spawned gloo ranks, one pool per world size for the whole session) and
``group1`` (a world-size-1 gloo group in the test process, for tier-1 tests of the ops)."""

from __future__ import annotations

import datetime
import os
import socket
import sys
import tempfile

import pytest

# The repository root, for ``benchmarks`` (its op chains are the tests' oracles too); spawned ranks
# inherit sys.path.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

# Compiler caches go to a private temp dir (inductor also writes precompiled headers under TMPDIR);
# one compile thread keeps multi-rank inductor tests reliable on 2 cores. Set before any spawn.
_TMP = tempfile.mkdtemp(prefix="deep_ep_ops_tests_")
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(_TMP, "inductor"))
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")

from _pool import RankPool  # noqa: E402


@pytest.fixture(scope="session")
def pools():
    """``pools(world_size)`` → the session's :class:`RankPool` of that size."""
    live: dict[int, RankPool] = {}

    def get(world_size: int) -> RankPool:
        if world_size not in live:
            live[world_size] = RankPool(world_size)
        return live[world_size]

    yield get
    for pool in live.values():
        pool.close()


@pytest.fixture(scope="session")
def group1():
    """A world-size-1 gloo process group in this process; yields its ``group_name``."""
    import torch.distributed as dist

    if not dist.is_initialized():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1,
                                timeout=datetime.timedelta(seconds=60))
    yield dist.group.WORLD.group_name
