"""Tier 1: communication order is data (comm_seq) under inductor; nothing is reordered or dropped."""

import torch

from deep_ep_ops import _registry, ops

E = 8


def _dispatch(x, idx, g, seq):
    layout = ops.get_dispatch_layout(idx, E, g)
    out = ops.dispatch(x, layout.is_token_in_rank, E, g, topk_idx=idx,
                       num_tokens_per_expert=layout.num_tokens_per_expert, comm_seq=seq)
    return out.recv_x, out.handle, out.comm_seq


def two_microbatches(x1, idx1, x2, idx2, g: str, seq):
    """Program order d1, d2, c2, c1: the micro-batches share no data, only the comm_seq chain."""
    r1, h1, seq = _dispatch(x1, idx1, g, seq)
    r2, h2, seq = _dispatch(x2, idx2, g, seq)
    y2, _, seq = ops.combine(r2 * 2, h2, g, comm_seq=seq)
    _, h3, seq = _dispatch(x1 + 1, idx1, g, seq)  # only comm_seq of this one is used: must not be dropped
    y1, _, seq = ops.combine(r1 * 3, h1, g, comm_seq=seq)
    return y1, y2, seq


def test_inductor_keeps_program_order_and_drops_nothing(group1):
    g = torch.Generator().manual_seed(0)
    x1, x2 = torch.randn(5, 16, generator=g), torch.randn(9, 16, generator=g)
    idx1 = torch.rand(5, E, generator=g).topk(2, dim=1).indices
    idx2 = torch.rand(9, E, generator=g).topk(2, dim=1).indices
    seq = torch.zeros(1, dtype=torch.int64)
    torch._dynamo.reset()
    compiled = torch.compile(two_microbatches, fullgraph=True, backend="inductor")
    ctx = _registry.get(group1)
    ctx.log = []
    try:
        y1, y2, seq_out = compiled(x1, idx1, x2, idx2, group1, seq)
        executed = [(op, rows) for _, op, rows in ctx.log]
    finally:
        ctx.log = None
    # Combine rows are what each dispatch received: with one rank, its own non-empty tokens.
    assert executed == [("dispatch", 5), ("dispatch", 9), ("combine", 9), ("dispatch", 5), ("combine", 5)]
    assert int(seq_out) == 5
    eager = two_microbatches(x1, idx1, x2, idx2, group1, seq)
    torch.testing.assert_close(y1, eager[0])
    torch.testing.assert_close(y2, eager[1])


def _schema(node):
    target = node.target  # Dynamo records the packet (deepep.dispatch), AOT graphs the overload
    return (target.default if isinstance(target, torch._ops.OpOverloadPacket) else target)._schema


def _comm_seq_arg(node):
    names = [a.name for a in _schema(node).arguments]
    i = names.index("comm_seq")
    return node.args[i] if len(node.args) > i else node.kwargs.get("comm_seq")


def test_graph_chains_every_comm_op_through_comm_seq(group1):
    """In the captured graph each comm op consumes the previous one's comm_seq_out: the order is a
    data dependency, so no compiler pass can reorder or drop a comm op."""
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    g = torch.Generator().manual_seed(1)
    x1, x2 = torch.randn(4, 16, generator=g), torch.randn(6, 16, generator=g)
    idx1 = torch.rand(4, E, generator=g).topk(2, dim=1).indices
    idx2 = torch.rand(6, E, generator=g).topk(2, dim=1).indices
    torch._dynamo.reset()
    torch.compile(two_microbatches, fullgraph=True, backend=capture)(
        x1, idx1, x2, idx2, group1, torch.zeros(1, dtype=torch.int64))
    comm = [n for n in graphs[0].graph.nodes if n.op == "call_function" and str(n.target).startswith("deepep.")
            and "layout" not in str(n.target)]
    assert len(comm) == 5
    out_index = {"dispatch": 10, "combine": 2}
    for before, after in zip(comm, comm[1:]):
        link = _comm_seq_arg(after)
        assert link.args[0] is before and link.args[1] == out_index[_schema(before).name.split("::")[1]]
