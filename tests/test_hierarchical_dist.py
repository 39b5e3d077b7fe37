"""Tier 2: the node-aware (hierarchical) transport on simulated nodes, 4 ranks as 2 x 2 and 8 as 2 x 4:
every normal-mode case against the reference (bitwise; combine against the hierarchical sum bitwise and
the flat one within its stated rounding)."""

import pytest

import cases_normal
import test_normal_dist

pytestmark = pytest.mark.distributed


def run_cases(rank: int, world: int, per_node: int) -> int:
    with cases_normal.env(DEEP_USE_MODE="hierarchical"):
        for param in test_normal_dist.CASES:
            case, opts = param.values
            cases_normal.dispatch_combine(rank, world, case, {**opts, "num_ranks_per_node": per_node})
    return len(test_normal_dist.CASES)


@pytest.mark.parametrize("world_size, per_node", [(4, 2), (8, 4)])
def test_normal_cases_on_simulated_nodes(pools, world_size, per_node):
    assert pools(world_size).run(run_cases, per_node) == [len(test_normal_dist.CASES)] * world_size
