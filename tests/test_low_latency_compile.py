"""Tier 2: a decode loop over the low-latency ops compiled with fullgraph=True (one graph, no breaks)."""

import pytest

import cases_low_latency

pytestmark = [pytest.mark.distributed, pytest.mark.compile]


@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize("backend, fmt, hook", [("aot_eager", "fp8", False), ("inductor", "bf16", False),
                                                ("inductor", "int8", True)])
def test_compiled_decode_loop(pools, world_size, backend, fmt, hook):
    results = pools(world_size).run(cases_low_latency.decode_loop, backend, fmt, hook)
    assert results == [{"compiles": 1, "graph_breaks": 0}] * world_size
