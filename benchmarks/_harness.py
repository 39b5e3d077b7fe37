"""Shared benchmark plumbing: timing statistics, spawned gloo ranks, progress, tables and ``--json``.

Times are per call in microseconds: median and p10/p90 over iterations, each the max over ranks
(the slowest rank bounds a collective step). Ranks synchronize with a barrier before every timed
call so that launch skew does not count.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def base_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--ranks", type=int, default=4, help="gloo ranks to spawn (default 4)")
    p.add_argument("--iters", type=int, default=20, help="timed iterations per config (default 20)")
    p.add_argument("--warmup", type=int, default=3, help="untimed iterations first (default 3)")
    p.add_argument("--json", metavar="PATH", help="also write the rows as JSON to PATH")
    return p


def time_calls(fn: Callable[[], object], iters: int, warmup: int, group=None) -> list[float]:
    """Per-call seconds of ``fn``, each the max over the group's ranks, after a barrier."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(iters):
        if group is not None:
            dist.barrier(group)
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    t = torch.tensor(samples, dtype=torch.float64)
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return t.tolist()


def summary_us(samples: list[float]) -> dict[str, float]:
    """Median and p10/p90 in microseconds."""
    q = statistics.quantiles(samples, n=10, method="inclusive") if len(samples) > 1 else samples * 9
    return {"median_us": statistics.median(samples) * 1e6, "p10_us": q[0] * 1e6, "p90_us": q[-1] * 1e6}


#: Wire bytes of one row per format (DESIGN §7): BF16 2·H; FP8 H + 4·H/128 scales; INT8 H + 4.
ROW_BYTES = {"bf16": lambda h: 2 * h, "fp8": lambda h: h + 4 * (h // 128), "int8": lambda h: h + 4}

#: Columns of a dispatch/combine row (see :func:`comm_row`), after a benchmark's own leading columns.
COMM_COLUMNS = [("dispatch_us", "dispatch µs", ".0f"), ("dispatch_p10_us", "p10", ".0f"),
                ("dispatch_p90_us", "p90", ".0f"), ("dispatch_GBps", "GB/s", ".3f"),
                ("baseline_dispatch_us", "a2a µs", ".0f"), ("baseline_dispatch_GBps", "a2a GB/s", ".3f"),
                ("combine_us", "combine µs", ".0f"), ("combine_p10_us", "p10", ".0f"), ("combine_p90_us", "p90", ".0f"),
                ("combine_GBps", "GB/s", ".3f"), ("baseline_combine_us", "a2a µs", ".0f"),
                ("baseline_combine_GBps", "a2a GB/s", ".3f")]


def raw_all_to_all(send_counts: torch.Tensor, row_bytes: int, group) -> Callable[[], object]:
    """The baseline: one plain ``all_to_all_single`` of ``send_counts`` rows per destination (counts exchanged
    up front, buffers allocated once)."""
    recv_counts = torch.empty_like(send_counts)
    dist.all_to_all_single(recv_counts, send_counts, group=group)
    send = torch.empty(int(send_counts.sum()), row_bytes, dtype=torch.uint8)
    recv = torch.empty(int(recv_counts.sum()), row_bytes, dtype=torch.uint8)
    s, r = send_counts.tolist(), recv_counts.tolist()
    return lambda: dist.all_to_all_single(recv, send, r, s, group=group)


def comm_row(dispatch: Callable[[], object], combine: Callable[[], object], send_counts: torch.Tensor,
             row_bytes: int, hidden: int, rows_moved: int, iters: int, warmup: int, group) -> dict:
    """Times dispatch, combine and the baseline moving the same rows both ways; returns the row for
    :data:`COMM_COLUMNS` (GB/s = ``rows_moved`` × bytes per row / median time; combine rows are bf16)."""
    t = {name: summary_us(time_calls(fn, iters, warmup, group)) for name, fn in (
        ("dispatch", dispatch), ("combine", combine),
        ("baseline_dispatch", raw_all_to_all(send_counts, row_bytes, group)),
        ("baseline_combine", raw_all_to_all(send_counts, 2 * hidden, group)))}
    row = {}
    for name, nbytes in (("dispatch", row_bytes), ("combine", 2 * hidden)):
        row.update({f"{name}_us": t[name]["median_us"], f"{name}_p10_us": t[name]["p10_us"],
                    f"{name}_p90_us": t[name]["p90_us"], f"{name}_GBps": rows_moved * nbytes / t[name]["median_us"] / 1e3,
                    f"baseline_{name}_us": t[f"baseline_{name}"]["median_us"],
                    f"baseline_{name}_GBps": rows_moved * nbytes / t[f"baseline_{name}"]["median_us"] / 1e3})
    return row


def progress(i: int, n: int, what: str) -> None:
    print(f"[{i}/{n}] {what}", file=sys.stderr, flush=True)


def print_table(title: str, columns: list[tuple[str, str, str]], rows: list[dict]) -> None:
    """``columns`` = (key, header, format spec)."""
    print(f"\n{title}")
    widths = [max(len(h), *(len(format(r[k], f)) for r in rows)) for k, h, f in columns]
    print("  ".join(h.rjust(w) for (_, h, _), w in zip(columns, widths)))
    for r in rows:
        print("  ".join(format(r[k], f).rjust(w) for (k, _, f), w in zip(columns, widths)))


def write_json(path: str | None, payload: dict) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(payload, f, indent=2)
        print(f"\nwrote {path}")


def _entry(rank: int, world: int, port: int, fn, args, queue) -> None:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=600))
    import deep_ep_ops  # noqa: F401

    result = fn(rank, world, *args)
    if rank == 0:
        queue.put(result)
    dist.barrier()
    dist.destroy_process_group()


def run_ranks(world: int, fn, *args):
    """Runs ``fn(rank, world, *args)`` on ``world`` spawned gloo ranks; returns rank 0's result."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.start_processes(_entry, args=(world, port, fn, args, queue), nprocs=world, start_method="spawn")
    return queue.get()
