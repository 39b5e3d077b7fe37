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


def bytes_per_path(rank: int, world: int, per_node: int) -> dict:
    """One dispatch + combine on the flat and the hierarchical transport: the bytes each sends across nodes,
    and the rows a node-aware path must send: one per distinct (token, remote node)."""
    import torch
    import torch.distributed as dist

    from deep_ep_ops import Buffer, _registry

    g = torch.Generator().manual_seed(rank)
    x = torch.randn(64, 256, generator=g).bfloat16()
    idx = torch.rand(64, 32, generator=g).topk(4, dim=1).indices
    out = {}
    for transport in ("all_to_all", "hierarchical"):
        buf = Buffer(dist.group.WORLD, transport=transport, num_ranks_per_node=per_node)
        try:
            per_rank, per_node_count, per_expert, in_rank, _ = buf.get_dispatch_layout(idx, 32)
            buf.get_bytes_sent(reset=True)
            recv_x, _, _, _, handle, _ = buf.dispatch(x, topk_idx=idx, num_tokens_per_rank=per_rank,
                                                      is_token_in_rank=in_rank, num_tokens_per_expert=per_expert)
            dispatched = buf.get_bytes_sent(reset=True)
            buf.combine(recv_x, handle)
            out[transport] = (dispatched, buf.get_bytes_sent(reset=True))
            if transport == "hierarchical":  # the stages inside a node ran on shared memory
                node = _registry.get(buf.group_name).transport._node_ctx
                out["node_backend"] = (node.transport.name, node.num_ranks, node.transport.bytes_sent["intra_node"])
        finally:
            buf.destroy()
    my_node = rank // per_node
    remote_nodes = [b for b in range(world // per_node) if b != my_node]
    out["rows_per_token_node"] = int(sum(per_node_count[b] for b in remote_nodes))
    out["rows_per_token_rank"] = int(in_rank[:, [r for r in range(world) if r // per_node != my_node]].sum())
    return out


@pytest.mark.parametrize("world_size, per_node", [(4, 2)])
def test_cross_node_bytes(pools, world_size, per_node):
    """Across nodes, hierarchical dispatch and combine send one payload row per distinct (token, remote node),
    flat one per (token, remote rank); both add small per-row metadata and fixed-size handshakes."""
    row, per_row_meta, fixed = 256 * 2, 128, 4096
    results = pools(world_size).run(bytes_per_path, per_node)
    # Over the whole group: what the ranks send across nodes is what their tokens need across nodes.
    per_token_rank = sum(r["rows_per_token_rank"] for r in results)
    per_token_node = sum(r["rows_per_token_node"] for r in results)
    for d in (0, 1):  # dispatch, combine
        flat = sum(r["all_to_all"][d]["inter_node"] for r in results)
        hier = sum(r["hierarchical"][d]["inter_node"] for r in results)
        assert per_token_rank * row <= flat, (d, flat, per_token_rank)
        assert per_token_node * row <= hier <= per_token_node * (row + per_row_meta) + fixed * world_size, (d, hier)
        assert hier < flat, (d, hier, flat)
    for r in results:
        name, size, moved = r["node_backend"]
        assert (name, size) == ("shm", per_node) and moved > 0, r["node_backend"]


def run_low_latency_fused_autograd(rank: int, world: int, per_node: int) -> int:
    """Low-latency and fused ops (flat across nodes, as DeepEP's) and a compiled MoE layer's forward and
    backward (against the reference's autograd) on the hierarchical transport."""
    import cases_compile
    import cases_fused
    import cases_low_latency
    import test_fused_dist
    import test_low_latency_dist

    ran = 0
    with cases_normal.env(DEEP_USE_MODE="hierarchical", DEEP_EP_OPS_RANKS_PER_NODE=str(per_node)):
        for param in test_low_latency_dist.CASES:
            case, opts = param.values
            cases_low_latency.dispatch_combine(rank, world, case, opts)
            ran += 1
        for param in test_fused_dist.CASES:
            cases_fused.fused_vs_unfused(rank, world, param.values[0])
            ran += 1
        assert cases_compile.compile_moe(rank, world, "aot_eager", "buffer") == {"compiles": 1, "graph_breaks": 0}
    return ran


@pytest.mark.compile
def test_low_latency_fused_and_autograd_across_nodes(pools):
    assert len(set(pools(4).run(run_low_latency_fused_autograd, 2))) == 1
