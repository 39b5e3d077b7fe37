"""Tier 1: the shared-memory ring protocol (``transports/_shm_engine``, ``csrc/shm.cpp``) with two ranks
simulated in one process, each side called in turn with a zero budget until both are done."""

import pytest
import torch

from deep_ep_ops import compute
from deep_ep_ops.transports import _shm_engine

KERNELS = [compute.PYTHON] + ([compute.NATIVE] if compute.native_loaded() else [])


def _exchange(kernels, segments, geometry, mirrors, row_bytes: int, counts: list[int], g) -> None:
    """Rank r sends ``counts[r]`` rows to its peer; both receive them bytewise, or the test fails on a stall."""
    src = [torch.randint(0, 256, (counts[r], row_bytes), dtype=torch.uint8, generator=g) for r in range(2)]
    out = [torch.empty(counts[1 - r], row_bytes, dtype=torch.uint8) for r in range(2)]
    cursors = [torch.zeros(4, dtype=torch.int64) for _ in range(2)]
    done = [False, False]
    for _ in range(10_000):
        for r in range(2):
            if not done[r]:
                send = [0, 0]
                send[1 - r] = counts[r]
                recv = [0, 0]
                recv[1 - r] = counts[1 - r]
                done[r] = bool(kernels.ring_copy(segments, geometry, mirrors[r], cursors[r], src[r], None, send,
                                                 out[r], recv, r, 0.0))
        if all(done):
            break
    assert all(done), f"the ring exchange of {row_bytes}-byte rows stalled (cursors {cursors})"
    for r in range(2):
        assert torch.equal(out[r], src[1 - r])


@pytest.mark.parametrize("kernels", KERNELS, ids=lambda k: k.name)
def test_ring_of_mixed_row_sizes(kernels):
    """A 320-byte ring: 184-byte rows, then 256-byte rows that no longer fit at the ring's end. Once every
    row is read the skipped tail is free, so the sender wraps instead of waiting forever for it."""
    g = torch.Generator().manual_seed(0)
    ring_bytes = 320
    geometry = [_shm_engine.ring_base(2), ring_bytes]
    segments = [torch.zeros(_shm_engine.ring_segment_bytes(2, ring_bytes), dtype=torch.uint8) for _ in range(2)]
    mirrors = [torch.zeros(4, dtype=torch.int64) for _ in range(2)]
    for row_bytes, counts in ((184, [1, 3]), (256, [5, 2]), (64, [7, 7]), (320, [2, 1]), (256, [3, 3])):
        _exchange(kernels, segments, geometry, mirrors, row_bytes, counts, g)
