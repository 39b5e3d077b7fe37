"""Row formats on the wire: several per-row tensors packed side by side into one uint8 row.

One exchange then carries a token's payload, scales, expert ids, weights and source index together.
Fields start at 8-byte offsets so that every field can be viewed back as its dtype without a copy.
"""

from __future__ import annotations

import math

import torch

# Codes for dtypes in handshake headers (position = code).
DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float8_e4m3fn, torch.float8_e5m2,
          torch.int8, torch.uint8, torch.int32, torch.int64)


def dtype_code(dtype: torch.dtype | None) -> int:
    return -1 if dtype is None else DTYPES.index(dtype)


def dense(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when its last dim is dense (so that a dtype view of it is legal), else a dense copy.

    An empty tensor may carry any strides (all 0 after an ``expand``, for instance); ``contiguous()``
    keeps them because an empty tensor counts as contiguous, and no dtype view accepts them. A rank with
    no tokens is the normal case in decode, so every byte view of a caller's tensor goes through here.
    """
    if t.dim() == 0 or t.stride(-1) == 1:
        return t
    if t.numel() == 0:
        return torch.empty(t.shape, dtype=t.dtype, device=t.device)
    return t.contiguous()


def words(rows: torch.Tensor) -> torch.Tensor:
    """``rows`` ``[n, ...]`` (any dtype and strides) viewed as the widest integer words that fit.

    Row copies (``index_select``/``index_copy_``) cost per element on CPU: moving 14 KB rows as int64
    is about 7x faster than as bytes, and ``index_select`` about 20x faster than advanced indexing.
    """
    rows = dense(rows)
    b = rows.reshape(rows.shape[0], math.prod(rows.shape[1:])) if rows.dim() != 2 else rows
    b = b.view(torch.uint8)
    for dtype in (torch.int64, torch.int32, torch.int16):
        size = dtype.itemsize
        if b.shape[1] % size == 0 and b.storage_offset() % size == 0 and b.stride(0) % size == 0:
            return b.view(dtype)
    return b


def _align8(n: int) -> int:
    return (n + 7) // 8 * 8


class RowFormat:
    """A row layout: ordered ``(name, dtype, width)`` fields, each ``width`` elements per row."""

    def __init__(self, fields: list[tuple[str, torch.dtype, int]]):
        self.fields: dict[str, tuple[int, torch.dtype, int]] = {}
        offset = 0
        for name, dtype, width in fields:
            self.fields[name] = (offset, dtype, width)
            offset += _align8(width * dtype.itemsize)
        self.row_bytes = max(offset, 8)

    def pack(self, num_rows: int, device, out: torch.Tensor | None = None, **values: torch.Tensor) -> torch.Tensor:
        """uint8 ``[num_rows, row_bytes]`` (``out`` if given) holding ``values[name]`` (each
        ``[num_rows, width]`` or ``[num_rows]``) in its field; fields not given are left unset."""
        rows = torch.empty(num_rows, self.row_bytes, dtype=torch.uint8, device=device) if out is None else out
        for name, value in values.items():
            offset, dtype, width = self.fields[name]
            nbytes = width * dtype.itemsize
            if nbytes:
                rows[:, offset:offset + nbytes] = dense(value).contiguous().view(torch.uint8).reshape(num_rows, nbytes)
        return rows

    def view(self, rows: torch.Tensor, name: str) -> torch.Tensor:
        """Field ``name`` of ``rows`` as ``[num_rows, width]`` of its dtype (a view, no copy)."""
        offset, dtype, width = self.fields[name]
        nbytes = width * dtype.itemsize
        if nbytes == 0:
            return torch.empty(rows.shape[0], 0, dtype=dtype, device=rows.device)
        return rows[:, offset:offset + nbytes].view(dtype)

    def field_bytes(self, rows: torch.Tensor, name: str) -> torch.Tensor:
        """Field ``name`` of ``rows`` as its raw bytes ``[num_rows, nbytes]`` (a view)."""
        offset, dtype, width = self.fields[name]
        return rows[:, offset:offset + width * dtype.itemsize]
