"""DeepEP's ``Config``, its per-rank-count tuning tables and its buffer size hints.

The ``all_to_all`` transport allocates per call, so these numbers tune nothing there. They exist so that
code that sizes buffers the DeepEP way runs unchanged and gets the same numbers as with DeepEP (same
formulas as DeepEP's ``config.hpp``). The ``shm`` backend sizes its rings from ``num_nvl_bytes`` and its
low-latency slots from ``num_rdma_bytes``; given the real ``num_topk``, the hints size for it instead of
DeepEP's worst case (128 top-k entries per token, every expert reached by every token).
"""

from __future__ import annotations

import bisect

from . import _handshake
from .transports import _shm_engine

_NUM_MAX_NVL_PEERS = 8
_NUM_MAX_TOPK = 128
_NUM_MAX_SCALES = 128
_SOURCE_META_BYTES = 8
_ALIGNMENT = 128


def _align(n: int, alignment: int = _ALIGNMENT) -> int:
    return (n + alignment - 1) // alignment * alignment


class Config:
    """DeepEP's kernel tuning knobs (accepted; the CPU transports do not use them).

    Args:
        num_sms: SMs for the normal kernels (channels = ``num_sms // 2``).
        num_max_nvl_chunked_send_tokens: tokens pushed per NVLink chunk.
        num_max_nvl_chunked_recv_tokens: NVLink ring-buffer slots per (channel, peer).
        num_max_rdma_chunked_send_tokens: tokens pushed per RDMA chunk.
        num_max_rdma_chunked_recv_tokens: RDMA ring-buffer slots per (channel, peer).
    """

    def __init__(self, num_sms: int = 20, num_max_nvl_chunked_send_tokens: int = 6,
                 num_max_nvl_chunked_recv_tokens: int = 256, num_max_rdma_chunked_send_tokens: int = 6,
                 num_max_rdma_chunked_recv_tokens: int = 256):
        self.num_sms = num_sms
        self.num_max_nvl_chunked_send_tokens = num_max_nvl_chunked_send_tokens
        self.num_max_nvl_chunked_recv_tokens = num_max_nvl_chunked_recv_tokens
        self.num_max_rdma_chunked_send_tokens = num_max_rdma_chunked_send_tokens
        self.num_max_rdma_chunked_recv_tokens = num_max_rdma_chunked_recv_tokens

    def __repr__(self) -> str:
        return (f"Config(num_sms={self.num_sms}, nvl=({self.num_max_nvl_chunked_send_tokens}, "
                f"{self.num_max_nvl_chunked_recv_tokens}), rdma=({self.num_max_rdma_chunked_send_tokens}, "
                f"{self.num_max_rdma_chunked_recv_tokens}))")

    def _per_token_bytes(self, hidden_bytes: int, num_topk: int | None) -> int:
        # DeepEP reserves room for kNumMaxTopK expert ids (int64) and weights (float32) in every token slot.
        topk = _NUM_MAX_TOPK if num_topk is None else num_topk
        return hidden_bytes + _SOURCE_META_BYTES + topk * 8 + topk * 4 + _NUM_MAX_SCALES * 4

    def get_nvl_buffer_size_hint(self, hidden_bytes: int, num_ranks: int, num_topk: int | None = None) -> int:
        """Bytes of NVLink buffer DeepEP needs for ``hidden_bytes`` per token on ``num_ranks`` ranks.

        Args:
            num_topk: the real top-k, instead of DeepEP's room for 128 (``None``: DeepEP's number).
        """
        rdma_ranks = max(num_ranks // _NUM_MAX_NVL_PEERS, 1)
        nvl_ranks = min(num_ranks, _NUM_MAX_NVL_PEERS)
        channels = self.num_sms // 2
        size = channels * nvl_ranks * (2 * rdma_ranks + 3) * 4
        size += (channels * nvl_ranks * self.num_max_nvl_chunked_recv_tokens
                 * self._per_token_bytes(hidden_bytes, num_topk))
        return _align(size)

    def get_rdma_buffer_size_hint(self, hidden_bytes: int, num_ranks: int, num_topk: int | None = None) -> int:
        """Bytes of RDMA buffer DeepEP needs (0 within one node of up to 8 ranks); ``num_topk`` as above."""
        if num_ranks <= _NUM_MAX_NVL_PEERS:
            return 0
        rdma_ranks = num_ranks // _NUM_MAX_NVL_PEERS
        channels = self.num_sms // 2
        slots = channels * rdma_ranks * self.num_max_rdma_chunked_recv_tokens
        size = channels * rdma_ranks * (_NUM_MAX_NVL_PEERS * 2 + 2) * 2 * 4
        size += slots * (self._per_token_bytes(hidden_bytes, num_topk) + 16) * 2
        return _align(size)


# DeepEP's tuned tables: num_ranks -> (nvl_send, nvl_recv, rdma_send, rdma_recv).
_DISPATCH = {2: (24, 256, 6, 128), 4: (6, 256, 6, 128), 8: (6, 256, 6, 128), 16: (36, 288, 20, 128),
             24: (32, 288, 8, 128), 32: (32, 288, 8, 128), 48: (32, 288, 8, 128), 64: (32, 288, 8, 128),
             96: (20, 480, 12, 128), 128: (20, 560, 12, 128), 144: (32, 720, 12, 128), 160: (28, 720, 12, 128)}
_COMBINE = {2: (10, 256, 6, 128), 4: (9, 256, 6, 128), 8: (4, 256, 6, 128), 16: (4, 288, 12, 128),
            24: (1, 288, 8, 128), 32: (1, 288, 8, 128), 48: (1, 288, 8, 128), 64: (1, 288, 8, 128),
            96: (1, 480, 8, 128), 128: (1, 560, 8, 128), 144: (2, 720, 8, 128), 160: (2, 720, 8, 128)}


def table_config(table: dict[int, tuple[int, int, int, int]], num_ranks: int, num_sms: int) -> Config:
    """DeepEP's entry for ``num_ranks``; other counts take the next larger entry (the largest beyond)."""
    if num_ranks < 1:
        raise ValueError(f"deepep: expected num_ranks >= 1, got {num_ranks}")
    keys = sorted(table)
    key = keys[min(bisect.bisect_left(keys, num_ranks), len(keys) - 1)]
    return Config(num_sms, *table[key])


def dispatch_config(num_ranks: int, num_sms: int) -> Config:
    return table_config(_DISPATCH, num_ranks, num_sms)


def combine_config(num_ranks: int, num_sms: int) -> Config:
    return table_config(_COMBINE, num_ranks, num_sms)


def low_latency_rdma_size_hint(num_max_dispatch_tokens_per_rank: int, hidden: int, num_ranks: int,
                               num_experts: int, num_topk: int | None = None, element_size: int = 2,
                               num_shared_expert_ranks: int = 0) -> int:
    """Bytes of ``num_rdma_bytes`` that low-latency exchanges need.

    Without ``num_topk``: DeepEP's own number (its formula sizes for every expert, so its send and receive
    buffers hold ``num_experts * M`` rows each), raised to :func:`low_latency_slot_bytes` for the worst
    top-k when that is larger (only for tiny ``hidden`` and ``M``). With ``num_topk``: exactly what this
    implementation's bounded slots need (:func:`low_latency_slot_bytes`), usually several times less.
    """
    need = low_latency_slot_bytes(num_max_dispatch_tokens_per_rank, hidden, num_ranks, num_experts, num_topk,
                                  element_size, num_shared_expert_ranks)
    if num_topk is not None:
        return need
    return max(_deepep_low_latency_size(num_max_dispatch_tokens_per_rank, hidden, num_experts), need)


def low_latency_slot_bytes(m: int, hidden: int, num_ranks: int, num_experts: int, num_topk: int | None,
                           element_size: int = 2, num_shared_expert_ranks: int = 0) -> int:
    """The slot segment of the ``shm`` backend's bounded slots (``transports/_shm_slots``) for these settings.

    Each rank receives into ``2 * R`` slots (one per source and half). A slot holds one exchange: the
    handshake header and a chunk of ``M * min(K, L)`` rows (``M`` to a shared-expert rank), each row the
    widest of the dispatch wire formats (payload of ``element_size`` bytes, FP8 with per-128 scales, or INT8
    with a per-row scale, plus the 8-byte ``[local expert, token]`` metadata) and the combine rows
    (``hidden * element_size``). ``num_topk=None`` takes the worst case, ``K >= L``.
    """
    num_local_experts = num_experts // max(num_ranks - num_shared_expert_ranks, 1)
    k = num_local_experts if num_topk is None else min(num_topk, num_local_experts)
    cap = max(m * k, m if num_shared_expert_ranks else 0)
    row = max(_align(hidden * element_size, 8) + 8,  # payload as is, then [local expert, token] int32
              _align(hidden, 8) + _align(-(-hidden // 128) * 4, 8) + 8,  # FP8 and its float32 scales
              _align(hidden, 8) + 8 + 8,  # INT8 and its float32 row scale
              hidden * element_size)  # combine: the expert outputs as they are
    header = _align((_handshake._COUNTS + 2 * num_ranks) * 8, 64)
    return _shm_engine.slot_segment_bytes(num_ranks, _align(header + cap * row, 64))


def _deepep_low_latency_size(num_max_dispatch_tokens_per_rank: int, hidden: int, num_experts: int) -> int:
    """DeepEP's low-latency RDMA buffer size (two halves of send, receive and signaling buffers)."""
    num_scales = hidden // 128
    dispatch_msg = 16 + max(hidden * 2, hidden + num_scales * 4)
    combine_msg = num_scales * 4 + hidden * 2
    tokens = num_max_dispatch_tokens_per_rank
    send = max(tokens * dispatch_msg, num_experts * tokens * combine_msg)
    recv = max(num_experts * tokens * dispatch_msg, num_experts * tokens * combine_msg)
    total = 2 * (send + recv + _align(num_experts * 4))
    return (total + _ALIGNMENT) // _ALIGNMENT * _ALIGNMENT
