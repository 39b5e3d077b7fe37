"""Fake kernels of the low-latency ops: every shape follows from the arguments alone."""

from __future__ import annotations

import torch

from deep_ep_ops import layout
from deep_ep_ops._schemas import lib

from . import checks


def _dispatch_outputs(x, topk_idx, m, num_experts, num_ranks, rank, use_fp8, round_scale, use_ue8m0, quant_mode,
                      num_shared, expert_token_nums_type):
    checks.check_low_latency_dispatch(x, topk_idx, m, num_experts, num_ranks, use_fp8, round_scale, use_ue8m0,
                                      quant_mode, num_shared, expert_token_nums_type)
    num_local_experts = layout.num_local_experts(num_experts, num_ranks, rank, num_shared)
    fmt_name = layout.wire_format(use_fp8, quant_mode)
    return layout.low_latency_dispatch_outputs(x, num_local_experts, num_ranks, m, fmt_name, use_ue8m0)


def _seq(x):
    return x.new_empty((1,), dtype=torch.int64)


@torch.library.register_fake("deepep::low_latency_dispatch", lib=lib)
def low_latency_dispatch(x, topk_idx, m, num_experts, group_name, num_ranks, rank, use_fp8=True, round_scale=False,
                         use_ue8m0=False, quant_mode="none", num_shared_expert_ranks=0, expert_token_nums_type=1,
                         comm_seq=None):
    outputs = _dispatch_outputs(x, topk_idx, m, num_experts, num_ranks, rank, use_fp8, round_scale, use_ue8m0,
                                quant_mode, num_shared_expert_ranks, expert_token_nums_type)
    return (*outputs, _seq(x))


@torch.library.register_fake("deepep::low_latency_dispatch_send", lib=lib)
def low_latency_dispatch_send(x, topk_idx, m, num_experts, group_name, num_ranks, rank, use_fp8=True,
                              round_scale=False, use_ue8m0=False, quant_mode="none", num_shared_expert_ranks=0,
                              expert_token_nums_type=1, comm_seq=None):
    outputs = _dispatch_outputs(x, topk_idx, m, num_experts, num_ranks, rank, use_fp8, round_scale, use_ue8m0,
                                quant_mode, num_shared_expert_ranks, expert_token_nums_type)
    return (*outputs, torch.empty((1,), dtype=torch.int64), _seq(x))


@torch.library.register_fake("deepep::low_latency_dispatch_recv", lib=lib)
def low_latency_dispatch_recv(packed_recv_x, packed_recv_x_scales, packed_recv_count, src_info, layout_range,
                              recv_token, group_name):
    return None


def _combine_output(x, topk_idx, topk_weights, src_info, layout_range, m, num_experts, num_ranks, rank, num_shared):
    checks.check_low_latency_combine(x, topk_idx, topk_weights, src_info, layout_range, m, num_experts,
                                     num_ranks, rank, num_shared)
    return x.new_empty((topk_idx.shape[0], x.shape[2]))


@torch.library.register_fake("deepep::low_latency_combine", lib=lib)
def low_latency_combine(x, topk_idx, topk_weights, src_info, layout_range, m, num_experts, group_name,
                        num_ranks, rank, num_shared_expert_ranks=0, comm_seq=None):
    out = _combine_output(x, topk_idx, topk_weights, src_info, layout_range, m, num_experts, num_ranks, rank,
                          num_shared_expert_ranks)
    return out, _seq(x)


@torch.library.register_fake("deepep::low_latency_combine_send", lib=lib)
def low_latency_combine_send(x, topk_idx, topk_weights, src_info, layout_range, m, num_experts, group_name,
                             num_ranks, rank, num_shared_expert_ranks=0, comm_seq=None):
    out = _combine_output(x, topk_idx, topk_weights, src_info, layout_range, m, num_experts, num_ranks, rank,
                          num_shared_expert_ranks)
    return out, torch.empty((1,), dtype=torch.int64), _seq(x)


@torch.library.register_fake("deepep::low_latency_combine_recv", lib=lib)
def low_latency_combine_recv(combined_x, recv_token, group_name):
    return None
