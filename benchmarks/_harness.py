"""Shared benchmark plumbing: timing statistics, spawned gloo ranks, baselines, progress, tables, ``--json``
and ``--plot``.

Times are per call in microseconds: median and p10/p90 over iterations, each the max over ranks (the
slowest rank bounds a collective step). Ranks synchronize with a barrier before every timed call so that
launch skew does not count. Every figure comes with two baselines measured in the same run for the same
bytes (DESIGN §7): one plain ``torch.distributed.all_to_all_single`` with its buffers allocated once, and
a pre-faulted ``memcpy`` (``dst.copy_(src)`` between reused buffers, every rank at once): the physical
ceiling of moving those bytes on this machine.
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
    p.add_argument("--ranks", type=int, default=2, help="gloo ranks to spawn (default 2)")
    p.add_argument("--iters", type=int, default=20, help="timed iterations per config (default 20)")
    p.add_argument("--warmup", type=int, default=3, help="untimed iterations first (default 3)")
    p.add_argument("--transport", nargs="+", default=["shm", "all_to_all"],
                   help="transports to compare (default: shm all_to_all)")
    p.add_argument("--json", metavar="PATH", help="also write the rows as JSON to PATH")
    p.add_argument("--plot", metavar="PATH", help="also draw a PNG to PATH (needs the [plot] extra: matplotlib)")
    return p


def time_calls(fn: Callable[[], object], iters: int, warmup: int, group=None,
               since_last_arrival: bool = False) -> list[float]:
    """Per-call seconds of ``fn``, each the max over the group's ranks, after a barrier.

    With ``since_last_arrival``, a sample runs from the moment the last rank left the barrier to the moment the
    last rank finished, which takes the ranks' skew leaving the barrier out of it. That compares clock readings
    across ranks: ``time.perf_counter`` reads ``CLOCK_MONOTONIC``, which the processes of one host share (the
    benchmarks run their ranks on one host).
    """
    for _ in range(warmup):
        fn()
    starts, ends = [], []
    for _ in range(iters):
        if group is not None:
            dist.barrier(group)
        starts.append(time.perf_counter())
        fn()
        ends.append(time.perf_counter())
    t = torch.tensor([[e - s for s, e in zip(starts, ends)], starts, ends], dtype=torch.float64)
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return (t[2] - t[1] if since_last_arrival else t[0]).tolist()


def summary_us(samples: list[float]) -> dict[str, float]:
    """Median and p10/p90 in microseconds."""
    q = statistics.quantiles(samples, n=10, method="inclusive") if len(samples) > 1 else samples * 9
    return {"median_us": statistics.median(samples) * 1e6, "p10_us": q[0] * 1e6, "p90_us": q[-1] * 1e6}


#: Wire bytes of one row per format (DESIGN §7): BF16 2·H; FP8 H + 4·H/128 scales; INT8 H + 4.
ROW_BYTES = {"bf16": lambda h: 2 * h, "fp8": lambda h: h + 4 * (h // 128), "int8": lambda h: h + 4}


def raw_all_to_all(send_counts: torch.Tensor, row_bytes: int, group) -> Callable[[], object]:
    """The baseline: one plain ``all_to_all_single`` of ``send_counts`` rows per destination (counts exchanged
    up front, buffers allocated and touched once)."""
    recv_counts = torch.empty_like(send_counts)
    dist.all_to_all_single(recv_counts, send_counts, group=group)
    send = torch.ones(int(send_counts.sum()), row_bytes, dtype=torch.uint8)
    recv = torch.ones(int(recv_counts.sum()), row_bytes, dtype=torch.uint8)
    s, r = send_counts.tolist(), recv_counts.tolist()
    return lambda: dist.all_to_all_single(recv, send, r, s, group=group)


def memcpy(nbytes: int) -> Callable[[], object]:
    """The physical ceiling: a copy of ``nbytes`` between two pre-faulted, reused buffers."""
    src, dst = torch.ones(max(nbytes, 1), dtype=torch.uint8), torch.zeros(max(nbytes, 1), dtype=torch.uint8)
    return lambda: dst.copy_(src)


def timed(fn: Callable[[], object], args, group, since_last_arrival: bool = False) -> dict[str, float]:
    return summary_us(time_calls(fn, args.iters, args.warmup, group, since_last_arrival))


def gbps(nbytes: float, us: float) -> float:
    return nbytes / us / 1e3


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


def plot(path: str | None, title: str, x_key: str, x_label: str, y_label: str, series: dict[str, list[tuple]]) -> None:
    """A PNG with one line per series (``name → [(x, y), …]``); needs matplotlib (``pip install .[plot]``)."""
    if not path:
        return
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"\n--plot needs matplotlib (pip install -e '.[plot]'); {path} not written", file=sys.stderr)
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, points in series.items():
        xs, ys = zip(*sorted(points)) if points else ((), ())
        ax.plot(xs, ys, marker="o", linestyle="--" if name.startswith("baseline") else "-", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel(x_label)
    ax.set_ylabel(y_label)
    ax.set_title(title, fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
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
