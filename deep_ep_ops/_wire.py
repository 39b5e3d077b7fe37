"""Row formats on the wire: several per-row tensors packed side by side into one uint8 row.

One exchange then carries a token's payload, scales, expert ids, weights and source index together.
Fields start at 8-byte offsets so that every field can be viewed back as its dtype without a copy.
"""

from __future__ import annotations

import torch

# Codes for dtypes in handshake headers (position = code).
DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float8_e4m3fn, torch.float8_e5m2,
          torch.int8, torch.uint8, torch.int32, torch.int64)


def dtype_code(dtype: torch.dtype | None) -> int:
    return -1 if dtype is None else DTYPES.index(dtype)


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

    def pack(self, num_rows: int, device, **values: torch.Tensor) -> torch.Tensor:
        """uint8 ``[num_rows, row_bytes]`` holding ``values[name]`` (each ``[num_rows, width]`` or
        ``[num_rows]``) in its field; fields not given are left unset."""
        rows = torch.empty(num_rows, self.row_bytes, dtype=torch.uint8, device=device)
        for name, value in values.items():
            offset, dtype, width = self.fields[name]
            nbytes = width * dtype.itemsize
            if nbytes:
                rows[:, offset:offset + nbytes] = value.contiguous().view(torch.uint8).reshape(num_rows, nbytes)
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
