"""The index of every ``torch.ops.deepep`` op: one ``define`` per op, nothing else.

Recipe for a new op: define it here, add its fake kernel in ``meta_kernels/``, its kernel (and autograd
where it has one) in the matching ``deep_ep_ops`` module, a reference in ``reference.py`` and a case in
``tests/opcheck_samples.py``; the schema snapshot test makes every schema change deliberate.

Conventions shared by all ops:

* ``group_name`` is ``ProcessGroup.group_name``; kernels resolve it, so only tensors, scalars and strings
  cross the op boundary and the ops trace under ``torch.compile(fullgraph=True)``.
* Every group fact that an output shape depends on is an argument too (``num_ranks``; ``rank`` where the
  number of local experts differs between ranks; ``num_ranks_per_node`` for the per-node counts), as in
  PyTorch's functional collectives (``all_gather_into_tensor(input, group_size, group_name)``): inductor
  caches compiled graphs by their content, across processes, so a graph must say which group size it
  was compiled for. Fakes read these arguments, never the group; kernels check them against the group.
  ``deep_ep_ops.ops`` and ``Buffer`` fill them in.
* Handles are tensors. The normal-mode handle is DeepEP V1's intranode 6-tuple, passed as ``Tensor[]``:
  ``[rank_prefix_matrix, channel_prefix_matrix, recv_channel_prefix_matrix, recv_src_idx,
  is_token_in_rank, send_head]``.
* ``comm_seq`` (optional ``[1]`` int64) orders communication as data: every communicating op consumes
  it and returns ``comm_seq + 1`` as ``comm_seq_out``, so no compiler pass can reorder or drop a comm op
  whose successor consumes its sequence tensor. ``Buffer`` threads it for you.
* Optional outputs are empty tensors (e.g. ``recv_topk_idx`` is ``[n, 0]`` without ``topk_idx``); the
  ``Buffer`` facade turns them into ``None`` as DeepEP returns them.

Owned with ``Library("deepep", "DEF")``: a second owner of the namespace (torchtitan's
``torchtitan.distributed.deepep``) fails loudly at import instead of silently replacing our ops.
"""

import torch

lib = torch.library.Library("deepep", "DEF")

# --- normal mode (training, prefill) ---------------------------------------------------------------

lib.define(
    "get_dispatch_layout(Tensor topk_idx, int num_experts, str group_name, int num_ranks, int num_ranks_per_node) -> "
    "(Tensor num_tokens_per_rank, Tensor num_tokens_per_rdma_rank, Tensor num_tokens_per_expert, "
    "Tensor is_token_in_rank)"
)

lib.define(
    "dispatch(Tensor x, Tensor? x_scales, Tensor? topk_idx, Tensor? topk_weights, "
    "Tensor is_token_in_rank, Tensor? num_tokens_per_expert, int num_experts, str group_name, int num_ranks, "
    "int expert_alignment=1, int num_worst_tokens=0, str quant_mode=\"none\", "
    "int expert_token_nums_type=1, Tensor? comm_seq=None) -> "
    "(Tensor recv_x, Tensor recv_x_scales, Tensor recv_topk_idx, Tensor recv_topk_weights, "
    "Tensor num_recv_tokens_per_expert, Tensor rank_prefix_matrix, Tensor channel_prefix_matrix, "
    "Tensor recv_channel_prefix_matrix, Tensor recv_src_idx, Tensor send_head, Tensor comm_seq_out)"
)

# Cached dispatch: re-uses a previous dispatch's layout (no count exchange); the backward of combine.
lib.define(
    "dispatch.cached(Tensor x, Tensor? x_scales, Tensor? topk_weights, Tensor[] handle, "
    "str group_name, int num_ranks, Tensor? comm_seq=None) -> "
    "(Tensor recv_x, Tensor recv_x_scales, Tensor recv_topk_weights, Tensor comm_seq_out)"
)

lib.define(
    "combine(Tensor x, Tensor[] handle, Tensor? topk_weights, Tensor? bias_0, Tensor? bias_1, "
    "str group_name, int num_ranks, Tensor? comm_seq=None) -> "
    "(Tensor combined_x, Tensor combined_topk_weights, Tensor comm_seq_out)"
)

# --- low-latency mode (decode): static shapes, no host sync -------------------------------------------

_LL_DISPATCH_ARGS = (
    "Tensor x, Tensor topk_idx, int num_max_dispatch_tokens_per_rank, int num_experts, str group_name, "
    "int num_ranks, int rank, bool use_fp8=True, bool round_scale=False, bool use_ue8m0=False, str quant_mode=\"none\", "
    "int num_shared_expert_ranks=0, int expert_token_nums_type=1, Tensor? comm_seq=None"
)
_LL_DISPATCH_OUT = ("Tensor packed_recv_x, Tensor packed_recv_x_scales, Tensor packed_recv_count, "
                    "Tensor src_info, Tensor layout_range")
lib.define(f"low_latency_dispatch({_LL_DISPATCH_ARGS}) -> ({_LL_DISPATCH_OUT}, Tensor comm_seq_out)")
# return_recv_hook: the send half returns the (not yet filled) outputs and a token; the receive half
# fills them. The token makes the pair a data dependency.
lib.define(f"low_latency_dispatch_send({_LL_DISPATCH_ARGS}) -> ({_LL_DISPATCH_OUT}, Tensor recv_token, "
           "Tensor comm_seq_out)")
lib.define("low_latency_dispatch_recv(Tensor(a!) packed_recv_x, Tensor(b!) packed_recv_x_scales, "
           "Tensor(c!) packed_recv_count, Tensor(d!) src_info, Tensor(e!) layout_range, Tensor recv_token, "
           "str group_name) -> ()")

_LL_COMBINE_ARGS = (
    "Tensor x, Tensor topk_idx, Tensor topk_weights, Tensor src_info, Tensor layout_range, "
    "int num_max_dispatch_tokens_per_rank, int num_experts, str group_name, int num_ranks, int rank, "
    "int num_shared_expert_ranks=0, Tensor? comm_seq=None"
)
lib.define(f"low_latency_combine({_LL_COMBINE_ARGS}) -> (Tensor combined_x, Tensor comm_seq_out)")
lib.define(f"low_latency_combine_send({_LL_COMBINE_ARGS}) -> (Tensor combined_x, Tensor recv_token, "
           "Tensor comm_seq_out)")
lib.define("low_latency_combine_recv(Tensor(a!) combined_x, Tensor recv_token, str group_name) -> ()")

# --- fused dispatch + expert FFN + combine (DeepEP-Ascend) --------------------------------------------

lib.define(
    "fused_deep_moe(Tensor x, Tensor topk_idx, Tensor topk_weights, Tensor gmm1_permuted_weight, "
    "Tensor gmm1_permuted_weight_scale, Tensor gmm2_weight, Tensor gmm2_weight_scale, "
    "int num_max_dispatch_tokens_per_rank, int num_experts, str group_name, int num_ranks, int rank, int quant_mode=1, "
    "int num_shared_expert_ranks=0, Tensor? comm_seq=None) -> "
    "(Tensor output, Tensor ep_recv_count, Tensor comm_seq_out)"
)

# --- private compute ops: the hot loops (deep_ep_ops.compute); csrc/ registers CPU kernels for them ----

lib.define("_gather_rows(Tensor rows, Tensor index) -> Tensor")
lib.define("_scatter_rows(Tensor(a!) out, Tensor index, Tensor rows) -> ()")
lib.define("_combine_reduce(Tensor rows, Tensor token, int num_tokens, Tensor? bias_0, Tensor? bias_1, "
           "ScalarType out_dtype) -> Tensor")
lib.define("_permute_rows(Tensor(a!) out, Tensor out_index, Tensor rows, Tensor row_index) -> ()")
lib.define("_weighted_reduce(Tensor rows, Tensor slot, Tensor weights) -> Tensor")
lib.define("_ll_plan(Tensor topk_idx, int num_experts, int num_ranks, int rank, int m, int num_shared) -> "
           "(Tensor slot, Tensor counts, Tensor source, Tensor meta)")
lib.define("_ll_combine_rows(Tensor layout_range, int cap, int rows_per_expert) -> Tensor")
lib.define("_dispatch_layout(Tensor topk_idx, int num_experts, int num_ranks, int num_ranks_per_node) -> "
           "(Tensor num_tokens_per_rank, Tensor num_tokens_per_rdma_rank, Tensor num_tokens_per_expert, "
           "Tensor is_token_in_rank)")
lib.define("_ll_sort(Tensor meta, Tensor recv_counts, int cap, int num_local_experts, int rows_per_expert) -> "
           "(Tensor order, Tensor dest, Tensor counts)")
lib.define("_quantize_int8(Tensor x, float eps) -> (Tensor q, Tensor scale)")
lib.define("_quantize_fp8(Tensor x, bool round_scale, bool use_ue8m0) -> (Tensor q, Tensor scales)")

# The shared-memory copy loops of the shm backend (protocol: deep_ep_ops/transports/_shm_engine.py). Each
# returns 1 once this rank's part of the exchange is complete, 0 when budget_s ran out first.
lib.define("_shm_ring_copy(Tensor(a!)[] segments, int[] geometry, Tensor(b!) mirror, Tensor(c!) cursor, Tensor src, "
           "Tensor? index, int[] send_counts, Tensor(d!) out, int[] recv_counts, int rank, float budget_s) -> int")
lib.define("_shm_ring_combine(Tensor(a!)[] segments, int[] geometry, Tensor(b!) mirror, Tensor(c!) cursor, "
           "Tensor rows, int[] send_counts, int[] recv_counts, Tensor token_in_rank, Tensor? bias_0, Tensor? bias_1, "
           "Tensor(d!) out, int rank, float budget_s) -> int")
lib.define("_shm_slots_send(Tensor(a!)[] segments, int[] geometry, int seq, Tensor rows, Tensor? index, "
           "Tensor? patch, int patch_offset, Tensor? header, int[] send_caps, int[] counts, int rank, "
           "Tensor(b!) sent, float budget_s) -> int")
lib.define("_shm_slots_recv(Tensor(a!)[] segments, int[] geometry, int seq, Tensor rows, Tensor? index, "
           "Tensor? patch, int patch_offset, Tensor? header, int[] send_caps, int[] counts, Tensor(b!) out, "
           "Tensor(c!) recv_counts, Tensor(d!)? recv_header, int[] recv_caps, int rank, float budget_s) -> int")
# Normal dispatch, cached dispatch and combine on shm (deep_ep_ops/transports/_shm_normal.py): the handshake, the
# outputs and the rows, with a second call (_shm_dispatch_rows: dispatch and cached dispatch) for rows the first
# one's budget did not cover. 1 done, 0 budget spent (call again), 2 a header
# disagrees, 3 the portable path moves the rows, 4 over the receive limit, 5 rows still to move.
lib.define("_shm_dispatch_agree(Tensor(a!)[] rings, int[] geometry, Tensor(b!) mirror, int[] header, Tensor data, "
           "Tensor? scales, Tensor topk_idx, Tensor? topk_weights, Tensor is_token_in_rank, int[] config, int rank, "
           "Tensor(c!) scratch, float budget_s) -> (int, Tensor[])")
lib.define("_shm_dispatch_rows(Tensor(a!)[] rings, int[] geometry, Tensor(b!) mirror, Tensor data, Tensor? scales, "
           "Tensor? topk_idx, Tensor? topk_weights, Tensor is_token_in_rank, int[] config, int rank, "
           "Tensor(c!)[] outputs, Tensor(d!) scratch, float budget_s) -> int")
lib.define("_shm_cached_agree(Tensor(a!)[] rings, int[] geometry, Tensor(b!) mirror, int[] header, Tensor data, "
           "Tensor? scales, Tensor? topk_weights, Tensor rank_prefix_matrix, int num_recv, Tensor is_token_in_rank, "
           "int[] config, int rank, Tensor(c!) scratch, float budget_s) -> (int, Tensor[])")
lib.define("_shm_combine_agree(Tensor(a!)[] rings, int[] geometry, Tensor(b!) mirror, int[] header, Tensor x, "
           "Tensor? topk_weights, Tensor? bias_0, Tensor? bias_1, Tensor rank_prefix_matrix, Tensor is_token_in_rank, "
           "int[] config, int rank, Tensor(c!) scratch, float budget_s) -> (int, Tensor[])")
lib.define("_shm_combine_rows(Tensor(a!)[] rings, int[] geometry, Tensor(b!) mirror, Tensor x, Tensor? topk_weights, "
           "Tensor? bias_0, Tensor? bias_1, Tensor is_token_in_rank, int[] config, int rank, Tensor(c!)[] outputs, "
           "Tensor(d!) scratch, float budget_s) -> int")
# The low-latency ops on shm in one call each (deep_ep_ops/transports/_shm_low_latency.py): 1 done, 0 budget
# spent (call again), 2 a peer's header disagrees (read recv_header).
lib.define("_shm_ll_dispatch(Tensor(a!)[] segments, int[] geometry, int seq, int[] header, Tensor data, "
           "Tensor? scales, Tensor topk_idx, int[] format, int m, int num_experts, int num_shared, int rank, "
           "int expert_token_nums_type, Tensor(b!) packed, Tensor(c!) packed_scales, Tensor(d!) count, "
           "Tensor(e!) src_info, Tensor(f!) layout_range, Tensor(g!) recv_header, Tensor(h!) state, "
           "float budget_s) -> int")
lib.define("_shm_ll_combine(Tensor(a!)[] segments, int[] geometry, int seq, int[] header, Tensor x, "
           "Tensor layout_range, Tensor topk_idx, Tensor topk_weights, int m, int num_experts, int num_shared, "
           "int rank, Tensor(b!) out, Tensor(c!) recv_header, Tensor(d!) state, float budget_s) -> int")
