"""The expert computation of ``fused_deep_moe``, and its weight layout.

The fused kernel, the unfused chain built from the public ops and the reference all call
:func:`expert_ffn`, so fused and unfused results are comparable row for row.

Weight layout (``E_l`` local experts, hidden ``H``, intermediate ``I``):

* ``gmm1_permuted_weight [E_l, H, 2I]``: per expert the gate projection in columns ``[0, I)`` and the up
  projection in ``[I, 2I)``; ``gmm1_permuted_weight_scale [E_l, 2I]`` float32, one per output channel.
  (DeepEP-Ascend interleaves 64-column tiles of the two halves for its NPU kernel; here the halves are
  plain, and the name is kept for API compatibility.)
* ``gmm2_weight [E_l, I, H]``, ``gmm2_weight_scale [E_l, H]`` float32.
* ``quant_mode=1``: int8 weights (``w ≈ q * scale`` per output channel). ``quant_mode=0``: bf16 (or fp16/fp32)
  weights, and the scales are unused.

:func:`make_fused_weights` builds these from per-expert ``w13 [E_l, 2I, H]`` (gate rows, then up rows) and
``w2 [E_l, H, I]``, the way MoE models store them (``y = x @ w.T``).
"""

from __future__ import annotations

import torch

from . import quant


def make_fused_weights(w13: torch.Tensor, w2: torch.Tensor, quant_mode: int = 1):
    """Builds ``(gmm1_permuted_weight, gmm1_permuted_weight_scale, gmm2_weight, gmm2_weight_scale)``.

    Args:
        w13: ``[E_l, 2I, H]`` gate and up projections (rows ``[0, I)`` gate, ``[I, 2I)`` up), floating.
        w2: ``[E_l, H, I]`` down projection, floating.
        quant_mode: 1 quantizes each output channel to int8 (``scale = amax / 127``); 0 keeps bf16
            weights and returns unit scales.

    Returns:
        ``gmm1 [E_l, H, 2I]``, ``scale1 [E_l, 2I]`` float32, ``gmm2 [E_l, I, H]``, ``scale2 [E_l, H]`` float32.
    """
    if quant_mode == 1:
        q13, s13 = quant.per_token_int8(w13.reshape(-1, w13.shape[-1]).float(), eps=0.0)
        q2, s2 = quant.per_token_int8(w2.reshape(-1, w2.shape[-1]).float(), eps=0.0)
        return (q13.view(w13.shape).transpose(1, 2).contiguous(), s13.view(w13.shape[:2]),
                q2.view(w2.shape).transpose(1, 2).contiguous(), s2.view(w2.shape[:2]))
    return (w13.transpose(1, 2).to(torch.bfloat16).contiguous(), torch.ones(w13.shape[:2]),
            w2.transpose(1, 2).to(torch.bfloat16).contiguous(), torch.ones(w2.shape[:2]))


def expert_ffn(x: torch.Tensor, x_scale: torch.Tensor | None, gmm1: torch.Tensor, gmm1_scale: torch.Tensor,
               gmm2: torch.Tensor, gmm2_scale: torch.Tensor, quant_mode: int) -> torch.Tensor:
    """One expert on its rows: ``SwiGLU(x @ gmm1) @ gmm2`` with W8A8 or bf16 weights.

    Args:
        x: ``[rows, H]`` int8 with ``x_scale [rows]`` float32 (``quant_mode=1``), or bf16 (``quant_mode=0``).
        gmm1, gmm1_scale, gmm2, gmm2_scale: one expert's slice of the layout above.

    Returns:
        bf16 ``[rows, H]``. With ``quant_mode=1``: int32 GEMMs (``torch._int_mm``), dequantized with the
        per-row activation scale times the per-channel weight scale, SwiGLU ``silu(gate) * up`` in fp32,
        per-row INT8 requantization (``scale = amax / 127``), second int32 GEMM, dequantized, rounded once.
        With ``quant_mode=0``: GEMMs in the weights' dtype (bf16 inputs, fp32 accumulation, bf16 results,
        as bf16 models run), SwiGLU in fp32.
    """
    if quant_mode == 1:
        h = torch._int_mm(x, gmm1).float() * x_scale.unsqueeze(1) * gmm1_scale.unsqueeze(0)
    else:
        h = (x.to(gmm1.dtype) @ gmm1).float()
    inter = h.shape[1] // 2
    a = torch.nn.functional.silu(h[:, :inter]) * h[:, inter:]
    if quant_mode == 1:
        q, s = quant.per_token_int8(a, eps=0.0)
        y = torch._int_mm(q, gmm2).float() * s.unsqueeze(1) * gmm2_scale.unsqueeze(0)
    else:
        y = a.to(gmm2.dtype) @ gmm2
    return y.to(torch.bfloat16)
