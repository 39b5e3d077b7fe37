"""Output shapes shared by the kernels and their fakes (a leaf module: it imports only torch).

A shape is defined once, here, so that the fake kernels of ``meta_kernels`` and the real kernels can
never disagree on what an op returns.
"""

from __future__ import annotations

import torch

#: Low-latency wire formats, in their handshake code order.
WIRE_FORMATS = ("bf16", "fp8", "int8")


def wire_format(use_fp8: bool, quant_mode: str) -> str:
    """The low-latency wire format: ``int8`` (``quant_mode="int8"``), else ``fp8`` or ``bf16``."""
    return "int8" if quant_mode == "int8" else ("fp8" if use_fp8 else "bf16")


def chunk_caps(num_ranks: int, m: int, num_topk: int, num_experts: int, num_shared: int) -> list[int]:
    """Low-latency rows one source can send each rank: ``M`` to a shared-expert rank, ``M * min(K, L)`` else."""
    num_local_experts = num_experts // (num_ranks - num_shared)
    return [m if d < num_shared else m * min(num_topk, num_local_experts) for d in range(num_ranks)]


def low_latency_dispatch_outputs(x: torch.Tensor, num_local_experts: int, num_ranks: int, m: int, fmt_name: str,
                                 use_ue8m0: bool) -> tuple[torch.Tensor, ...]:
    """``(packed_recv_x [L, R*M, H], packed_recv_x_scales, packed_recv_count [L], src_info [L, R*M],
    layout_range [L, R])``, uninitialized."""
    rows, hidden = num_ranks * m, x.shape[1]
    data_dtype = {"bf16": x.dtype, "fp8": torch.float8_e4m3fn, "int8": torch.int8}[fmt_name]
    if fmt_name == "fp8":
        scales = x.new_empty((num_local_experts, rows, hidden // (512 if use_ue8m0 else 128)),
                             dtype=torch.int32 if use_ue8m0 else torch.float32)
    elif fmt_name == "int8":
        scales = x.new_empty((num_local_experts, rows), dtype=torch.float32)
    else:
        scales = x.new_empty((num_local_experts, rows, 0), dtype=torch.float32)
    return (x.new_empty((num_local_experts, rows, hidden), dtype=data_dtype), scales,
            x.new_empty((num_local_experts,), dtype=torch.int32),
            x.new_empty((num_local_experts, rows), dtype=torch.int32),
            x.new_empty((num_local_experts, num_ranks), dtype=torch.int64))


def normal_recv_payload(x: torch.Tensor, x_scales: torch.Tensor | None, quant_mode: str,
                        num_recv) -> tuple[torch.Tensor, torch.Tensor]:
    """``(recv_x, recv_x_scales)`` of a normal dispatch receiving ``num_recv`` rows, uninitialized."""
    if quant_mode == "int8":
        return x.new_empty((num_recv, x.shape[1]), dtype=torch.int8), x.new_empty((num_recv,), dtype=torch.float32)
    scales = (x.new_empty((num_recv, x_scales.shape[1]), dtype=x_scales.dtype) if x_scales is not None
              else x.new_empty((num_recv, 0), dtype=torch.float32))
    return x.new_empty((num_recv, x.shape[1])), scales
