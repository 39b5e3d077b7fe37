"""Tier 2: low-latency dispatch/combine on 2 and 4 gloo ranks against the reference."""

import re

import pytest

import cases_low_latency
from cases_low_latency import LLCase

pytestmark = pytest.mark.distributed

CASES = [
    pytest.param(LLCase(tokens=(6, 0)), {}, id="bf16-empty-rank"),
    pytest.param(LLCase(tokens=(8,), fmt="fp8"), {}, id="fp8-N-equals-M"),
    pytest.param(LLCase(tokens=(5, 8), fmt="fp8_round", drop=0.3), {"hook": True}, id="fp8-round-scale-drops-hook"),
    pytest.param(LLCase(tokens=(7,), hidden=512, fmt="ue8m0", routing="duplicates"), {"out": True},
                 id="ue8m0-duplicate-ids-out"),
    pytest.param(LLCase(tokens=(8, 3), fmt="int8", routing="one_expert"), {"stats": True}, id="int8-one-expert-stats"),
    pytest.param(LLCase(tokens=(6,), num_experts=16, num_topk=8, fmt="int8", drop=0.2), {"token_nums_type": 0},
                 id="int8-K8-prefix-counts"),
    pytest.param(LLCase(tokens=(4, 0), num_experts=6, num_topk=2, shared=1, fmt="fp8"), {"hook": True},
                 id="shared-expert-rank"),
]


@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize("case, opts", CASES)
def test_low_latency(pools, world_size, case, opts):
    pools(world_size).run(cases_low_latency.dispatch_combine, case, opts)


def test_decode_shapes_7168(pools):
    """DeepEP's decode setting scaled down: H 7168, top-8, 64 experts, FP8."""
    case = LLCase(tokens=(16,), m=16, hidden=7168, num_experts=64, num_topk=8, fmt="fp8")
    pools(4).run(cases_low_latency.dispatch_combine, case, {})


def test_n_over_m_is_a_clear_error(pools):
    """On CPU every rank raises the detailed error of the rank with bad input (see low_latency._agree)."""
    messages = pools(2).run(cases_low_latency.bad_input, "n_over_m")
    assert messages[0] == messages[1], messages
    assert re.search(r"deepep::low_latency_dispatch: expected num_tokens <= num_max_dispatch_tokens_per_rank = 4, "
                     r"got 6 \(on rank 1\)", messages[0]), messages[0]


def test_bad_expert_id_fails_every_rank(pools):
    messages = pools(2).run(cases_low_latency.bad_input, "expert_id")
    assert messages[0] == messages[1], messages
    assert re.search(r"deepep::low_latency_dispatch: expected topk_idx values in \[-1, 8\), got 99 at token 0, "
                     r"slot 0 \(on rank 1\)", messages[0]), messages[0]
