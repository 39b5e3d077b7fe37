"""Tier 2: bad input and missing peers give clear errors on every rank, and nothing hangs."""

import re

import pytest

import cases_errors
from _pool import RankPool

pytestmark = pytest.mark.distributed

EXPECTED = {
    "hidden": r"deepep::dispatch: expected the same hidden on every rank, got 32 on rank 0, 16 on rank 1",
    "expert_id": r"deepep::dispatch: expected topk_idx values in \[-1, 8\), got 11 at token 2, slot 1 \(on rank 1\)",
    "dtype": r"deepep::dispatch: expected topk_idx of dtype torch.int64, got torch.int32 \(on rank 1\)",
    "indivisible": r"deepep::dispatch: expected num_experts divisible by the 2 ranks that host routed experts, got 7 "
                   r"\(on rank 0\)",
}


@pytest.mark.parametrize("kind", sorted(EXPECTED))
def test_same_error_on_every_rank(pools, kind):
    messages = pools(2).run(cases_errors.bad_input_on_one_rank, kind)
    assert messages[0] == messages[1], messages
    assert re.search(EXPECTED[kind], messages[0]), messages[0]


def test_missing_peer_times_out_and_is_named():
    pool = RankPool(2)
    try:
        elapsed, message = pool.run(cases_errors.missing_peer, 2.0)[0].split("|", 1)
    finally:
        pool.close()
    assert 2.0 <= float(elapsed) < 10.0
    assert re.search(r"deepep::dispatch: expected all 2 ranks of group '0' in exchange #1 within 2 s, got no answer "
                     r"from rank 1, not seen in any deepep op", message), message


def test_missing_peer_at_construction():
    pool = RankPool(2)
    try:
        message = pool.run(cases_errors.missing_peer_at_construction, 2.0)[0]
    finally:
        pool.close()
    assert re.search(r"deepep::Buffer: expected all 2 ranks of group '0' in exchange #0 within 2 s, got no answer "
                     r"from rank 1", message), message


def test_dead_peer_is_named():
    pool = RankPool(2)
    try:
        (kind0, message), (kind1, death) = pool.run(cases_errors.dead_peer, timeout_s=60, raise_errors=False)
    finally:
        pool.close()
    assert kind1 == "err" and "rank 1 died (exit code 3)" in death
    assert kind0 == "ok" and re.search(r"deepep::dispatch: .*got no answer from rank 1|peers that did not reach it: "
                                       r"rank 1", message), message


LOCAL_FAILURES = {
    ("dispatch", "fault"): r"deepep::dispatch: expected the local work before the exchange to succeed, got "
                           r"ValueError: injected fault \(on rank 1\)",
    ("low_latency_dispatch", "fault"): r"deepep::low_latency_dispatch: expected the local work before the exchange "
                                       r"to succeed, got ValueError: injected fault \(on rank 1\)",
    ("fused_deep_moe", "fault"): r"deepep::fused_deep_moe: expected the local work before the exchange to succeed, "
                                 r"got ValueError: injected fault \(on rank 1\)",
    ("fused_deep_moe", "bad_weights"): r"deepep::fused_deep_moe: expected gmm1_permuted_weight of shape "
                                       r"\[num_local_experts, hidden, 2 \* intermediate\] = \[\d, 256, 2I\], got shape "
                                       r"\[\d, 255, 256\] \(on rank 1\)",
}


@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize("op, kind", sorted(LOCAL_FAILURES))
def test_local_failure_on_one_rank_fails_every_rank(pools, world_size, op, kind):
    """Whatever fails on one rank before its first exchange (a check, or any exception in its local
    work), every rank raises the same deepep error naming that rank instead of waiting for it."""
    messages = pools(world_size).run(cases_errors.local_failure, op, kind)
    assert len(set(messages)) == 1, messages
    assert re.search(LOCAL_FAILURES[op, kind], messages[0]), messages[0]
