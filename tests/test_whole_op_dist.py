"""Tier 2: the shm backend's whole-op native paths (errors on them, and ranks on different paths)."""

import pytest

import cases_whole_op
from deep_ep_ops import compute

pytestmark = [pytest.mark.distributed,
              pytest.mark.skipif(not compute.native_loaded(), reason="the whole-op paths are the C++ kernels of "
                                                                     "csrc/, which are not built here")]


@pytest.mark.parametrize("world_size", [2, 4])
def test_normal_errors_on_the_native_path(pools, world_size):
    messages = pools(world_size).run(cases_whole_op.normal_errors)
    for kind in ("expert_id", "layout", "limit", "handle"):
        assert len({m[kind] for m in messages}) == 1, (kind, messages)
    first = messages[0]
    assert "expected topk_idx values in [-1, 8), got 11 at token 2, slot 1 (on rank 1)" in first["expert_id"]
    assert "expected is_token_in_rank to match topk_idx" in first["layout"] and "(on rank 1)" in first["layout"]
    assert f"expected at most num_worst_tokens={6 * world_size - 1} tokens received per rank" in first["limit"]
    assert first["handle"].startswith("deepep::combine: expected"), first["handle"]


@pytest.mark.parametrize("world_size", [2, 4])
def test_normal_mixed_paths(pools, world_size):
    calls = pools(world_size).run(cases_whole_op.normal_mixed_paths)
    assert calls[0] == 1 and all(c == 2 for c in calls[1:]), calls


@pytest.mark.parametrize("world_size", [2, 4])
def test_low_latency_paths(pools, world_size):
    messages = pools(world_size).run(cases_whole_op.low_latency_paths)
    assert len({m["expert_id"] for m in messages}) == 1, messages
    assert "expected topk_idx values in [-1, 8), got 99 at token 0, slot 0 (on rank 1)" in messages[0]["expert_id"]


@pytest.mark.parametrize("world_size", [2, 4])
def test_low_latency_overlap_with_hooks(pools, world_size):
    calls = pools(world_size).run(cases_whole_op.low_latency_overlap)
    assert calls == [7] * world_size, calls


def test_normal_rows_wider_than_the_rings(pools):
    assert pools(2).run(cases_whole_op.normal_tight_rings) == [4, 4]  # 2 dispatches + 2 combines after the first
