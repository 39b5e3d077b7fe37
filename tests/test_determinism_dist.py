"""Tier 2: outputs are bitwise identical across runs, transports and kernel paths for the same inputs.

On 2 and 4 gloo ranks (one pool run each), every (transport, kernels) pair in {all_to_all, shm} x {python,
native (when built)} runs the same normal, low-latency and fused steps twice (see cases_determinism);
the sha256 digests of all outputs must agree between the runs and between the pairs, on every rank.
"""

import pytest

import cases_determinism

pytestmark = pytest.mark.distributed


def _differences(got: dict[str, str], want: dict[str, str]) -> list[str]:
    return sorted(k for k in set(got) | set(want) if got.get(k) != want.get(k))


@pytest.mark.parametrize("world_size", [2, 4])
def test_bitwise_identical_across_runs_transports_and_kernels(pools, world_size):
    per_rank = pools(world_size).run(cases_determinism.digests)
    pairs = [f"{t}/{k}" for t in cases_determinism.TRANSPORTS for k in cases_determinism.kernel_paths()]
    for rank, result in enumerate(per_rank):
        assert sorted(result) == sorted(pairs), (rank, sorted(result))
        for pair, runs in result.items():
            assert len(runs) == 2 and runs[0], (rank, pair)
            diff = _differences(runs[1], runs[0])
            assert not diff, f"rank {rank}, {pair}: second run differs from the first in {diff}"
        first = pairs[0]
        for pair in pairs[1:]:
            diff = _differences(result[pair][0], result[first][0])
            assert not diff, f"rank {rank}: {pair} differs from {first} in {diff}"
