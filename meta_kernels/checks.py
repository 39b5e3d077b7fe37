"""Input checks, written once and run by the fake kernels (compile time) and the real kernels (eager).

Every failure reads ``deepep::<op>: expected <what>, got <actual>`` and is raised with ``torch._check``,
which also works on symbolic and unbacked sizes (it becomes a runtime assert when it cannot be decided
at trace time). Only metadata is checked here; checks that need data (expert ids in range) run in the
kernels and are reported through the handshake so that every rank raises them.
"""

from __future__ import annotations

import torch

from deep_ep_ops import layout

FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
PAYLOAD_DTYPES = FLOAT_DTYPES + (torch.float8_e4m3fn, torch.float8_e5m2, torch.int8, torch.uint8)
QUANT_MODES = ("none", "int8")

# --- limits (README "Limits" has the table and the reasons) -------------------------------------------

#: Largest value of the int32 index and count tensors: token indices (``recv_src_idx``, ``src_info``,
#: ``send_head``), per-expert counts, the handle's prefix sums, and the 32-bit halves of ``layout_range``.
INT32_MAX = 2**31 - 1
#: Largest ``num_topk``: DeepEP's ``kNumMaxTopK``, the top-k room per token in its normal-mode buffer formulas
#: (``tuning.Config`` size hints); it also bounds the O(K^2)-per-token duplicate check of the low-latency plan.
MAX_TOPK = 128


def expect(cond, op: str, expected: str, got, hint: str | None = None) -> None:
    """``torch._check(cond)`` with the project's message format."""
    if cond is True:  # the common case, decided without torch._check's symbolic machinery
        return
    torch._check(cond, lambda: f"deepep::{op}: expected {expected}, got {got}" + (f" ({hint})" if hint else ""))


def check_group(op: str, group_name: str, **facts: tuple[int, int]) -> None:
    """Each group fact passed to an op (``name=(given, the group's own)``) is the group's own value."""
    for name, (given, actual) in facts.items():
        expect(given == actual, op, f"{name} = {actual}, as for group {group_name!r}", given,
               hint="a graph compiled for another group? deep_ep_ops.ops and Buffer pass the group's own values")


def _shape(t: torch.Tensor) -> list:
    return list(t.shape)


def check_tensor(t, op: str, name: str, ndim: int, dtypes, device: torch.device | None = None) -> None:
    """``t`` is a tensor with ``ndim`` dims, one of ``dtypes`` and on ``device``."""
    expect(isinstance(t, torch.Tensor), op, f"{name} to be a tensor", type(t).__name__)
    expect(t.dim() == ndim, op, f"{name} with {ndim} dims", f"shape {_shape(t)}")
    dtypes = dtypes if isinstance(dtypes, tuple) else (dtypes,)
    expect(t.dtype in dtypes, op, f"{name} of dtype {' or '.join(str(d) for d in dtypes)}", t.dtype)
    if device is not None:
        expect(t.device == device, op, f"{name} on {device} like x", t.device)


def check_num_experts(op: str, num_experts: int, num_routed_ranks: int) -> None:
    expect(num_experts > 0, op, "num_experts > 0", num_experts)
    expect(num_experts <= INT32_MAX, op, f"num_experts <= {INT32_MAX} (expert counts and local ids are int32)",
           num_experts)
    expect(num_experts % num_routed_ranks == 0, op,
           f"num_experts divisible by the {num_routed_ranks} ranks that host routed experts", num_experts)


def check_topk(op: str, topk_idx, topk_weights, num_tokens, device, weights_required: bool = False) -> None:
    """``topk_idx`` int64 ``[N, K]`` and ``topk_weights`` float32 ``[N, K]`` (each optional)."""
    if topk_idx is not None:
        check_tensor(topk_idx, op, "topk_idx", 2, torch.int64, device)
        expect(topk_idx.shape[0] == num_tokens, op, f"topk_idx with {num_tokens} rows like x",
               f"shape {_shape(topk_idx)}")
        check_num_topk(op, topk_idx.shape[1])
    if topk_weights is not None:
        check_tensor(topk_weights, op, "topk_weights", 2, torch.float32, device)
        expect(topk_weights.shape[0] == num_tokens, op, f"topk_weights with {num_tokens} rows like x",
               f"shape {_shape(topk_weights)}")
        if topk_idx is not None:
            expect(topk_weights.shape[1] == topk_idx.shape[1], op,
                   f"topk_weights of shape [num_tokens, num_topk] = {_shape(topk_idx)} like topk_idx",
                   f"shape {_shape(topk_weights)}")
    if weights_required:
        expect(topk_weights is not None, op, "topk_weights", None)


def check_num_topk(op: str, num_topk) -> None:
    expect(num_topk <= MAX_TOPK, op, f"num_topk <= {MAX_TOPK}", num_topk,
           hint="DeepEP's kNumMaxTopK, which the buffer size hints assume")


def check_num_tokens(op: str, num_tokens, num_topk=None) -> None:
    """Token indices are int32, and so are per-expert counts, which count every (token, slot) selection."""
    expect(num_tokens <= INT32_MAX, op, f"num_tokens <= {INT32_MAX} (token indices are int32)", num_tokens)
    if num_topk is not None:
        expect(num_tokens * num_topk <= INT32_MAX, op,
               f"num_tokens * num_topk <= {INT32_MAX} (per-expert counts are int32)", num_tokens * num_topk)


def check_layout(topk_idx, num_experts: int, num_ranks: int, num_ranks_per_node: int) -> None:
    op = "get_dispatch_layout"
    check_tensor(topk_idx, op, "topk_idx", 2, torch.int64)
    check_num_topk(op, topk_idx.shape[1])
    check_num_tokens(op, topk_idx.shape[0], topk_idx.shape[1])
    check_num_experts(op, num_experts, num_ranks)
    expect(num_ranks_per_node >= 1 and num_ranks % num_ranks_per_node == 0, op,
           f"num_ranks_per_node dividing num_ranks = {num_ranks}", num_ranks_per_node)


def check_payload(op: str, x, x_scales, quant_mode: str = "none") -> None:
    """``x`` ``[N, H]`` payload, optionally FP8 with ``x_scales`` ``[N, S]``, and the wire quantization."""
    check_tensor(x, op, "x", 2, PAYLOAD_DTYPES)
    expect(x.shape[1] >= 1, op, "hidden >= 1", x.shape[1])
    check_num_tokens(op, x.shape[0])
    expect(quant_mode in QUANT_MODES, op, f"quant_mode in {list(QUANT_MODES)}", repr(quant_mode))
    if x_scales is not None:
        check_tensor(x_scales, op, "x_scales", 2, (torch.float32, torch.int32), x.device)
        expect(x.element_size() == 1, op, "a 1-byte x (e.g. float8_e4m3fn) with x_scales", x.dtype)
        expect(x_scales.shape[0] == x.shape[0], op, f"x_scales with {x.shape[0]} rows like x",
               f"shape {_shape(x_scales)}")
    if quant_mode == "int8":
        expect(x_scales is None and x.dtype in FLOAT_DTYPES, op,
               "a bf16/fp16/fp32 x without x_scales for quant_mode='int8'", x.dtype)


def check_handle(op: str, handle, num_ranks: int, device) -> None:
    """The normal-mode handle: DeepEP's 6 tensors (see ``deep_ep_ops._schemas``)."""
    expect(len(handle) == 6, op, "a dispatch handle of 6 tensors", f"{len(handle)} tensors")
    rank_prefix_matrix, channel_prefix, recv_channel_prefix, recv_src_idx, is_token_in_rank, send_head = handle
    check_tensor(rank_prefix_matrix, op, "handle[0] (rank_prefix_matrix)", 2, torch.int32, device)
    expect(_shape(rank_prefix_matrix) == [num_ranks, num_ranks], op,
           f"handle[0] (rank_prefix_matrix) of shape [{num_ranks}, {num_ranks}] for this group",
           f"shape {_shape(rank_prefix_matrix)}", hint="was the handle made on another group?")
    check_tensor(channel_prefix, op, "handle[1] (channel_prefix_matrix)", 2, torch.int32, device)
    check_tensor(recv_channel_prefix, op, "handle[2] (recv_channel_prefix_matrix)", 2, torch.int32, device)
    check_tensor(recv_src_idx, op, "handle[3] (recv_src_idx)", 1, torch.int32, device)
    check_tensor(is_token_in_rank, op, "handle[4] (is_token_in_rank)", 2, torch.bool, device)
    expect(is_token_in_rank.shape[1] == num_ranks, op,
           f"handle[4] (is_token_in_rank) with {num_ranks} columns", f"shape {_shape(is_token_in_rank)}")
    check_tensor(send_head, op, "handle[5] (send_head)", 2, torch.int32, device)
    expect(send_head.shape[0] == is_token_in_rank.shape[0], op,
           "handle[5] (send_head) with one row per token like handle[4]", f"shape {_shape(send_head)}")


def check_dispatch(x, x_scales, topk_idx, topk_weights, is_token_in_rank, num_tokens_per_expert,
                   num_experts: int, num_ranks: int, expert_alignment: int, num_worst_tokens: int,
                   quant_mode: str, expert_token_nums_type: int) -> None:
    op = "dispatch"
    check_payload(op, x, x_scales, quant_mode)
    num_tokens = x.shape[0]
    check_topk(op, topk_idx, topk_weights, num_tokens, x.device)
    expect(topk_weights is None or topk_idx is not None, op, "topk_idx together with topk_weights", None)
    check_tensor(is_token_in_rank, op, "is_token_in_rank", 2, torch.bool, x.device)
    for dim, size in ((0, num_tokens), (1, num_ranks)):
        expect(is_token_in_rank.shape[dim] == size, op,
               f"is_token_in_rank of shape [num_tokens, num_ranks] = [{num_tokens}, {num_ranks}]",
               f"shape {_shape(is_token_in_rank)}")
    check_num_experts(op, num_experts, num_ranks)
    if num_tokens_per_expert is not None:
        check_tensor(num_tokens_per_expert, op, "num_tokens_per_expert", 1, (torch.int32, torch.int64), x.device)
        expect(num_tokens_per_expert.shape[0] == num_experts, op,
               f"num_tokens_per_expert of shape [num_experts] = [{num_experts}]",
               f"shape {_shape(num_tokens_per_expert)}")
    expect(topk_idx is not None or num_tokens_per_expert is not None, op,
           "topk_idx or num_tokens_per_expert to count tokens per expert", "neither")
    expect(expert_alignment >= 1, op, "expert_alignment >= 1", expert_alignment)
    expect(0 <= num_worst_tokens <= INT32_MAX, op, f"num_worst_tokens in [0, {INT32_MAX}]", num_worst_tokens)
    expect(expert_token_nums_type in (0, 1), op, "expert_token_nums_type (MOE_EXPERT_TOKEN_NUMS_TYPE) in [0, 1]",
           expert_token_nums_type)


def check_cached_dispatch(x, x_scales, topk_weights, handle, num_ranks: int) -> None:
    op = "dispatch"
    check_payload(op, x, x_scales)
    check_handle(op, handle, num_ranks, x.device)
    num_tokens = handle[4].shape[0]
    expect(x.shape[0] == num_tokens, op, f"x with {num_tokens} rows, the token count of the handle's dispatch",
           f"shape {_shape(x)}", hint="a handle from another dispatch?")
    check_topk(op, None, topk_weights, num_tokens, x.device)


def check_combine(x, handle, topk_weights, bias_0, bias_1, num_ranks: int) -> None:
    op = "combine"
    check_tensor(x, op, "x", 2, FLOAT_DTYPES)
    check_handle(op, handle, num_ranks, x.device)
    num_recv = handle[3].shape[0]
    expect(x.shape[0] == num_recv, op, f"x with {num_recv} rows, as many as the dispatch received",
           f"shape {_shape(x)}", hint="a handle from another dispatch?")
    check_topk(op, None, topk_weights, num_recv, x.device)
    num_tokens = handle[4].shape[0]
    for name, bias in (("bias[0]", bias_0), ("bias[1]", bias_1)):
        if bias is not None:
            check_tensor(bias, op, name, 2, FLOAT_DTYPES, x.device)
            for dim, size in ((0, num_tokens), (1, x.shape[1])):
                expect(bias.shape[dim] == size, op, f"{name} of shape [num_tokens, hidden] = "
                       f"[{num_tokens}, {x.shape[1]}]", f"shape {_shape(bias)}")


def check_rows_per_expert(op: str, m: int, num_ranks: int) -> None:
    """``M >= 1`` and ``R * M`` rows per expert indexable by int32 (``src_info``, counts, ``layout_range``)."""
    expect(m >= 1, op, "num_max_dispatch_tokens_per_rank >= 1", m)
    expect(num_ranks * m <= INT32_MAX, op, f"num_ranks * num_max_dispatch_tokens_per_rank <= {INT32_MAX} (rows per "
           f"expert are indexed by int32)", f"{num_ranks} * {m}")


def check_low_latency_dispatch(x, topk_idx, m: int, num_experts: int, num_ranks: int, use_fp8: bool,
                               round_scale: bool, use_ue8m0: bool, quant_mode: str, num_shared: int,
                               expert_token_nums_type: int, op: str = "low_latency_dispatch") -> None:
    check_tensor(x, op, "x", 2, FLOAT_DTYPES)
    expect(x.shape[1] >= 1, op, "hidden >= 1", x.shape[1])
    check_topk(op, topk_idx, None, x.shape[0], x.device)
    expect(topk_idx is not None, op, "topk_idx", None)
    check_rows_per_expert(op, m, num_ranks)
    expect(x.shape[0] <= m, op, f"num_tokens <= num_max_dispatch_tokens_per_rank = {m}", x.shape[0])
    expect(0 <= num_shared < num_ranks, op, f"MOE_SHARED_EXPERT_RANK_NUM in [0, {num_ranks - 1}]", num_shared)
    check_num_experts(op, num_experts, num_ranks - num_shared)
    expect(quant_mode in QUANT_MODES, op, f"quant_mode in {list(QUANT_MODES)}", repr(quant_mode))
    if use_fp8 and quant_mode != "int8":
        block = 512 if use_ue8m0 else 128
        expect(x.shape[1] % block == 0, op, f"hidden divisible by {block} for FP8"
               + (" with use_ue8m0" if use_ue8m0 else ""), x.shape[1])
        expect(round_scale or not use_ue8m0, op, "round_scale=True with use_ue8m0=True", "round_scale=False")
    expect(expert_token_nums_type in (0, 1), op, "expert_token_nums_type (MOE_EXPERT_TOKEN_NUMS_TYPE) in [0, 1]",
           expert_token_nums_type)


def check_low_latency_combine(x, topk_idx, topk_weights, src_info, layout_range, m: int, num_experts: int,
                              num_ranks: int, rank: int, num_shared: int) -> None:
    op = "low_latency_combine"
    expect(0 <= num_shared < num_ranks, op, f"MOE_SHARED_EXPERT_RANK_NUM in [0, {num_ranks - 1}]", num_shared)
    check_num_experts(op, num_experts, num_ranks - num_shared)
    check_rows_per_expert(op, m, num_ranks)
    num_local_experts = layout.num_local_experts(num_experts, num_ranks, rank, num_shared)
    check_tensor(x, op, "x", 3, FLOAT_DTYPES)
    expect(_shape(x)[:2] == [num_local_experts, num_ranks * m], op,
           f"x of shape [num_local_experts, num_ranks * num_max_dispatch_tokens_per_rank, hidden] = "
           f"[{num_local_experts}, {num_ranks * m}, hidden]", f"shape {_shape(x)}")
    check_topk(op, topk_idx, topk_weights, topk_idx.shape[0] if topk_idx is not None else 0, x.device,
               weights_required=True)
    expect(topk_idx.shape[0] <= m, op, f"num_tokens <= num_max_dispatch_tokens_per_rank = {m}", topk_idx.shape[0])
    check_tensor(src_info, op, "handle[0] (src_info)", 2, torch.int32, x.device)
    check_tensor(layout_range, op, "handle[1] (layout_range)", 2, torch.int64, x.device)
    expect(_shape(src_info) == [num_local_experts, num_ranks * m]
           and _shape(layout_range) == [num_local_experts, num_ranks], op,
           f"a handle with src_info [{num_local_experts}, {num_ranks * m}] and layout_range "
           f"[{num_local_experts}, {num_ranks}]",
           f"{_shape(src_info)} and {_shape(layout_range)}", hint="a handle from another dispatch?")


def check_fused(x, topk_idx, topk_weights, gmm1, gmm1_scale, gmm2, gmm2_scale, m: int, num_experts: int,
                num_ranks: int, rank: int, num_shared: int, quant_mode: int) -> None:
    """``fused_deep_moe``'s own inputs (the dispatch half checks ``x`` and ``topk_idx``)."""
    op = "fused_deep_moe"
    expect(quant_mode in (0, 1), op, "quant_mode 0 (bf16 weights) or 1 (int8 W8A8)", quant_mode)
    check_topk(op, topk_idx, topk_weights, x.shape[0], x.device, weights_required=True)
    expect(0 <= num_shared < num_ranks, op, f"MOE_SHARED_EXPERT_RANK_NUM in [0, {num_ranks - 1}]", num_shared)
    check_num_experts(op, num_experts, num_ranks - num_shared)
    num_local_experts, hidden = layout.num_local_experts(num_experts, num_ranks, rank, num_shared), x.shape[1]
    weight_dtypes = (torch.int8,) if quant_mode == 1 else FLOAT_DTYPES
    check_tensor(gmm1, op, "gmm1_permuted_weight", 3, weight_dtypes, x.device)
    check_tensor(gmm2, op, "gmm2_weight", 3, weight_dtypes, x.device)
    two_i = gmm1.shape[2]
    expect(_shape(gmm1)[:2] == [num_local_experts, hidden] and two_i % 2 == 0, op,
           f"gmm1_permuted_weight of shape [num_local_experts, hidden, 2 * intermediate] = "
           f"[{num_local_experts}, {hidden}, 2I]",
           f"shape {_shape(gmm1)}")
    expect(_shape(gmm2) == [num_local_experts, two_i // 2, hidden], op,
           f"gmm2_weight of shape [num_local_experts, intermediate, hidden] = "
           f"[{num_local_experts}, {two_i // 2}, {hidden}]",
           f"shape {_shape(gmm2)}")
    for name, scale, width in (("gmm1_permuted_weight_scale", gmm1_scale, two_i), ("gmm2_weight_scale", gmm2_scale,
                                                                                    hidden)):
        check_tensor(scale, op, name, 2, torch.float32, x.device)
        expect(_shape(scale) == [num_local_experts, width], op, f"{name} of shape [{num_local_experts}, {width}]",
               f"shape {_shape(scale)}")
