"""Steady memory: resident memory (RSS) of every rank over many dispatch/combine and low-latency steps.

    python -m benchmarks.bench_memory [--ranks 2] [--iters 10000] [--transport shm all_to_all]
                                      [--tokens 64] [--hidden 512] [--num-experts 32] [--num-topk 4]
                                      [--ll-formats bf16 fp8 int8] [--warmup 1000] [--samples 20]
                                      [--modes normal low_latency] [--diagnose] [--tracemalloc]
                                      [--json out.json]

Per transport, one ``Buffer`` (``low_latency_mode=True``) runs two phases on every rank:

* ``normal``: ``--iters`` steps of ``get_dispatch_layout`` → ``dispatch`` (bf16, top-k weights) →
  ``combine`` (with the received weights), a new routing and new tokens each step from a seeded generator;
* ``low_latency``: ``--iters`` steps of ``low_latency_dispatch(return_recv_hook=True)`` → ``hook()`` →
  expert outputs (the dequantized rows) → ``low_latency_combine(return_recv_hook=True)`` → ``hook()``;
  the wire format cycles through ``--ll-formats`` step by step.

Each phase starts with ``--warmup`` untimed steps (default 1000), then samples every ``iters // samples``
steps on every rank: ``VmRSS`` (and its anonymous, file and shared-memory parts) from
``/proc/self/status``, open file descriptors (``/proc/self/fd``), the number of live Python objects
tracked by the garbage collector, and the ``/dev/shm`` entries named ``deepep-*`` (all of them, and those
created by this run's ranks: the host's ``/dev/shm`` is shared with other jobs). A progress line per sample
goes to stderr. RSS is also sampled before the warm-up, to show what the warm-up absorbed.

Three measurement artifacts shaped these defaults and the verdict (measured at 2 ranks, 10,000 steps):

* Warm-up. With a new routing each step, received-row counts vary, so the output pools (power-of-two
  size classes, ``deep_ep_ops/_outputs.py`` and the shm output blocks) and the allocator's high-water mark
  keep filling for the first ~500-1000 steps (+4-5 MB in normal mode), then stay exactly flat. A 100-step
  warm-up (``--warmup 100``) leaves that one-time fill inside the measured window.
* Sampling phase. RSS at a given moment depends on the wire format of the step just run (transient and
  pooled buffers differ in size: up to ~12 MB between bf16 and fp8/int8 steps at these sizes). The
  low-latency phase therefore samples every ``k * len(--ll-formats)`` steps, always after the same format,
  and runs ``samples * k >= iters`` steps (10,020 for 10,000 with three formats).
* Allocator trims. glibc returns the top of its heap to the OS once more than its trim threshold is free
  there (2x the dynamic mmap threshold: ~8 MB once 4 MB transients were freed), so a single sample can
  sit ~8 MB below the steady level and the next one back at it (seen in the low-latency phases; it
  vanishes with ``MALLOC_MMAP_THRESHOLD_=4000000000 MALLOC_TRIM_THRESHOLD_=4000000000``). Such a dip at
  the first sample makes ``end - start`` look like growth although the level never rose.

Verdict (per rank and phase): **flat** when both

* ``peak`` = (highest sample of the last quarter) - (highest sample of the first quarter, which includes
  the sample right after warm-up), and
* ``trend`` = least-squares slope of RSS over all samples x steps (the growth a straight line fits)

are below ``2 MB + 1 % of start``, else **GROWS**. High-water marks are immune to trim dips, and a leak
raises them; the trend catches a steady leak without resting on any single sample. 2 MB absorbs
allocator noise (a size class more or less in the output pools, arena growth); 1 % scales that with the
process (torch alone is ~300 MB resident). A leak of 1 KB per step gives >= 6 MB between the windows
and 10 MB of trend over 10,000 steps, and fails. The raw ``growth = end - start`` (start = the first
sample after warm-up, end = the last sample) and growth per 1000 steps are printed too.

``--diagnose`` also counts gc-tracked objects by type at start and end of each phase and prints the types
whose count grew (rank 0); ``--tracemalloc`` traces Python allocations during the sampled steps and
prints the top source lines by growth (slow: use fewer ``--iters``).
"""

from __future__ import annotations

import collections
import functools
import gc
import os
import sys
import time

import torch
import torch.distributed as dist

from benchmarks._harness import base_parser, print_table, progress, run_ranks, write_json

FORMAT_KWARGS = {"bf16": dict(use_fp8=False), "fp8": dict(use_fp8=True), "int8": dict(use_fp8=False, quant_mode="int8")}
#: Flat when end - start < FLAT_ABS_MB + FLAT_REL * start (see the module docstring).
FLAT_ABS_MB, FLAT_REL = 2.0, 0.01
SHM_DIR, SHM_PREFIX = "/dev/shm", "deepep-"
STATUS_KEYS = ("VmRSS", "RssAnon", "RssFile", "RssShmem")


def _status_kb() -> dict[str, int]:
    """The RSS fields of ``/proc/self/status`` in kB."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in STATUS_KEYS:
                out[key] = int(value.split()[0])
    return out


def _shm_entries(pids: list[int]) -> tuple[int, int]:
    """``deepep-*`` entries under /dev/shm: all of them, and those whose creator is one of ``pids``."""
    try:
        names = [n for n in os.listdir(SHM_DIR) if n.startswith(SHM_PREFIX)]
    except OSError:
        return 0, 0
    mine = sum(1 for n in names if n[len(SHM_PREFIX):].split("-", 1)[0] in {str(p) for p in pids})
    return len(names), mine


def _sample(step: int, pids: list[int], group) -> list[dict]:
    """This step's measurements of every rank (a collective)."""
    st = _status_kb()
    shm_all, shm_mine = _shm_entries(pids)
    mine = torch.tensor([step, st.get("VmRSS", 0), st.get("RssAnon", 0), st.get("RssFile", 0),
                         st.get("RssShmem", 0), len(os.listdir("/proc/self/fd")), len(gc.get_objects()),
                         shm_all, shm_mine, int(time.time() * 1000)], dtype=torch.int64)
    every = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(every, mine, group=group)
    keys = ("step", "rss_kb", "anon_kb", "file_kb", "shmem_kb", "fds", "py_objects", "shm_all", "shm_mine", "t_ms")
    return [dict(zip(keys, t.tolist())) for t in every]


def _type_counts() -> collections.Counter:
    gc.collect()
    return collections.Counter(type(o).__qualname__ for o in gc.get_objects())


def _normal_step(buf, g, args, step: int) -> None:
    x = torch.randn(args.tokens, args.hidden, generator=g).bfloat16()
    weights, idx = torch.rand(args.tokens, args.num_experts, generator=g).topk(args.num_topk, dim=1)
    per_rank, _, per_expert, in_rank, _ = buf.get_dispatch_layout(idx, args.num_experts)
    recv_x, _, recv_w, _, handle, _ = buf.dispatch(x, topk_idx=idx, topk_weights=weights,
                                                   num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
                                                   num_tokens_per_expert=per_expert)
    buf.combine(recv_x, handle, topk_weights=recv_w)


def _low_latency_step(buf, g, args, step: int) -> None:
    from deep_ep_ops import quant

    fmt = args.ll_formats[step % len(args.ll_formats)]
    x = torch.randn(args.tokens, args.hidden, generator=g).bfloat16()
    idx = torch.rand(args.tokens, args.num_experts, generator=g).topk(args.num_topk, dim=1).indices
    weights = torch.rand(args.tokens, args.num_topk, generator=g)
    recv_x, _, handle, _, hook = buf.low_latency_dispatch(x, idx, args.tokens, args.num_experts,
                                                          return_recv_hook=True, **FORMAT_KWARGS[fmt])
    hook()
    if isinstance(recv_x, tuple):  # the experts' input: dequantized rows (padding rows are ignored by combine)
        data, scales = recv_x
        y = (quant.dequant_int8(data, scales) if data.dtype == torch.int8
             else quant.dequant_fp8(data, scales)).bfloat16()
    else:
        y = recv_x
    _, _, hook = buf.low_latency_combine(y, idx, weights, handle, return_recv_hook=True)
    hook()


def _bench(rank: int, world: int, args) -> dict:
    from deep_ep_ops import Buffer

    group = dist.group.WORLD
    pid = torch.tensor([os.getpid()], dtype=torch.int64)
    pids = [torch.empty_like(pid) for _ in range(world)]
    dist.all_gather(pids, pid, group=group)
    pids = [int(p) for p in pids]
    phases, notes = [], []
    if args.tracemalloc:
        import tracemalloc

        tracemalloc.start(8)
    for transport in args.transport:
        before = _sample(-1, pids, group)
        buf = Buffer(group, transport=transport, low_latency_mode=True, timeout_s=600,
                     num_rdma_bytes=Buffer.get_low_latency_rdma_size_hint(args.tokens, args.hidden, world,
                                                                          args.num_experts))
        for mode in args.modes:
            g = torch.Generator().manual_seed(args.seed + 1000 * rank)
            step_fn = functools.partial(_normal_step, buf, g, args) if mode == "normal" else \
                functools.partial(_low_latency_step, buf, g, args)
            # Sample after the same wire format every time (see the module docstring).
            cycle = 1 if mode == "normal" else len(args.ll_formats)
            every = -(-max(1, -(-args.iters // args.samples)) // cycle) * cycle
            iters = every * args.samples
            pre = _sample(-1, pids, group)
            for i in range(args.warmup):
                step_fn(i)
            dist.barrier(group)
            types0 = _type_counts() if args.diagnose else None
            snap0 = __import__("tracemalloc").take_snapshot() if args.tracemalloc else None
            samples = [_sample(0, pids, group)]
            t0 = time.perf_counter()
            for i in range(1, iters + 1):
                step_fn(args.warmup + i)
                if i % every == 0:
                    samples.append(_sample(i, pids, group))
                    if rank == 0:
                        rss = " ".join(f"{s['rss_kb'] / 1024:.1f}" for s in samples[-1])
                        progress(i, iters, f"{transport} {mode}: RSS MB per rank {rss}, "
                                 f"fds {samples[-1][0]['fds']}, {(time.perf_counter() - t0) / i * 1e3:.2f} ms/step")
            seconds = time.perf_counter() - t0
            phase = {"transport": transport, "mode": mode, "iters": iters, "every": every, "seconds": seconds,
                     "before_warmup": pre, "samples": samples}
            if args.diagnose:
                types1 = _type_counts()
                grown = (types1 - types0).most_common(15)
                phase["types_grown"] = grown
                if rank == 0 and grown:
                    notes.append(f"{transport} {mode}: gc-tracked types that grew (rank 0): {grown}")
            if args.tracemalloc:
                import tracemalloc

                stats = tracemalloc.take_snapshot().compare_to(snap0, "lineno")[:10]
                phase["tracemalloc_top"] = [str(s) for s in stats]
                if rank == 0:
                    notes.append(f"{transport} {mode}: tracemalloc top growth (rank 0):\n    " +
                                 "\n    ".join(str(s) for s in stats))
            phases.append(phase)
        buf.destroy()
        buf = step_fn = None
        gc.collect()
        after = _sample(-1, pids, group)
        notes.append(f"{transport}: before the Buffer fds {[s['fds'] for s in before]}, own /dev/shm entries "
                     f"{before[0]['shm_mine']}; after destroy() fds {[s['fds'] for s in after]}, own /dev/shm "
                     f"entries {after[0]['shm_mine']} (all deepep-* on the host: {after[0]['shm_all']})")
    return {"phases": phases, "notes": notes, "pids": pids}


def _slope_mb_per_k(samples: list[dict], rank: int) -> float:
    """Least-squares slope of RSS (MB) against steps, per 1000 steps."""
    xs = [s[rank]["step"] for s in samples]
    ys = [s[rank]["rss_kb"] / 1024 for s in samples]
    n, mx, my = len(xs), sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((x - mx) ** 2 for x in xs)
    return 0.0 if n < 2 or var == 0 else sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var * 1000


def summarize(result: dict, world: int) -> tuple[list[dict], list[dict]]:
    """Summary rows (one per transport, mode and rank) and RSS-curve rows."""
    rows, curves = [], []
    for phase in result["phases"]:
        samples = phase["samples"]
        for r in range(world):
            first, last = samples[0][r], samples[-1][r]
            start, end = first["rss_kb"] / 1024, last["rss_kb"] / 1024
            growth = end - start
            limit = FLAT_ABS_MB + FLAT_REL * start
            quarter = max(1, len(samples) // 4)
            peak = (max(s[r]["rss_kb"] for s in samples[-quarter:]) - max(s[r]["rss_kb"] for s in samples[:quarter])) / 1024
            rows.append({
                "transport": phase["transport"], "mode": phase["mode"], "rank": r, "steps": phase["iters"],
                "pre_MB": phase["before_warmup"][r]["rss_kb"] / 1024, "start_MB": start, "end_MB": end, "min_MB": min(s[r]["rss_kb"] for s in samples) / 1024,
                "max_MB": max(s[r]["rss_kb"] for s in samples) / 1024, "growth_MB": growth, "peak_growth_MB": peak,
                "growth_per_k_MB": growth / max(phase["iters"], 1) * 1000, "slope_per_k_MB": _slope_mb_per_k(samples, r),
                "anon_growth_MB": (last["anon_kb"] - first["anon_kb"]) / 1024,
                "shmem_growth_MB": (last["shmem_kb"] - first["shmem_kb"]) / 1024,
                "trend_MB": _slope_mb_per_k(samples, r) * phase["iters"] / 1000,
                "limit_MB": limit, "verdict": "flat" if max(peak, _slope_mb_per_k(samples, r) * phase["iters"] / 1000)
                < limit else "GROWS",
                "fds_start": first["fds"], "fds_end": last["fds"],
                "shm_start": first["shm_mine"], "shm_end": last["shm_mine"],
                "shm_all_start": first["shm_all"], "shm_all_end": last["shm_all"],
                "objs_start": first["py_objects"], "objs_end": last["py_objects"],
                "ms_per_step": phase["seconds"] / max(phase["iters"], 1) * 1e3,
            })
            curve = {"transport": phase["transport"], "mode": phase["mode"], "rank": r, "every": phase["every"]}
            curve.update({f"s{i}": s[r]["rss_kb"] / 1024 for i, s in enumerate(samples)})
            curves.append(curve)
    return rows, curves


def main(argv=None) -> None:
    p = base_parser(__doc__.splitlines()[0])
    p.set_defaults(iters=10000, warmup=1000)
    p.add_argument("--samples", type=int, default=20, help="samples per phase after the start (default 20)")
    p.add_argument("--tokens", type=int, default=64, help="tokens per rank and step (also low-latency M)")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--num-experts", type=int, default=32)
    p.add_argument("--num-topk", type=int, default=4)
    p.add_argument("--ll-formats", nargs="+", default=["bf16", "fp8", "int8"], choices=sorted(FORMAT_KWARGS),
                   help="low-latency wire formats, cycled step by step (default: bf16 fp8 int8)")
    p.add_argument("--modes", nargs="+", default=["normal", "low_latency"], choices=["normal", "low_latency"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--diagnose", action="store_true", help="count gc-tracked objects by type at start and end")
    p.add_argument("--tracemalloc", action="store_true", help="trace Python allocations (slow)")
    args = p.parse_args(argv)
    if args.plot:
        print("--plot is not supported by this benchmark; ignored", file=sys.stderr)
    result = run_ranks(args.ranks, _bench, args)
    rows, curves = summarize(result, args.ranks)
    title = (f"steady memory, {args.ranks} ranks, >= {args.iters} steps per phase after {args.warmup} warm-up steps; "
             f"{args.tokens} tokens, hidden {args.hidden}, top-{args.num_topk} of {args.num_experts}, normal bf16, "
             f"low-latency {'/'.join(args.ll_formats)} with recv hooks; RSS in MB (VmRSS); "
             f"flat: peak and trend < limit = {FLAT_ABS_MB:g} MB + {FLAT_REL:.0%} of start")
    print_table(title, [("transport", "transport", "s"), ("mode", "mode", "s"), ("rank", "rank", "d"),
                        ("steps", "steps", "d"), ("pre_MB", "pre-warm", ".1f"), ("start_MB", "start", ".1f"), ("end_MB", "end", ".1f"), ("min_MB", "min", ".1f"),
                        ("max_MB", "max", ".1f"), ("growth_MB", "growth", "+.2f"), ("peak_growth_MB", "peak", "+.2f"),
                        ("growth_per_k_MB", "growth/1k", "+.3f"), ("slope_per_k_MB", "slope/1k", "+.3f"),
                        ("trend_MB", "trend", "+.2f"), ("limit_MB", "limit", ".2f"),
                        ("anon_growth_MB", "anon", "+.2f"), ("shmem_growth_MB", "shmem", "+.2f"),
                        ("verdict", "verdict", "s"), ("fds_start", "fds start", "d"), ("fds_end", "fds end", "d"),
                        ("shm_start", "shm start", "d"), ("shm_end", "shm end", "d"),
                        ("objs_start", "py objs start", "d"), ("objs_end", "py objs end", "d"),
                        ("ms_per_step", "ms/step", ".2f")], rows)
    points = [k for k in curves[0] if k.startswith("s")]
    print_table("RSS curve (MB) at sample i, taken after step i * every", [
        ("transport", "transport", "s"), ("mode", "mode", "s"), ("rank", "rank", "d"), ("every", "every", "d")]
        + [(k, k[1:], ".1f") for k in points], curves)
    print("\ngrowth = end - start (raw endpoints); peak = high-water of the last quarter of samples - high-water of the "
          "first quarter; trend = least-squares slope x steps; 'anon'/'shmem': end - start of RssAnon/RssShmem; "
          "'shm start/end': this run's /dev/shm/deepep-* entries; 'pre-warm': RSS before the warm-up steps.")
    for note in result["notes"]:
        print(note)
    verdicts = {r["verdict"] for r in rows}
    print(f"\noverall: {'flat' if verdicts == {'flat'} else 'GROWS'}")
    write_json(args.json, {"benchmark": "memory", "config": vars(args), "rows": rows, "curves": curves,
                           "phases": result["phases"], "notes": result["notes"], "pids": result["pids"]})


if __name__ == "__main__":
    main()
