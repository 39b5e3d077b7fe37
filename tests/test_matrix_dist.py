"""Tier 2: the empty-batch matrix (see cases_matrix) at 2 and 4 ranks, every cell against the reference."""

import pytest

import cases_matrix

pytestmark = pytest.mark.distributed


@pytest.mark.parametrize("world_size", [2, 4])
def test_empty_batches_in_every_op_and_format(pools, world_size):
    names = pools(world_size).run(cases_matrix.run)[0]
    assert names == [name for name, *_ in cases_matrix.cases(world_size)]
    assert len(names) == 2 * (len(cases_matrix.NORMAL_FORMATS) + 2 * len(cases_matrix.LL_FORMATS) + 2)
