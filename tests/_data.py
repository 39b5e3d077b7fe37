"""Test inputs: every rank builds *all* ranks' inputs from one seed, so each rank can run the
reference for the whole group and check its own slice without extra communication."""

from __future__ import annotations

import dataclasses

import torch

from deep_ep_ops import quant


@dataclasses.dataclass(frozen=True)
class Case:
    """One routing/payload configuration.

    ``tokens`` is per rank (cycled if shorter than the world); ``dtype`` is ``bfloat16``, ``float32`` or
    ``fp8`` (a ``(float8_e4m3fn, column-major float32 scales)`` tuple); ``drop`` is the fraction of top-k
    slots set to ``-1``; ``routing`` is ``random`` (distinct experts per token) or ``one_expert`` (every
    token selects expert ``num_experts // 2`` in slot 0, the other slots are ``-1``).
    """

    tokens: tuple[int, ...] = (16,)
    hidden: int = 128
    num_experts: int = 8
    num_topk: int = 2
    dtype: str = "bfloat16"
    drop: float = 0.0
    routing: str = "random"
    seed: int = 0

    def __str__(self) -> str:
        t = "x".join(map(str, self.tokens))
        return f"N{t}-H{self.hidden}-E{self.num_experts}-K{self.num_topk}-{self.dtype}-drop{self.drop}-{self.routing}"


def num_tokens(case: Case, rank: int) -> int:
    return case.tokens[rank % len(case.tokens)]


def make_inputs(case: Case, num_ranks: int) -> dict[str, list]:
    """Per-rank ``x``, ``x_scales`` (fp8 only, else None), ``topk_idx``, ``topk_weights``."""
    g = torch.Generator().manual_seed(case.seed)
    out: dict[str, list] = {"x": [], "x_scales": [], "topk_idx": [], "topk_weights": []}
    for r in range(num_ranks):
        n = num_tokens(case, r)
        x = torch.randn(n, case.hidden, generator=g)
        if case.routing == "one_expert":
            idx = torch.full((n, case.num_topk), -1, dtype=torch.int64)
            idx[:, 0] = case.num_experts // 2
        else:
            idx = torch.rand(n, case.num_experts, generator=g).topk(case.num_topk, dim=1).indices
            if case.drop > 0:
                idx = idx.masked_fill(torch.rand(n, case.num_topk, generator=g) < case.drop, -1)
        w = torch.rand(n, case.num_topk, generator=g)
        scales = None
        if case.dtype == "fp8":
            x, scales = quant.per_block_fp8(x)
            scales = scales.t().contiguous().t()  # column-major, as DeepEP's tests pass them
        else:
            x = x.to(getattr(torch, case.dtype))
        out["x"].append(x)
        out["x_scales"].append(scales)
        out["topk_idx"].append(idx)
        out["topk_weights"].append(w)
    return out


def odd_empty(t):
    """``t`` unchanged unless it is empty; then an empty tensor of the same shape and dtype whose strides
    are all 0, as ``expand`` or a reduction over an empty batch can give. Every op must take any strides."""
    if t is None or t.numel() != 0:
        return t
    return torch.empty_strided(t.shape, (0,) * t.dim(), dtype=t.dtype)
