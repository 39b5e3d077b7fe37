"""Wire quantization formats. These functions are the specification of each format.

The reference and every transport call them, so a format is defined once. ``tests/test_quant.py``
checks them against hand-computed values.

* INT8 per token (DeepEP-Ascend): ``scale = (amax + eps) / 127``, ``q = round_half_even(x / scale)``,
  ``x ≈ q * scale``. Normal mode uses ``eps = 1e-12``. Low-latency uses ``eps = 0`` (``scale = amax/127``),
  and an all-zero row gets ``scale = 0, q = 0``.
* FP8 e4m3 per 128 channels (DeepEP): ``amax = max(|x_block|, 1e-4)``, ``scale = amax / 448`` (the
  dequantization multiplier), ``q = fp8(x * 448 / amax)``. ``round_scale`` rounds the scale up to a power
  of two (``scale = 2^ceil(log2(amax/448))``, ``q = fp8(x / scale)``). ``use_ue8m0`` stores each
  power-of-two scale as its exponent byte and packs four consecutive 128-channel blocks
  little-endian into one int32 (byte ``k`` of pack ``p`` is block ``4p + k``).
"""

from __future__ import annotations

import torch

from ._wire import dense

FP8_MAX = 448.0
FP8_BLOCK = 128
FP8_AMAX_FLOOR = 1e-4
INT8_MAX = 127.0
INT8_NORMAL_EPS = 1e-12


def per_token_int8(x: torch.Tensor, eps: float = INT8_NORMAL_EPS) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantizes each row of ``x`` to INT8 with one float32 scale per row.

    Args:
        x: ``[num_tokens, hidden]`` floating tensor.
        eps: added to the row's absolute maximum before dividing by 127.

    Returns:
        ``(q, scale)``: ``q`` int8 ``[num_tokens, hidden]`` and ``scale`` float32 ``[num_tokens]`` with
        ``x ≈ q * scale[:, None]``.
    """
    low, high = torch.aminmax(x, dim=-1)  # exact in x's dtype, no |x| temporary
    amax = torch.maximum(high.float(), -low.float())
    scale = (amax + eps) / INT8_MAX
    # One fp32 temporary, updated in place: this runs over the whole payload in normal-mode INT8.
    # An all-zero row has scale 0 (eps = 0); dividing it by 1 instead keeps its zeros.
    q = x.to(torch.float32, copy=True).div_(torch.where(scale > 0, scale, torch.ones_like(scale)).unsqueeze(-1))
    return q.round_().clamp_(-INT8_MAX, INT8_MAX).to(torch.int8), scale


def dequant_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`per_token_int8`: float32 ``q * scale`` broadcast over the last dim."""
    return q.float() * scale.unsqueeze(-1)


def pack_ue8m0(scales: torch.Tensor) -> torch.Tensor:
    """Packs power-of-two float32 scales ``[..., B]`` (``B % 4 == 0``) into int32 ``[..., B // 4]``."""
    exponent = (dense(scales).contiguous().view(torch.int32) >> 23) & 0xFF
    exponent = exponent.view(*scales.shape[:-1], scales.shape[-1] // 4, 4)
    shifts = torch.arange(4, device=scales.device, dtype=torch.int32) * 8
    return (exponent << shifts).sum(dim=-1, dtype=torch.int32)


def unpack_ue8m0(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_ue8m0`: int32 ``[..., P]`` to float32 scales ``[..., 4 * P]``."""
    shifts = torch.arange(4, device=packed.device, dtype=torch.int32) * 8
    exponent = (packed.unsqueeze(-1) >> shifts) & 0xFF
    return (exponent << 23).view(torch.float32).reshape(*packed.shape[:-1], packed.shape[-1] * 4)


def per_block_fp8(
    x: torch.Tensor, round_scale: bool = False, use_ue8m0: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantizes ``x`` to float8_e4m3fn with one scale per 128 channels of each row.

    Args:
        x: ``[num_tokens, hidden]`` floating tensor, ``hidden % 128 == 0``
            (``hidden % 512 == 0`` with ``use_ue8m0``).
        round_scale: round each scale up to a power of two.
        use_ue8m0: return the (power-of-two) scales packed as UE8M0 bytes in int32; needs ``round_scale``.

    Returns:
        ``(q, scales)``: ``q`` float8_e4m3fn ``[num_tokens, hidden]``; ``scales`` float32
        ``[num_tokens, hidden // 128]`` (``x ≈ q * scale`` per block), or int32 ``[num_tokens, hidden // 512]``
        with ``use_ue8m0``.
    """
    n, hidden = x.shape
    blocks = x.float().view(n, hidden // FP8_BLOCK, FP8_BLOCK)
    amax = blocks.abs().amax(dim=-1).clamp_(min=FP8_AMAX_FLOOR)
    if round_scale:
        scale = torch.exp2(torch.ceil(torch.log2(amax / FP8_MAX)))
        q = blocks / scale.unsqueeze(-1)
    else:
        scale = amax / FP8_MAX
        q = blocks * (FP8_MAX / amax).unsqueeze(-1)
    q = q.view(n, hidden).to(torch.float8_e4m3fn)
    if use_ue8m0:
        return q, pack_ue8m0(scale)
    return q, scale


def dequant_fp8(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`per_block_fp8` (float or UE8M0-packed scales) to float32 ``[..., hidden]``."""
    if scales.dtype == torch.int32:
        scales = unpack_ue8m0(scales)
    hidden = q.shape[-1]
    blocks = q.float().reshape(*q.shape[:-1], hidden // FP8_BLOCK, FP8_BLOCK)
    return (blocks * scales.unsqueeze(-1)).reshape(q.shape)


def low_latency_wire(x: torch.Tensor, use_fp8: bool, round_scale: bool, use_ue8m0: bool, quant_mode: str):
    """The low-latency wire format of ``x``: ``(data, scales or None)``.

    ``quant_mode="int8"`` gives per-token INT8 with ``scale = amax / 127``; else ``use_fp8`` gives FP8 with
    per-128-channel scales (``round_scale``/``use_ue8m0`` as in :func:`per_block_fp8`); else ``x`` as is.
    """
    if quant_mode == "int8":
        return per_token_int8(x, eps=0.0)
    if use_fp8:
        return per_block_fp8(x, round_scale, use_ue8m0)
    return x, None
