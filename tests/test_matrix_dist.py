"""Tier 2: the empty-batch matrix (see cases_matrix) at 2 and 4 ranks, on every transport and both kernel
paths, every cell against the reference."""

import pytest

import cases_matrix
from deep_ep_ops import compute

pytestmark = pytest.mark.distributed

NATIVE = pytest.param("native", marks=pytest.mark.skipif(not compute.native_loaded(),
                                                         reason="the C++ kernels of csrc/ are not built here"))


@pytest.mark.parametrize("kernels", ["python", NATIVE])
@pytest.mark.parametrize("transport", ["all_to_all", "shm"])
@pytest.mark.parametrize("world_size", [2, 4])
def test_empty_batches_in_every_op_and_format(pools, world_size, transport, kernels):
    names = pools(world_size).run(cases_matrix.run, transport, kernels)[0]
    assert names == [name for name, *_ in cases_matrix.cases(world_size)]
    assert len(names) == 2 * (len(cases_matrix.NORMAL_FORMATS) + 2 * len(cases_matrix.LL_FORMATS) + 2)
