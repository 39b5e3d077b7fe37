"""Tier 2: fused_deep_moe on 2 and 4 gloo ranks (see cases_fused for the tolerances)."""

import pytest

import cases_fused
from cases_fused import FusedCase
from cases_low_latency import LLCase

pytestmark = pytest.mark.distributed

CASES = [
    pytest.param(FusedCase(), id="w8a8"),
    pytest.param(FusedCase(quant_mode=0), id="bf16-weights"),
    pytest.param(FusedCase(LLCase(tokens=(5, 0), m=5, hidden=256, num_experts=8, num_topk=3, drop=0.3)),
                 id="w8a8-drops-empty-rank"),
    pytest.param(FusedCase(LLCase(tokens=(8,), m=8, hidden=512, num_experts=16, num_topk=8, routing="one_expert"),
                           intermediate=256, quant_mode=0), id="bf16-one-expert-K8"),
    pytest.param(FusedCase(LLCase(tokens=(4, 3), m=4, hidden=256, num_experts=6, num_topk=2, shared=1)),
                 id="w8a8-shared-expert-rank"),
]


@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize("case", CASES)
def test_fused_matches_unfused_and_references(pools, world_size, case):
    results = pools(world_size).run(cases_fused.fused_vs_unfused, case)
    assert all(r["rel_err"] < (4e-2 if case.quant_mode == 1 else 1e-2) for r in results)


@pytest.mark.compile
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_fused_compiles_to_one_graph(pools, backend):
    assert pools(2).run(cases_fused.compile_fused, backend) == [{"compiles": 1, "graph_breaks": 0}] * 2
