"""The handshake every communicating op runs first: a fixed-size int64 header exchange.

Its size depends only on the group size, so it is safe when ranks disagree on everything else. It runs
before any exchange whose size depends on arguments, because a gloo exchange with mismatched sizes
aborts the process. Each rank sends every peer one row:

    [MAGIC, op, seq, status, status_arg0..2, settings (up to MAX_SETTINGS words), send_count_to_rank_0..R-1,
     expected_count_from_rank_0..R-1]

``settings`` is the op's own ``NamedTuple`` of named integer fields that every rank must agree on (hidden,
dtype codes, top-k …); its field names are the names in the errors. From the rows every rank raises the
same error when a rank failed its input checks (``status``), when ranks run different ops
(``op``/``seq``), when they disagree on a setting, or when what a rank sends differs from what its peer
expects to receive (a stale or mismatched handle), so an exchange with inconsistent sizes never starts.
Normal-mode ops validate on the host. Low-latency ops validate on the device with ``torch._assert_async``
(no host sync, see :func:`validate_on_device`). The send-count column gives normal dispatch its whole
``[R, R]`` traffic matrix with no extra exchange.
"""

from __future__ import annotations

import datetime

import torch

from . import _waits

MAGIC = 0xDEE9EA
OPS = ("dispatch", "cached_dispatch", "combine", "low_latency_dispatch", "low_latency_combine", "fused_deep_moe")
MAX_SETTINGS = 12
_SEQ, _STATUS, _SETTINGS, _COUNTS = 2, 3, 7, 7 + MAX_SETTINGS

STATUS_OK = (0, 0, 0, 0)
STATUS_CHECK_FAILED = 1  # message is in the store
STATUS_EXPERT_OUT_OF_RANGE = 2  # args: token, slot, value
STATUS_LAYOUT_MISMATCH = 3  # args: token, rank, is_token_in_rank value
STATUS_HANDLE_ROWS = 4  # args: rows the handle claims, rows there are
#: Seconds a rank waits for the message of a peer that failed its checks (see ``_message``).
MESSAGE_WAIT_S = 2.0


def _error_key(ctx, seq: int, rank: int) -> str:
    return f"deepep_ops/{ctx.group_name}/error/{seq}/{rank}"


def header(ctx, op: str, seq: int, settings: tuple, *, send_counts: torch.Tensor | None = None,
           expect_counts: torch.Tensor | None = None, status: tuple[int, int, int, int] = STATUS_OK,
           device: torch.device | str = "cpu") -> torch.Tensor:
    """This rank's ``[R, W]`` header; row ``r`` goes to rank ``r``.

    Args:
        settings: the op's settings ``NamedTuple`` (at most :data:`MAX_SETTINGS` fields).
        send_counts: rows this rank sends each peer; expect_counts: rows it expects from each peer
            (``None``: ``-1``, the receiver learns its counts from the handshake).
    """
    num_ranks = ctx.num_ranks
    sends = [0] * num_ranks if send_counts is None else send_counts.tolist()
    expects = [-1] * num_ranks if expect_counts is None else expect_counts.tolist()
    row = header_row(op, seq, settings, sends, expects, status)
    if torch.device(device).type == "cpu":
        return torch.tensor([row] * num_ranks, dtype=torch.int64)
    # On accelerators: fills with scalar arguments, not a host-to-device copy, so that graphs can capture it.
    rows = torch.zeros(num_ranks, len(row), dtype=torch.int64, device=device)
    for j, value in enumerate(row):
        if value:
            rows[:, j].fill_(value)
    return rows


def header_row(op: str, seq: int, settings: tuple, sends: list[int], expects: list[int],
               status: tuple[int, int, int, int] = STATUS_OK) -> list[int]:
    """One row of :func:`header` as a list (the same row goes to every rank when the counts are per rank)."""
    assert len(settings) <= MAX_SETTINGS, f"{type(settings).__name__} has more than {MAX_SETTINGS} fields"
    return [MAGIC, OPS.index(op), seq, *status, *settings, *([0] * (MAX_SETTINGS - len(settings))), *sends, *expects]


def with_seq(row: list[int], seq: int) -> list[int]:
    """A copy of the header row ``row`` (of :func:`header_row`) numbered ``seq``."""
    row = row.copy()
    row[_SEQ] = seq
    return row


def set_status(rows: torch.Tensor, status: torch.Tensor) -> None:
    """Writes a status computed on the device (int64 ``[4]``: code and three arguments) into every row."""
    rows[:, _STATUS:_SETTINGS] = status


def exchange(ctx, op: str, seq: int, rows: torch.Tensor) -> torch.Tensor:
    """Sends ``rows`` and returns the ``[R, W]`` rows received (row ``s`` came from rank ``s``)."""
    splits = [1] * ctx.num_ranks
    return _waits.wait(ctx, ctx.transport.all_to_all(rows, splits, splits), op, seq)


def agree(ctx, op: str, seq: int, settings: tuple, *, status: tuple[int, int, int, int] | None = None,
          send_counts: torch.Tensor | None = None, expect_counts: torch.Tensor | None = None,
          device: torch.device | str = "cpu") -> torch.Tensor:
    """Header, exchange and host-side validation; returns the ``[R, R]`` send matrix (``[i, j]``: rows rank
    ``i`` sends rank ``j``). Raises the same ``RuntimeError`` on every rank when anything disagrees."""
    rows = header(ctx, op, seq, settings, send_counts=send_counts, expect_counts=expect_counts,
                  status=status or STATUS_OK, device=device)
    received = exchange(ctx, op, seq, rows)
    validate(ctx, op, seq, received, type(settings))
    return received[:, _COUNTS:_COUNTS + ctx.num_ranks]


def report_failure(ctx, op: str, seq: int, message: str, settings_type: type, device) -> None:
    """Joins the handshake as a rank whose input checks failed, then raises what every rank raises.

    The message goes through the store, so the failing rank and its peers all raise the same text
    instead of the peers waiting for a rank that gave up.
    """
    validate(ctx, op, seq, exchange(ctx, op, seq, failed_header(ctx, op, seq, message, settings_type, device)),
             settings_type)


def failed_header(ctx, op: str, seq: int, message: str, settings_type: type, device="cpu") -> torch.Tensor:
    """The header of a rank whose local work failed: the message goes through the store, so that every rank
    raises the same text."""
    _waits.ask_store(ctx, lambda kv: kv.set(_error_key(ctx, seq, ctx.rank), message))
    zeros = (0,) * len(settings_type._fields)
    return header(ctx, op, seq, zeros, status=(STATUS_CHECK_FAILED, 0, 0, 0), device=device)


def run_checks(ctx, op: str, seq: int, settings_type: type, device, prepare):
    """Runs ``prepare`` (the op's input checks and all of its local work before the first exchange) and
    returns its result. If it fails, for any reason, this rank joins the handshake with a failed status
    (see :func:`report_failure`) so that its peers raise the same error instead of waiting for it."""
    try:
        return prepare()
    except Exception as exc:  # noqa: BLE001  (whatever went wrong locally, the peers must hear of it)
        report_failure(ctx, op, seq, describe(op, exc), settings_type, device)
        raise  # reached only if no rank reported a failure, which cannot happen here


def describe(op: str, exc: Exception) -> str:
    """The text peers see: a check's own message, else the exception named, since it is not one of ours."""
    text = str(exc)
    if isinstance(exc, RuntimeError) and text.startswith("deepep::"):
        return text
    return f"deepep::{op}: expected the local work before the exchange to succeed, got {type(exc).__name__}: {text}"


def next_comm_seq(comm_seq: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """``comm_seq_out`` of a communicating op: ``comm_seq + 1``, or zeros without an input sequence."""
    return torch.zeros(1, dtype=torch.int64, device=like.device) if comm_seq is None else comm_seq + 1


def expert_out_of_range(op: str, num_experts, token: int, slot: int, value: int) -> str:
    """The error for an expert id outside ``[-1, num_experts)`` (local layout and handshake alike)."""
    return f"deepep::{op}: expected topk_idx values in [-1, {num_experts}), got {value} at token {token}, slot {slot}"


def expert_id_status(topk_idx: torch.Tensor | None, num_experts: int) -> tuple[int, int, int, int] | None:
    """The handshake status of ``topk_idx`` with ids outside ``[-1, num_experts)`` (``None`` when all are valid)."""
    if topk_idx is None or topk_idx.numel() == 0:
        return None
    low, high = torch.aminmax(topk_idx)
    if int(low) >= -1 and int(high) < num_experts:  # the common case: one pass, two reads
        return None
    bad = (topk_idx < -1) | (topk_idx >= num_experts)
    t, k = (int(i) for i in bad.nonzero()[0])
    return STATUS_EXPERT_OUT_OF_RANGE, t, k, int(topk_idx[t, k])


def _status_message(ctx, op: str, seq: int, rank: int, status: list[int], settings: dict[str, int]) -> str:
    code, a0, a1, a2 = status
    if code == STATUS_EXPERT_OUT_OF_RANGE:
        return f"{expert_out_of_range(op, settings.get('num_experts'), a0, a1, a2)} (on rank {rank})"
    if code == STATUS_LAYOUT_MISMATCH:
        return (f"deepep::{op}: expected is_token_in_rank to match topk_idx (compute both with "
                f"get_dispatch_layout on the same topk_idx), got is_token_in_rank[{a0}, {a1}] = {bool(a2)} "
                f"(on rank {rank})")
    if code == STATUS_HANDLE_ROWS:
        return (f"deepep::{op}: expected a handle whose rank_prefix_matrix fits the {a1} received rows, got one "
                f"claiming {a0} (a stale handle?) (on rank {rank})")
    key = _error_key(ctx, seq, rank)
    text = _waits.ask_store(ctx, lambda kv: _message(kv, key))
    if text is None:
        text = f"deepep::{op}: rank {rank} rejected its inputs (see that rank's error)"
    return f"{text} (on rank {rank})"


def _message(kv, key: str) -> str | None:
    """A failing peer's message: it writes it to the store before it sends its header, yet a read on another
    connection may reach the store first, so the reader waits a little for it."""
    try:
        kv.wait([key], datetime.timedelta(seconds=MESSAGE_WAIT_S))
    except Exception:  # noqa: BLE001  (never written: the peer failed before it could)
        return None
    return kv.get(key).decode()


def validate(ctx, op: str, seq: int, rows: torch.Tensor, settings_type: type) -> None:
    """Host-side validation of exchanged rows; raises the same ``RuntimeError`` on every rank."""
    names = settings_type._fields
    table = rows.tolist()
    if any(r[0] != MAGIC for r in table):
        raise RuntimeError(f"deepep::{op}: expected every rank to run the same deep_ep_ops version, got a "
                           f"foreign handshake")
    where = [(OPS[r[1]] if 0 <= r[1] < len(OPS) else "?", r[2]) for r in table]
    if len(set(where)) > 1:
        seen = ", ".join(f"rank {i} at deepep::{o} #{s}" for i, (o, s) in enumerate(where))
        raise RuntimeError(f"deepep::{op}: expected every rank of group {ctx.group_name!r} to call the same "
                           f"op in the same order, got {seen}")
    for src, r in enumerate(table):
        if r[_STATUS] != 0:
            settings = dict(zip(names, r[_SETTINGS:_SETTINGS + len(names)]))
            raise RuntimeError(_status_message(ctx, op, seq, src, r[_STATUS:_SETTINGS], settings))
    for i, name in enumerate(names):
        values = [r[_SETTINGS + i] for r in table]
        if len(set(values)) > 1:
            seen = ", ".join(f"{v} on rank {s}" for s, v in enumerate(values))
            raise RuntimeError(f"deepep::{op}: expected the same {name} on every rank, got {seen}")
    num_ranks = len(table)
    for dst, r in enumerate(table):
        for src, expected in enumerate(r[_COUNTS + num_ranks:]):
            sent = table[src][_COUNTS + dst]
            if expected >= 0 and sent != expected:
                raise RuntimeError(
                    f"deepep::{op}: expected rank {dst} to receive as many rows as rank {src} sends it, got {sent} "
                    f"sent and {expected} expected (a stale handle, or handles of different dispatches?)")


def validate_on_device(rows: torch.Tensor, mine: torch.Tensor, op: str, what: str) -> None:
    """Device-side validation (no host sync): every row must match ``mine`` and report status 0."""
    same = (rows[:, :_STATUS] == mine[:_STATUS]).all() & (rows[:, _SETTINGS:_COUNTS] == mine[_SETTINGS:_COUNTS]).all()
    torch._assert_async(
        same & (rows[:, _STATUS] == 0).all(),
        f"deepep::{op}: expected every rank to pass its input checks, run the same op in the same order "
        f"and agree on {what}; got a failed check or a mismatch on another rank",
    )
