"""Tier 2: the MoE layer under torch.compile(fullgraph=True) on 2 and 4 gloo ranks, and opcheck in lockstep."""

import pytest

import cases_compile

pytestmark = [pytest.mark.distributed, pytest.mark.compile]


@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize("backend", ["eager", "aot_eager", "inductor"])
@pytest.mark.parametrize("api", ["ops", "buffer"])
def test_compiled_moe_layer(pools, world_size, backend, api):
    """Forward and backward match eager and the reference; 5 steps with different routings and token
    counts reuse one graph; no graph breaks (the Buffer facade adds none)."""
    results = pools(world_size).run(cases_compile.compile_moe, backend, api)
    assert results == [{"compiles": 1, "graph_breaks": 0}] * world_size


def test_two_buffers_on_two_groups(pools):
    results = pools(2).run(cases_compile.compile_two_groups, "inductor")
    assert len(set(results[0]["groups"])) == 2


def test_opcheck_two_ranks(pools):
    results = pools(2).run(cases_compile.opcheck_all)
    for rank_results in results:
        for name, per_sample in rank_results.items():
            for outcome in per_sample:
                assert set(outcome.values()) == {"SUCCESS"}, (name, outcome)


def test_world_size_change_with_shared_inductor_cache(tmp_path, monkeypatch):
    """The same layer compiled on 2 ranks, then on 4 ranks in fresh processes sharing one inductor cache:
    shapes that depend on the group size are schema arguments, so the 2-rank graph is never reused."""
    from _pool import RankPool

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    for world in (2, 4):
        pool = RankPool(world)
        try:
            assert pool.run(cases_compile.compile_layer_dynamic) == [{"world": world}] * world
        finally:
            pool.close()
