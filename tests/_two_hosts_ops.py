"""Worker of tests/test_two_hosts.py: the ops across two simulated hosts, run by torchrun on each host.

Every rank joins a gloo group from torchrun's environment and checks against the reference:

* host detection: with no override, a Buffer sees 2 nodes of 2 ranks and picks the hierarchical transport;
* every normal-mode case of the tier-2 matrix (layout, dispatch, cached dispatch, combine, autograd through
  the compiled layer below) on the hierarchical transport and on the flat one;
* low-latency and fused cases (flat across nodes, as DeepEP's) and a compiled MoE layer's backward.

Rank 0 prints one line ``TWO_HOSTS {json}`` with what ran; any mismatch raises, so torchrun exits non-zero.
"""

from __future__ import annotations

import datetime
import json
import os
import sys

_TESTS = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [_TESTS, os.path.dirname(_TESTS)]

import torch.distributed as dist  # noqa: E402


def main() -> None:
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    import cases_normal
    import test_hierarchical_dist
    import test_normal_dist
    from deep_ep_ops import Buffer

    rank, world = dist.get_rank(), dist.get_world_size()
    buf = Buffer(dist.group.WORLD)  # what a user gets with no settings: host detection, automatic choice
    detected = {"transport": buf.transport, "num_ranks_per_node": buf.num_ranks_per_node}
    buf.destroy()
    assert detected == {"transport": "hierarchical", "num_ranks_per_node": world // 2}, detected

    ran = {}
    for transport in ("hierarchical", "all_to_all"):
        with cases_normal.env(DEEP_USE_MODE=transport):
            for param in test_normal_dist.CASES:
                case, opts = param.values
                # The override agrees with the hosts (a contradiction is an error, tested elsewhere); it
                # makes the shared case check num_tokens_per_rdma_rank.
                cases_normal.dispatch_combine(rank, world, case, {**opts, "num_ranks_per_node": world // 2})
        ran[transport] = len(test_normal_dist.CASES)
    ran["low_latency_fused_autograd"] = test_hierarchical_dist.run_low_latency_fused_autograd(rank, world, world // 2)
    if rank == 0:
        print("TWO_HOSTS " + json.dumps({"detected": detected, "ran": ran}), flush=True)
    dist.barrier()  # nobody tears gloo down while a peer may still be talking to it
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
