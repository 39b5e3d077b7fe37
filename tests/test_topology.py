"""Tier 1: host identity, nodes and the ranks-per-node override (deep_ep_ops.topology)."""

import pytest

from deep_ep_ops import topology


def test_host_identity_is_stable_and_63_bit():
    assert topology.host_identity() == topology.host_identity()
    assert 0 <= topology.host_identity() < 1 << 63


@pytest.mark.parametrize("identities, override, hosts, per_node, single_host", [
    ([7, 7, 7, 7], None, (0, 0, 0, 0), 4, True),
    ([7, 7, 9, 9], None, (0, 0, 1, 1), 2, False),
    ([7, 9, 7, 9], None, (0, 1, 0, 1), 4, False),  # interleaved hosts: one node, but not one host
    ([7, 7, 9], None, (0, 0, 1), 3, False),  # uneven hosts
    ([7, 7, 7, 7], 2, (0, 0, 0, 0), 2, True),  # a host split into two simulated nodes
    ([5, 5, 5, 5, 6, 6, 6, 6], 2, (0, 0, 0, 0, 1, 1, 1, 1), 2, False),
])
def test_build(identities, override, hosts, per_node, single_host):
    t = topology.build(1, identities, override)
    assert (t.hosts, t.num_ranks_per_node, t.single_host) == (hosts, per_node, single_host)
    assert t.num_nodes == len(identities) // per_node and t.node_of(len(identities) - 1) == t.num_nodes - 1


def test_override_errors():
    with pytest.raises(ValueError, match=r"expected num_ranks_per_node \(DEEP_EP_OPS_RANKS_PER_NODE\) to divide the "
                                         r"group size 4, got 3"):
        topology.build(0, [1, 1, 1, 1], 3)
    with pytest.raises(ValueError, match=r"expected num_ranks_per_node=4 to match the hosts, got ranks 0\.\.3 in one "
                                         r"node but on 2 different hosts"):
        topology.build(0, [1, 1, 2, 2], 4)
