"""Cheap fresh outputs: a pool of pre-faulted buffers, each reused once the caller has dropped its tensor.

Outputs never alias internal buffers: each one owns its memory until the caller lets go of it. But a large
fresh allocation costs its page faults on first touch (a copy into a new tensor runs at a quarter of the
speed of a copy into a reused one here), and glibc returns large freed blocks to the OS, so a plain
``torch.empty`` pays them on every call. The pool keeps the memory mapped: an output is a tensor over a
pooled block (``torch.frombuffer``), the pool holds only a weak reference to its storage, and the block
goes back to the pool when that storage dies. Small outputs (under ``min_bytes``) use ``torch.empty``.
This is a caching allocator for this package's large outputs only; it never changes the process's
allocator (no ``mallopt``, no environment variables).
"""

from __future__ import annotations

import mmap

import torch
from torch.multiprocessing.reductions import StorageWeakRef


class OutputPool:
    """Pre-faulted blocks in power-of-two size classes.

    Args:
        min_bytes: outputs smaller than this are plain ``torch.empty``.
        max_cached_bytes: free blocks beyond this total are unmapped.
    """

    def __init__(self, min_bytes: int = 1 << 20, max_cached_bytes: int = 4 << 30):
        self.min_bytes, self.max_cached_bytes = min_bytes, max_cached_bytes
        self._free: dict[int, list[mmap.mmap]] = {}
        self._busy: list[tuple[StorageWeakRef, mmap.mmap]] = []
        self._cached = 0  # bytes in _free (kept as a count: a decode step reclaims on every call)

    def _reclaim(self) -> None:
        busy = []
        for ref, block in self._busy:
            if ref.expired():
                self._free.setdefault(len(block), []).append(block)
                self._cached += len(block)
            else:
                busy.append((ref, block))
        self._busy = busy
        if self._cached > self.max_cached_bytes:
            for size in sorted(self._free, reverse=True):
                while self._cached > self.max_cached_bytes and self._free[size]:
                    self._free[size].pop().close()
                    self._cached -= size

    def empty(self, shape: tuple[int, ...] | list[int], dtype: torch.dtype) -> torch.Tensor:
        """An uninitialized CPU tensor of ``shape`` and ``dtype`` that the caller owns."""
        numel = 1
        for dim in shape:
            numel *= dim
        nbytes = numel * dtype.itemsize
        if nbytes < self.min_bytes:
            # sizes as separate arguments: torch parses them about half a µs faster than one tuple
            return torch.empty(*shape, dtype=dtype) if len(shape) else torch.empty((), dtype=dtype)
        size = 1 << (nbytes - 1).bit_length()
        if not self._free.get(size):
            self._reclaim()
        free = self._free.get(size)
        if free:
            block = free.pop()
            self._cached -= size
        else:
            block = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_POPULATE", 0))
        out = torch.frombuffer(block, dtype=dtype, count=numel).view(*shape)
        self._busy.append((StorageWeakRef(out.untyped_storage()), block))
        return out

    def clear(self) -> None:
        """Unmaps the free blocks (busy ones are released with their tensors)."""
        for blocks in self._free.values():
            for block in blocks:
                block.close()
        self._free, self._cached = {}, 0
