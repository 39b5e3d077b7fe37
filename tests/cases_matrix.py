"""The empty-batch matrix: every communicating op × every wire format × a rank with no tokens (and every
rank with none), each case compared with the reference by the case functions of the other modules, on
every transport and both kernel paths.

``N = 0`` on a rank is the normal case in decode (a rank with an empty batch). The empty inputs of every
case carry all-zero strides (``_data.odd_empty``), as ``expand`` or a reduction over an empty batch gives
them, because strides of empty tensors are arbitrary and must never matter.
"""

from __future__ import annotations

import torch.distributed as dist

import cases_fused
import cases_low_latency
import cases_normal
from _data import Case
from cases_fused import FusedCase
from cases_low_latency import LLCase
from cases_normal import env
from deep_ep_ops import Buffer

#: Normal mode: (name, Case.dtype, options). ``cached`` and ``bias`` run cached dispatch and combine too.
NORMAL_FORMATS = [("bf16", "bfloat16", {}), ("fp32", "float32", {}), ("fp8-tuple", "fp8", {}),
                  ("int8-wire", "bfloat16", {"quant_mode": "int8"})]
#: Low-latency wire formats (``LLCase.fmt``), plus an fp32 ``x`` on the bf16 wire.
LL_FORMATS = [("bf16", "bf16", "bfloat16"), ("fp32-x", "bf16", "float32"), ("fp8", "fp8", "bfloat16"),
              ("fp8-round-scale", "fp8_round", "bfloat16"), ("fp8-ue8m0", "ue8m0", "bfloat16"),
              ("int8", "int8", "bfloat16")]


def token_patterns(world: int) -> list[tuple[str, tuple[int, ...]]]:
    """Rank 0 empty while the others have tokens, and every rank empty."""
    return [("one-rank-empty", (0,) + (5,) * (world - 1)), ("all-empty", (0,))]


def cases(world: int) -> list[tuple[str, object, object, dict]]:
    """``(name, case function, case, options)`` for every cell of the matrix."""
    out = []
    for pattern, tokens in token_patterns(world):
        for name, dtype, opts in NORMAL_FORMATS:
            case = Case(tokens=tokens, hidden=256, num_experts=8, num_topk=3, dtype=dtype, drop=0.2)
            out.append((f"normal/{name}/{pattern}", cases_normal.dispatch_combine, case,
                        {**opts, "cached": True, "bias": 1, "odd_empty_strides": True}))
        for name, fmt, x_dtype in LL_FORMATS:
            for hook in (False, True):
                case = LLCase(tokens=tokens, m=6, hidden=512, num_experts=8, num_topk=3, fmt=fmt, drop=0.2,
                              x_dtype=x_dtype, odd_empty=True)
                out.append((f"low_latency/{name}/{'hook' if hook else 'no-hook'}/{pattern}",
                            cases_low_latency.dispatch_combine, case, {"hook": hook}))
        for quant_mode in (1, 0):
            base = LLCase(tokens=tokens, m=6, hidden=256, num_experts=8, num_topk=3, drop=0.2, odd_empty=True)
            out.append((f"fused/quant_mode={quant_mode}/{pattern}", _fused, FusedCase(base, quant_mode=quant_mode), {}))
    return out


def _fused(rank: int, world: int, case: FusedCase, opts: dict):
    return cases_fused.fused_vs_unfused(rank, world, case)


def run(rank: int, world: int, transport: str, kernels: str) -> list[str]:
    """Runs every case in order on every rank, on ``transport`` with ``kernels``; returns the names run (a
    failure raises with its name)."""
    names = []
    with env(DEEP_USE_MODE=transport, DEEP_EP_OPS_KERNELS=kernels):
        buf = Buffer(dist.group.WORLD)
        assert (buf.transport, buf.kernels) == (transport, kernels), (buf.transport, buf.kernels)
        buf.destroy()
        for name, fn, case, opts in cases(world):
            try:
                fn(rank, world, case, opts)
            except BaseException as exc:
                raise AssertionError(f"matrix case {name} failed on rank {rank} ({transport}, {kernels})") from exc
            names.append(name)
    return names
