"""Tier 2: normal-mode dispatch/combine on spawned gloo ranks (world sizes 1, 2, 4) against the reference."""

import pytest

import cases_normal
from _data import Case

pytestmark = pytest.mark.distributed

CASES = [
    pytest.param(Case(tokens=(16,)), {}, id="bf16-basic"),
    pytest.param(Case(tokens=(24, 0), hidden=64, num_experts=16, num_topk=4, dtype="float32", drop=0.25),
                 {"bias": 2}, id="fp32-empty-rank-drops-bias"),
    pytest.param(Case(tokens=(12,), hidden=256, num_experts=8, num_topk=3, dtype="fp8"), {"cached": True},
                 id="fp8-tuple-cached"),
    pytest.param(Case(tokens=(20,), num_experts=32, num_topk=8), {"quant_mode": "int8"}, id="int8-wire"),
    pytest.param(Case(tokens=(30, 10), hidden=64, routing="one_expert"), {"expert_alignment": 4},
                 id="one-expert-aligned"),
    pytest.param(Case(tokens=(16,), hidden=64, num_experts=64, num_topk=1), {"num_worst_tokens": 80, "cached": True},
                 id="worst-tokens-cached"),
    pytest.param(Case(tokens=(16, 5), hidden=64, num_experts=256, num_topk=8, drop=0.1),
                 {"token_nums_type": 0, "expert_alignment": 8}, id="prefix-sum-counts-E256-K8"),
    pytest.param(Case(tokens=(8,), hidden=64), {"topk": False}, id="layout-only"),
    pytest.param(Case(tokens=(9,), hidden=64, num_topk=4, drop=0.5), {"weights": False, "cached": True},
                 id="no-weights"),
]


@pytest.mark.parametrize("world_size", [1, 2, 4])
@pytest.mark.parametrize("case, opts", CASES)
def test_dispatch_combine(pools, world_size, case, opts):
    rows = pools(world_size).run(cases_normal.dispatch_combine, case, opts)
    assert len(rows) == world_size


@pytest.mark.parametrize("world_size", [2, 4])
def test_deepseek_shapes(pools, world_size):
    """H = 7168, E = 256, top-8 (DeepEP's test configuration, fewer tokens)."""
    case = Case(tokens=(48,), hidden=7168, num_experts=256, num_topk=8)
    pools(world_size).run(cases_normal.dispatch_combine, case, {"cached": True, "bias": 1})
