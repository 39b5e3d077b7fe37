"""Environment variables, read in this one module and only when asked (never at import).

| variable | default | meaning |
|---|---|---|
| ``DEEP_USE_MODE`` | unset | transport when ``Buffer(transport=None)``: a name of ``deep_ep_ops.transports`` |
| ``DEEP_NORMAL_MODE_USE_INT8_QUANT`` | ``0`` | ``1``: normal dispatch quantizes ``x`` to per-token INT8 on the wire |
| ``MOE_EXPERT_TOKEN_NUMS_TYPE`` | ``1`` | ``1``: per-expert counts; ``0``: inclusive prefix sums (normal list, LL ``packed_recv_count``) |
| ``MOE_SHARED_EXPERT_RANK_NUM`` | ``0`` | ranks ``0..S-1`` host one shared expert each (low-latency and fused ops) |
| ``DEEP_EP_OPS_TIMEOUT_S`` | ``100`` | seconds a rank waits for its peers before raising (``Buffer(timeout_s=)`` wins) |
| ``DEEP_EP_OPS_RANKS_PER_NODE`` | unset | ranks per node, overriding host detection (``Buffer(num_ranks_per_node=)`` wins) |
| ``DEEP_EP_OPS_KERNELS`` | ``auto`` | ``native`` (the C++ kernels of ``csrc/``), ``python`` (pure torch) or ``auto`` (native when built) |

Explicit arguments always win over the environment; ``Buffer`` snapshots these at construction so that
compiled code never reads ``os.environ``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping

#: DeepEP's CPU-side timeout (``NUM_CPU_TIMEOUT_SECS``) is 100 s; we use the same default.
DEFAULT_TIMEOUT_S = 100.0

KERNELS = ("auto", "native", "python")


@dataclasses.dataclass(frozen=True)
class EnvConfig:
    """A validated snapshot of the environment variables above."""

    use_mode: str | None = None
    normal_use_int8: bool = False
    expert_token_nums_type: int = 1
    num_shared_expert_ranks: int = 0
    timeout_s: float = DEFAULT_TIMEOUT_S
    num_ranks_per_node: int | None = None
    kernels: str = "auto"


def _int(environ: Mapping[str, str], name: str, default: int, allowed: range) -> int:
    raw = environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"deepep: expected {name} to be an integer, got {raw!r}") from None
    if value not in allowed:
        raise ValueError(
            f"deepep: expected {name} in [{allowed.start}, {allowed.stop - 1}], got {value}"
        )
    return value


def read_env(environ: Mapping[str, str] | None = None) -> EnvConfig:
    """Parses and validates the environment.

    Args:
        environ: mapping to read instead of ``os.environ`` (tests use this).

    Returns:
        The ``EnvConfig`` snapshot.

    Raises:
        ValueError: a variable is set to a value outside its documented range.
    """
    from . import transports  # the registry is the one source of transport names

    environ = os.environ if environ is None else environ
    mode = environ.get("DEEP_USE_MODE") or None
    if mode is not None:
        mode = transports.canonical(mode, what="DEEP_USE_MODE")
    kernels = (environ.get("DEEP_EP_OPS_KERNELS") or "auto").lower()
    if kernels not in KERNELS:
        raise ValueError(f"deepep: expected DEEP_EP_OPS_KERNELS in {list(KERNELS)}, got {kernels!r}")
    per_node = _int(environ, "DEEP_EP_OPS_RANKS_PER_NODE", 0, range(0, 1 << 20)) or None
    timeout_raw = environ.get("DEEP_EP_OPS_TIMEOUT_S")
    timeout_s = DEFAULT_TIMEOUT_S
    if timeout_raw:
        try:
            timeout_s = float(timeout_raw)
        except ValueError:
            raise ValueError(
                f"deepep: expected DEEP_EP_OPS_TIMEOUT_S to be a number of seconds, got {timeout_raw!r}"
            ) from None
        if timeout_s <= 0:
            raise ValueError(f"deepep: expected DEEP_EP_OPS_TIMEOUT_S > 0, got {timeout_s}")
    return EnvConfig(
        use_mode=mode,
        normal_use_int8=_int(environ, "DEEP_NORMAL_MODE_USE_INT8_QUANT", 0, range(0, 2)) == 1,
        expert_token_nums_type=_int(environ, "MOE_EXPERT_TOKEN_NUMS_TYPE", 1, range(0, 2)),
        num_shared_expert_ranks=_int(environ, "MOE_SHARED_EXPERT_RANK_NUM", 0, range(0, 1 << 20)),
        timeout_s=timeout_s,
        num_ranks_per_node=per_node,
        kernels=kernels,
    )
