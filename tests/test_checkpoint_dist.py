"""Tier 2: activation checkpointing of an MoE layer (``torch.utils.checkpoint``, non-reentrant) on 2 gloo ranks."""

import pytest

import cases_checkpoint

pytestmark = pytest.mark.distributed

# Eager checkpointing runs the whole forward again in the backward; a compiled one recomputes only what the
# backward needs (the dispatch, for its handle and received rows), not the combine.
EAGER = ["dispatch", "combine", "dispatch", "combine", "cached_dispatch", "combine"]
COMPILED = ["dispatch", "combine", "dispatch", "cached_dispatch", "combine"]


@pytest.mark.parametrize("backend, api", [
    ("eager", "buffer"), ("eager", "ops"),
    pytest.param("aot_eager", "buffer", marks=pytest.mark.compile),
    pytest.param("aot_eager", "ops", marks=pytest.mark.compile),
    pytest.param("inductor", "buffer", marks=pytest.mark.compile),
])
def test_checkpointed_moe_layer(pools, backend, api):
    """Output and gradients of x, gate and expert weights are bitwise those without checkpointing, and every
    rank runs the same communicating ops in the same order, the recomputation included."""
    results = pools(2).run(cases_checkpoint.checkpoint_moe, backend, api)
    want = EAGER if backend == "eager" else COMPILED
    for rank, result in enumerate(results):
        for step in result["ops"]:
            assert [op for _, op in step] == want, (rank, step)
    assert results[0] == results[1]
