"""Tier 1: ``torch.library.opcheck`` on every op (world-size-1 group) and the schema snapshot."""

import sys

import expecttest
import pytest
import torch
from opcheck_samples import samples

import deep_ep_ops  # noqa: F401
from deep_ep_ops import compute

UTILS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
# A send half returns a fresh recv_token (and not-yet-filled outputs) on every call by design, so the
# eager-vs-AOT output comparison of test_aot_dispatch_dynamic cannot apply to it. The send -> receive
# pair is checked under torch.compile (aot_eager and inductor) in test_low_latency_compile.py.
UTILS_FOR = {"low_latency_dispatch_send.default": UTILS[:3], "low_latency_combine_send.default": UTILS[:3]}
# The shared-memory copy loops are called only by the shm backend, eagerly, never traced: only their
# schema (what they mutate) is checked here; their behaviour is tested against the pure-torch engine.
SHM_OPS = ("_shm_ring_copy.default", "_shm_ring_combine.default", "_shm_slots_send.default",
           "_shm_slots_recv.default", "_shm_ll_dispatch.default", "_shm_ll_combine.default",
           "_shm_dispatch_agree.default", "_shm_dispatch_rows.default", "_shm_combine_agree.default",
           "_shm_combine_rows.default", "_shm_cached_agree.default")
UTILS_FOR.update({name: ("test_schema",) for name in SHM_OPS})


def utils_for(name: str) -> tuple[str, ...]:
    return UTILS_FOR.get(name, UTILS)


def all_overloads() -> list[str]:
    """Every registered ``deepep::`` overload as ``op.overload`` (from the dispatcher, not ``dir``,
    which only lists ops already touched)."""
    names = [n.removeprefix("deepep::") for n in torch._C._dispatch_get_all_op_names() if n.startswith("deepep::")]
    return sorted(n if "." in n else f"{n}.default" for n in names)


def overload(name: str):
    op, overload = name.split(".")
    return getattr(getattr(torch.ops.deepep, op), overload)


def test_every_op_has_opcheck_samples(group1):
    """A new op without opcheck samples fails here."""
    assert all_overloads() == sorted(samples(group1))


@pytest.mark.parametrize("name", all_overloads())
def test_opcheck(group1, name):
    if name in SHM_OPS and not compute.native_loaded():
        pytest.skip("the shared-memory copy loops have only the C++ kernels of csrc/, which are not built here")
    for args in samples(group1)[name]:
        torch.library.opcheck(overload(name), args, test_utils=utils_for(name))


@pytest.mark.parametrize("name", ["dispatch.default", "dispatch.cached", "combine.default"])
def test_no_grad_calls_skip_the_redispatch(group1, name):
    """Calls that need no gradient run the kernel straight from the autograd kernel
    (``_registry.register_autograd``); calls with gradients, and calls under a dispatch mode, go through
    torch's autograd kernel. Both give the same outputs."""
    args = samples(group1)[name][0]
    plain = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)

    def call(*call_args):
        entered = []
        sys.setprofile(lambda frame, event, _: entered.append(frame.f_code.co_name) if event == "call" else None)
        try:
            out = overload(name)(*call_args)
        finally:
            sys.setprofile(None)
        return out, entered

    out, entered = call(*plain)
    assert "shortcut" in entered and "autograd_impl" not in entered
    with torch.no_grad():
        assert "autograd_impl" not in call(*args)[1]
    grad_out, entered = call(*args)
    assert "autograd_impl" in entered and any(t.grad_fn is not None for t in grad_out)
    for a, b in zip(out[:-1], grad_out[:-1]):  # (comm_seq_out counts calls)
        assert torch.equal(a, b.detach())
    with _PassThrough():
        assert "autograd_impl" in call(*plain)[1]


class _PassThrough(torch.utils._python_dispatch.TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


class TestSchemas(expecttest.TestCase):
    def test_schema_snapshot(self):
        """Every schema, so that a change is deliberate (update with EXPECTTEST_ACCEPT=1)."""
        text = "\n".join(str(overload(name)._schema) for name in all_overloads())
        self.assertExpectedInline(text, """\
deepep::_combine_reduce(Tensor rows, Tensor token, int num_tokens, Tensor? bias_0, Tensor? bias_1, ScalarType out_dtype) -> Tensor
deepep::_dispatch_layout(Tensor topk_idx, int num_experts, int num_ranks, int num_ranks_per_node) -> (Tensor num_tokens_per_rank, Tensor num_tokens_per_rdma_rank, Tensor num_tokens_per_expert, Tensor is_token_in_rank)
deepep::_gather_rows(Tensor rows, Tensor index) -> Tensor
deepep::_ll_combine_rows(Tensor layout_range, int cap, int rows_per_expert) -> Tensor
deepep::_ll_plan(Tensor topk_idx, int num_experts, int num_ranks, int rank, int m, int num_shared) -> (Tensor slot, Tensor counts, Tensor source, Tensor meta)
deepep::_ll_sort(Tensor meta, Tensor recv_counts, int cap, int num_local_experts, int rows_per_expert) -> (Tensor order, Tensor dest, Tensor counts)
deepep::_permute_rows(Tensor(a!) out, Tensor out_index, Tensor rows, Tensor row_index) -> ()
deepep::_quantize_fp8(Tensor x, bool round_scale, bool use_ue8m0) -> (Tensor q, Tensor scales)
deepep::_quantize_int8(Tensor x, float eps) -> (Tensor q, Tensor scale)
deepep::_scatter_rows(Tensor(a!) out, Tensor index, Tensor rows) -> ()
deepep::_shm_cached_agree(Tensor(a!)[] rings, int[] geometry, Tensor(b!) mirror, int[] header, Tensor data, Tensor? scales, Tensor? topk_weights, Tensor rank_prefix_matrix, int num_recv, Tensor is_token_in_rank, int[] config, int rank, Tensor(c!) scratch, float budget_s) -> (int, Tensor[])
deepep::_shm_combine_agree(Tensor(a!)[] rings, int[] geometry, Tensor(b!) mirror, int[] header, Tensor x, Tensor? topk_weights, Tensor? bias_0, Tensor? bias_1, Tensor rank_prefix_matrix, Tensor is_token_in_rank, int[] config, int rank, Tensor(c!) scratch, float budget_s) -> (int, Tensor[])
deepep::_shm_combine_rows(Tensor(a!)[] rings, int[] geometry, Tensor(b!) mirror, Tensor x, Tensor? topk_weights, Tensor? bias_0, Tensor? bias_1, Tensor is_token_in_rank, int[] config, int rank, Tensor(c!)[] outputs, Tensor(d!) scratch, float budget_s) -> int
deepep::_shm_dispatch_agree(Tensor(a!)[] rings, int[] geometry, Tensor(b!) mirror, int[] header, Tensor data, Tensor? scales, Tensor topk_idx, Tensor? topk_weights, Tensor is_token_in_rank, int[] config, int rank, Tensor(c!) scratch, float budget_s) -> (int, Tensor[])
deepep::_shm_dispatch_rows(Tensor(a!)[] rings, int[] geometry, Tensor(b!) mirror, Tensor data, Tensor? scales, Tensor? topk_idx, Tensor? topk_weights, Tensor is_token_in_rank, int[] config, int rank, Tensor(c!)[] outputs, Tensor(d!) scratch, float budget_s) -> int
deepep::_shm_ll_combine(Tensor(a!)[] segments, int[] geometry, int seq, int[] header, Tensor x, Tensor layout_range, Tensor topk_idx, Tensor topk_weights, int m, int num_experts, int num_shared, int rank, Tensor(b!) out, Tensor(c!) recv_header, Tensor(d!) state, float budget_s) -> int
deepep::_shm_ll_dispatch(Tensor(a!)[] segments, int[] geometry, int seq, int[] header, Tensor data, Tensor? scales, Tensor topk_idx, int[] format, int m, int num_experts, int num_shared, int rank, int expert_token_nums_type, Tensor(b!) packed, Tensor(c!) packed_scales, Tensor(d!) count, Tensor(e!) src_info, Tensor(f!) layout_range, Tensor(g!) recv_header, Tensor(h!) state, float budget_s) -> int
deepep::_shm_ring_combine(Tensor(a!)[] segments, int[] geometry, Tensor(b!) mirror, Tensor(c!) cursor, Tensor rows, int[] send_counts, int[] recv_counts, Tensor token_in_rank, Tensor? bias_0, Tensor? bias_1, Tensor(d!) out, int rank, float budget_s) -> int
deepep::_shm_ring_copy(Tensor(a!)[] segments, int[] geometry, Tensor(b!) mirror, Tensor(c!) cursor, Tensor src, Tensor? index, int[] send_counts, Tensor(d!) out, int[] recv_counts, int rank, float budget_s) -> int
deepep::_shm_slots_recv(Tensor(a!)[] segments, int[] geometry, int seq, Tensor rows, Tensor? index, Tensor? patch, int patch_offset, Tensor? header, int[] send_caps, int[] counts, Tensor(b!) out, Tensor(c!) recv_counts, Tensor(d!)? recv_header, int[] recv_caps, int rank, float budget_s) -> int
deepep::_shm_slots_send(Tensor(a!)[] segments, int[] geometry, int seq, Tensor rows, Tensor? index, Tensor? patch, int patch_offset, Tensor? header, int[] send_caps, int[] counts, int rank, Tensor(b!) sent, float budget_s) -> int
deepep::_weighted_reduce(Tensor rows, Tensor slot, Tensor weights) -> Tensor
deepep::combine(Tensor x, Tensor[] handle, Tensor? topk_weights, Tensor? bias_0, Tensor? bias_1, str group_name, int num_ranks, Tensor? comm_seq=None) -> (Tensor combined_x, Tensor combined_topk_weights, Tensor comm_seq_out)
deepep::dispatch.cached(Tensor x, Tensor? x_scales, Tensor? topk_weights, Tensor[] handle, str group_name, int num_ranks, Tensor? comm_seq=None) -> (Tensor recv_x, Tensor recv_x_scales, Tensor recv_topk_weights, Tensor comm_seq_out)
deepep::dispatch(Tensor x, Tensor? x_scales, Tensor? topk_idx, Tensor? topk_weights, Tensor is_token_in_rank, Tensor? num_tokens_per_expert, int num_experts, str group_name, int num_ranks, int expert_alignment=1, int num_worst_tokens=0, str quant_mode="none", int expert_token_nums_type=1, Tensor? comm_seq=None) -> (Tensor recv_x, Tensor recv_x_scales, Tensor recv_topk_idx, Tensor recv_topk_weights, Tensor num_recv_tokens_per_expert, Tensor rank_prefix_matrix, Tensor channel_prefix_matrix, Tensor recv_channel_prefix_matrix, Tensor recv_src_idx, Tensor send_head, Tensor comm_seq_out)
deepep::fused_deep_moe(Tensor x, Tensor topk_idx, Tensor topk_weights, Tensor gmm1_permuted_weight, Tensor gmm1_permuted_weight_scale, Tensor gmm2_weight, Tensor gmm2_weight_scale, int num_max_dispatch_tokens_per_rank, int num_experts, str group_name, int num_ranks, int rank, int quant_mode=1, int num_shared_expert_ranks=0, Tensor? comm_seq=None) -> (Tensor output, Tensor ep_recv_count, Tensor comm_seq_out)
deepep::get_dispatch_layout(Tensor topk_idx, int num_experts, str group_name, int num_ranks, int num_ranks_per_node) -> (Tensor num_tokens_per_rank, Tensor num_tokens_per_rdma_rank, Tensor num_tokens_per_expert, Tensor is_token_in_rank)
deepep::low_latency_combine(Tensor x, Tensor topk_idx, Tensor topk_weights, Tensor src_info, Tensor layout_range, int num_max_dispatch_tokens_per_rank, int num_experts, str group_name, int num_ranks, int rank, int num_shared_expert_ranks=0, Tensor? comm_seq=None) -> (Tensor combined_x, Tensor comm_seq_out)
deepep::low_latency_combine_recv(Tensor(a!) combined_x, Tensor recv_token, str group_name) -> ()
deepep::low_latency_combine_send(Tensor x, Tensor topk_idx, Tensor topk_weights, Tensor src_info, Tensor layout_range, int num_max_dispatch_tokens_per_rank, int num_experts, str group_name, int num_ranks, int rank, int num_shared_expert_ranks=0, Tensor? comm_seq=None) -> (Tensor combined_x, Tensor recv_token, Tensor comm_seq_out)
deepep::low_latency_dispatch(Tensor x, Tensor topk_idx, int num_max_dispatch_tokens_per_rank, int num_experts, str group_name, int num_ranks, int rank, bool use_fp8=True, bool round_scale=False, bool use_ue8m0=False, str quant_mode="none", int num_shared_expert_ranks=0, int expert_token_nums_type=1, Tensor? comm_seq=None) -> (Tensor packed_recv_x, Tensor packed_recv_x_scales, Tensor packed_recv_count, Tensor src_info, Tensor layout_range, Tensor comm_seq_out)
deepep::low_latency_dispatch_recv(Tensor(a!) packed_recv_x, Tensor(b!) packed_recv_x_scales, Tensor(c!) packed_recv_count, Tensor(d!) src_info, Tensor(e!) layout_range, Tensor recv_token, str group_name) -> ()
deepep::low_latency_dispatch_send(Tensor x, Tensor topk_idx, int num_max_dispatch_tokens_per_rank, int num_experts, str group_name, int num_ranks, int rank, bool use_fp8=True, bool round_scale=False, bool use_ue8m0=False, str quant_mode="none", int num_shared_expert_ranks=0, int expert_token_nums_type=1, Tensor? comm_seq=None) -> (Tensor packed_recv_x, Tensor packed_recv_x_scales, Tensor packed_recv_count, Tensor src_info, Tensor layout_range, Tensor recv_token, Tensor comm_seq_out)""")
