"""Tier 2: property-based tests (hypothesis) of normal, low-latency and fused ops against the reference, at
1–4 ranks, every rank drawing the same examples in lockstep (see cases_properties for the design, the
strategies and the profiles).

    python -m pytest -q tests/test_properties_dist.py                                    # the ci profile
    DEEP_EP_OPS_PROPERTY_PROFILE=thorough python -m pytest -q -s tests/test_properties_dist.py -k "R2 and normal"
"""

import time

import pytest

pytest.importorskip("hypothesis")

import cases_properties  # noqa: E402

pytestmark = pytest.mark.distributed


@pytest.mark.parametrize("world_size", cases_properties.WORLD_SIZES, ids=lambda w: f"R{w}")
@pytest.mark.parametrize("mode", cases_properties.MODES)
def test_properties_against_reference(pools, mode, world_size):
    profile = cases_properties.selected_profile()
    seed = cases_properties.selected_seed(profile)
    examples = cases_properties.budget(profile, mode, world_size)
    start = time.perf_counter()
    # A run that had to stop early (ranks out of step, a timeout) raises here with its first failures.
    results = pools(world_size).run(cases_properties.run_mode, mode, profile, seed, examples,
                                    timeout_s=cases_properties.run_timeout_s(examples))
    wall = time.perf_counter() - start
    ran = [r["examples"] for r in results]
    failures = [f for r in results for f in r["failures"]]
    covered = ", ".join(f"{k} {v}" for k, v in sorted(results[0]["features"].items()))
    print(f"\n[{mode} R{world_size}] profile {profile}, seed {seed}: {ran[0]} examples in {wall:.1f} s, "
          f"{len(failures)} failure records; covered: {covered}")
    assert len(set(ran)) == 1, f"ranks ran different numbers of examples: {ran}"
    assert len({r["digest"] for r in results}) == 1, "ranks drew different examples"
    assert ran[0] > 0
    if failures:
        shown = "\n\n".join(f"example: {text}\n{tb}" for text, tb in failures[:3])
        pytest.fail(f"{len(failures)} failure records over {world_size} ranks in {ran[0]} examples; first:\n{shown}",
                    pytrace=False)
