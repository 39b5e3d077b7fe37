"""Tier 1: the reference on a 2-rank case worked out by hand, and invariants on random cases."""

import torch

from deep_ep_ops import reference
from _data import Case, make_inputs

E = 4  # 2 ranks x 2 local experts: rank 0 owns experts 0-1, rank 1 owns 2-3
X = [torch.tensor([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]]), torch.tensor([[4.0, 4.0], [5.0, 5.0]])]
IDX = [torch.tensor([[0, 3], [1, -1], [2, 3]]), torch.tensor([[-1, -1], [3, 0]])]
W = [torch.tensor([[0.1, 0.2], [0.3, 0.4], [0.5, 0.6]]), torch.tensor([[0.7, 0.8], [0.9, 1.0]])]
T, F = True, False


def test_layout_by_hand():
    per_rank, per_node, per_expert, in_rank = reference.get_dispatch_layout(IDX[0], E, 2)
    assert in_rank.tolist() == [[T, T], [T, F], [F, T]]
    assert per_rank.tolist() == [2, 2] and per_node.tolist() == [3] and per_expert.tolist() == [1, 1, 1, 2]
    per_rank, _, per_expert, in_rank = reference.get_dispatch_layout(IDX[1], E, 2)
    assert in_rank.tolist() == [[F, F], [T, T]] and per_rank.tolist() == [1, 1] and per_expert.tolist() == [1, 0, 0, 1]
    # Two nodes of one rank each: distinct tokens per node equal distinct tokens per rank here.
    assert reference.get_dispatch_layout(IDX[0], E, 2, num_ranks_per_node=1)[1].tolist() == [2, 2]


def test_dispatch_by_hand():
    r0, r1 = reference.dispatch(X, IDX, W, E)
    # Rank 0 receives its own tokens 0, 1, then token 1 of rank 1 (source rank, then source token order).
    assert r0.recv_x.tolist() == [[1, 1], [2, 2], [5, 5]]
    assert r0.recv_src_idx.tolist() == [0, 1, 1]
    assert r0.recv_topk_idx.tolist() == [[0, -1], [1, -1], [-1, 0]]
    assert torch.equal(r0.recv_topk_weights, torch.tensor([[0.1, 0.0], [0.3, 0.0], [0.0, 1.0]]))
    assert r0.num_recv_tokens_per_expert.tolist() == [2, 1]
    assert r1.recv_x.tolist() == [[1, 1], [3, 3], [5, 5]]
    assert r1.recv_src_idx.tolist() == [0, 2, 1]
    assert r1.recv_topk_idx.tolist() == [[-1, 1], [0, 1], [1, -1]]
    assert torch.equal(r1.recv_topk_weights, torch.tensor([[0.0, 0.2], [0.5, 0.6], [0.9, 0.0]]))
    assert r1.num_recv_tokens_per_expert.tolist() == [1, 3]
    # Handle: sent = [[2, 2], [1, 1]] (src, dst) so rank_prefix_matrix = cumsum over sources.
    for r in (r0, r1):
        assert r.rank_prefix_matrix.tolist() == [[2, 2], [3, 3]]
        assert r.recv_channel_prefix_matrix.tolist() == [[0], [0]]
    assert r0.channel_prefix_matrix.tolist() == [[2], [2]] and r1.channel_prefix_matrix.tolist() == [[1], [1]]
    assert r0.send_head.tolist() == [[0, 0], [1, -1], [-1, 1]]
    assert r1.send_head.tolist() == [[-1, -1], [0, 0]]


def test_dispatch_options_by_hand():
    r0, r1 = reference.dispatch(X, IDX, W, E, expert_alignment=2)
    assert r0.num_recv_tokens_per_expert.tolist() == [2, 2] and r1.num_recv_tokens_per_expert.tolist() == [2, 4]
    r0, r1 = reference.dispatch(X, IDX, W, E, expert_alignment=2, expert_token_nums_type=0)
    assert r0.num_recv_tokens_per_expert.tolist() == [2, 4] and r1.num_recv_tokens_per_expert.tolist() == [2, 6]
    r0, _ = reference.dispatch(X, IDX, W, E, num_worst_tokens=5)
    assert r0.recv_x.tolist() == [[1, 1], [2, 2], [5, 5], [0, 0], [0, 0]]
    assert r0.recv_topk_idx[3:].tolist() == [[-1, -1], [-1, -1]] and r0.recv_src_idx.tolist() == [0, 1, 1, -1, -1]
    # Layout-only dispatch: counts from num_tokens_per_expert (selections), no expert ids travel.
    layouts = [reference.get_dispatch_layout(i, E, 2) for i in IDX]
    r0, r1 = reference.dispatch(X, None, None, E, is_token_in_rank=[lay[3] for lay in layouts],
                                num_tokens_per_expert=[lay[2] for lay in layouts])
    assert r0.recv_topk_idx is None and r0.num_recv_tokens_per_expert.tolist() == [2, 1]
    assert r1.num_recv_tokens_per_expert.tolist() == [1, 3]


def test_combine_by_hand():
    d = reference.dispatch(X, IDX, W, E)
    (c0, w0), (c1, w1) = reference.combine([r.recv_x for r in d], d, topk_weights=[r.recv_topk_weights for r in d])
    assert c0.tolist() == [[2, 2], [2, 2], [3, 3]]  # token 0 reached both ranks
    assert c1.tolist() == [[0, 0], [10, 10]]  # token 0 of rank 1 selected nothing
    assert torch.equal(w0, torch.tensor([[0.1, 0.2], [0.3, 0.0], [0.5, 0.6]]))
    assert torch.equal(w1, torch.tensor([[0.0, 0.0], [0.9, 1.0]]))
    bias = [(torch.ones(3, 2), None), (None, torch.full((2, 2), 0.5))]
    (c0, _), (c1, _) = reference.combine([r.recv_x for r in d], d, bias=bias)
    assert c0.tolist() == [[3, 3], [3, 3], [4, 4]] and c1.tolist() == [[0.5, 0.5], [10.5, 10.5]]
    # Cached dispatch re-sends along the same layout.
    cached = reference.cached_dispatch([x * 10 for x in X], d)
    assert cached[0][0].tolist() == [[10, 10], [20, 20], [50, 50]] and cached[1][0][:, 0].tolist() == [10, 30, 50]


def test_invariants_random():
    case = Case(tokens=(13, 0, 7, 21), hidden=8, num_experts=16, num_topk=4, dtype="float32", drop=0.3)
    inp = make_inputs(case, 4)
    x = [t.round() for t in inp["x"]]  # integers: sums are exact in fp32
    d = reference.dispatch(x, inp["topk_idx"], inp["topk_weights"], case.num_experts)
    layouts = [reference.get_dispatch_layout(i, case.num_experts, 4) for i in inp["topk_idx"]]
    for r in range(4):
        assert d[r].recv_x.shape[0] == sum(lay[0][r] for lay in layouts)  # one row per (token, rank)
        src = d[r].recv_src_idx
        blocks = torch.diff(d[r].rank_prefix_matrix[:, r], prepend=torch.zeros(1, dtype=torch.int32))
        for s, (begin, n) in enumerate(zip(d[r].rank_prefix_matrix[:, r] - blocks, blocks)):
            assert torch.all(torch.diff(src[begin:begin + n]) > 0)  # ascending source tokens per block
    combined = reference.combine([r.recv_x for r in d], d)
    for s in range(4):
        fanout = layouts[s][3].sum(1, keepdim=True).float()
        assert torch.equal(combined[s][0], x[s] * fanout)


def test_reference_autograd():
    """The reference is differentiable: d(sum(combine(dispatch(x))))/dx = number of ranks per token."""
    case = Case(tokens=(6, 9), hidden=4, num_experts=8, num_topk=3, dtype="float32", drop=0.2)
    inp = make_inputs(case, 2)
    x = [t.clone().requires_grad_() for t in inp["x"]]
    w = [t.clone().requires_grad_() for t in inp["topk_weights"]]
    d = reference.dispatch(x, inp["topk_idx"], w, case.num_experts)
    out = reference.combine([r.recv_x for r in d], d, topk_weights=[r.recv_topk_weights for r in d])
    sum(c.sum() + cw.sum() for c, cw in out).backward()
    for s in range(2):
        fanout = reference.get_dispatch_layout(inp["topk_idx"][s], 8, 2)[3].sum(1, keepdim=True).float()
        assert torch.equal(x[s].grad, fanout.expand_as(x[s]))
        assert torch.equal(w[s].grad, (inp["topk_idx"][s] >= 0).float())
