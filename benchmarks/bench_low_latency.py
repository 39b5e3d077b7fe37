"""Low-latency dispatch/combine latency per transport and wire format, beside the same run's baselines.

    python -m benchmarks.bench_low_latency [--ranks 2] [--max-tokens 128] [--tokens 1 8 32 128]
                                           [--formats bf16 fp8 int8] [--hidden 7168] [--num-topk 8]
                                           [--num-experts 256] [--transport shm all_to_all] [--json out.json]
                                           [--plot out.png]

Decode batches vary, so ``num_max_dispatch_tokens_per_rank`` (M) stays at the largest batch and each row
sends fewer tokens: the cost of a step should follow the tokens actually sent, not M. Per config: µs per
call (median, p10/p90 over iterations; each sample is the max over ranks) of dispatch, combine and both.
Bytes follow DESIGN §7: one row per (token, selected expert), the local rank included, with the wire
bytes of a row (BF16 2·H; FP8 H + 4·H/128; INT8 H + 4; combine 2·H). Baselines for exactly those rows:
``a2a`` is a plain ``all_to_all_single`` there (dispatch rows) and back (combine rows), counts known in
advance and buffers allocated once; ``memcpy`` copies the same bytes between pre-faulted buffers.
``x a2a`` = baseline µs / (dispatch + combine) µs. Each sample starts after a barrier, so it includes the ranks'
skew and a core's wake-up; ``in a row`` times 16 steps back to back instead (a decode step runs layer after
layer), for the op and the baseline alike; ``all arrived`` times the same after-a-barrier step from the moment
the last rank left the barrier (ranks of one host share ``CLOCK_MONOTONIC``), without the ranks' skew.
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist

from benchmarks._harness import (ROW_BYTES, base_parser, memcpy, plot, print_table, progress, raw_all_to_all,
                                 run_ranks, timed, write_json)

FORMAT_KWARGS = {"bf16": dict(use_fp8=False), "fp8": dict(use_fp8=True), "int8": dict(use_fp8=False, quant_mode="int8")}


def _bench(rank: int, world: int, args) -> list[dict]:
    from deep_ep_ops import Buffer

    group = dist.group.WORLD
    m = args.max_tokens
    configs = [(n, f) for n in args.tokens for f in args.formats]
    rows = []
    for i, (n, fmt) in enumerate(configs, 1):
        g = torch.Generator().manual_seed(1000 * n + rank)
        x = (torch.randn(n, args.hidden, generator=g) * 0.1).bfloat16()
        idx = torch.rand(n, args.num_experts, generator=g).topk(args.num_topk, dim=1).indices
        w = torch.rand(n, args.num_topk, generator=g)
        kw = FORMAT_KWARGS[fmt]
        local = args.num_experts // world
        per_dest = torch.zeros(world, dtype=torch.int64).index_add_(
            0, idx.flatten() // local, torch.ones(idx.numel(), dtype=torch.int64))
        selections = torch.tensor([idx.numel()], dtype=torch.int64)
        dist.all_reduce(selections, op=dist.ReduceOp.MAX, group=group)
        row_bytes = ROW_BYTES[fmt](args.hidden)
        row = {"tokens": n, "M": m, "format": fmt}
        for transport in args.transport:
            if rank == 0:
                progress(i, len(configs), f"{n} tokens, {fmt}, {transport}")
            buf = Buffer(group, transport=transport, low_latency_mode=True, timeout_s=600,
                         num_rdma_bytes=Buffer.get_low_latency_rdma_size_hint(m, args.hidden, world, args.num_experts))
            _, _, handle, _, _ = buf.low_latency_dispatch(x, idx, m, args.num_experts, **kw)
            y = torch.zeros(handle[0].shape + (args.hidden,), dtype=torch.bfloat16)
            t_d = timed(lambda: buf.low_latency_dispatch(x, idx, m, args.num_experts, **kw), args, group)
            t_c = timed(lambda: buf.low_latency_combine(y, idx, w, handle), args, group)
            def both():
                return buf.low_latency_combine(y, idx, w, buf.low_latency_dispatch(x, idx, m, args.num_experts,
                                                                                  **kw)[2])

            t_both = timed(both, args, group)
            arrived = timed(both, args, group, since_last_arrival=True)["median_us"]
            in_a_row = _in_a_row(both, args, group)
            buf.destroy()
            row.update({f"{transport}_dispatch_us": t_d["median_us"], f"{transport}_combine_us": t_c["median_us"],
                        f"{transport}_us": t_both["median_us"], f"{transport}_p10_us": t_both["p10_us"],
                        f"{transport}_p90_us": t_both["p90_us"], f"{transport}_row_us": in_a_row,
                        f"{transport}_arrived_us": arrived})
        there, back = raw_all_to_all(per_dest, row_bytes, group), raw_all_to_all(per_dest, 2 * args.hidden, group)
        a2a = timed(lambda: (there(), back()), args, group)["median_us"]
        row["a2a_row_us"] = _in_a_row(lambda: (there(), back()), args, group)
        row["a2a_arrived_us"] = timed(lambda: (there(), back()), args, group, since_last_arrival=True)["median_us"]
        nbytes = int(per_dest.sum()) * (row_bytes + 2 * args.hidden)
        row.update({"a2a_us": a2a, "memcpy_us": timed(memcpy(nbytes), args, group)["median_us"],
                    "logical_MB": int(selections) * (row_bytes + 2 * args.hidden) / 1e6})
        for transport in args.transport:
            row[f"{transport}_x_a2a"] = a2a / row[f"{transport}_us"]
            row[f"{transport}_row_x_a2a"] = row["a2a_row_us"] / row[f"{transport}_row_us"]
            row[f"{transport}_arrived_x_a2a"] = row["a2a_arrived_us"] / row[f"{transport}_arrived_us"]
        rows.append(row)
    return rows


def _in_a_row(step, args, group, steps: int = 16) -> float:
    """µs per step of ``steps`` steps back to back (a decode step runs layer after layer, no barrier between
    them): median over ``--iters`` rounds, each the max over ranks."""
    rounds = max(3, args.iters // steps)
    return timed(lambda: [step() for _ in range(steps)], argparse.Namespace(iters=rounds, warmup=1), group)[
        "median_us"] / steps


def main(argv=None) -> None:
    p = base_parser(__doc__.splitlines()[0])
    p.set_defaults(iters=20, warmup=3)
    p.add_argument("--max-tokens", type=int, default=128, help="num_max_dispatch_tokens_per_rank (default 128)")
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 32, 128])
    p.add_argument("--formats", nargs="+", default=["bf16", "fp8", "int8"], choices=sorted(ROW_BYTES))
    p.add_argument("--hidden", type=int, default=7168)
    p.add_argument("--num-topk", type=int, default=8)
    p.add_argument("--num-experts", type=int, default=256)
    args = p.parse_args(argv)
    rows = run_ranks(args.ranks, _bench, args)
    columns = [("tokens", "tokens", "d"), ("M", "M", "d"), ("format", "fmt", "s")]
    for t in args.transport:
        columns += [(f"{t}_dispatch_us", f"{t} dispatch µs", ".0f"), (f"{t}_combine_us", "combine µs", ".0f"),
                    (f"{t}_us", "both µs", ".0f"), (f"{t}_p10_us", "p10", ".0f"), (f"{t}_p90_us", "p90", ".0f"),
                    (f"{t}_x_a2a", "x a2a", ".2f"), (f"{t}_row_us", "in a row µs", ".0f"),
                    (f"{t}_row_x_a2a", "x a2a", ".2f"), (f"{t}_arrived_us", "all arrived µs", ".0f"),
                    (f"{t}_arrived_x_a2a", "x a2a", ".2f")]
    columns += [("a2a_us", "a2a there+back µs", ".0f"), ("a2a_row_us", "in a row µs", ".0f"),
                ("a2a_arrived_us", "all arrived µs", ".0f"),
                ("memcpy_us", "memcpy µs", ".0f"),
                ("logical_MB", "logical MB", ".2f")]
    title = (f"low-latency, {args.ranks} ranks, M {args.max_tokens}, hidden {args.hidden}, top-{args.num_topk} of "
             f"{args.num_experts} experts; dispatch + combine µs (median, p10-p90, max over ranks)")
    print_table(title, columns, rows)
    series: dict[str, list] = {}
    for r in rows:
        if r["format"] == args.formats[0]:
            for t in args.transport:
                series.setdefault(f"{t} dispatch+combine", []).append((r["tokens"], r[f"{t}_us"]))
            series.setdefault("baseline a2a there+back", []).append((r["tokens"], r["a2a_us"]))
            series.setdefault("baseline memcpy", []).append((r["tokens"], r["memcpy_us"]))
    plot(args.plot, title + f" ({args.formats[0]})", "tokens", "tokens sent per rank", "µs", series)
    write_json(args.json, {"benchmark": "low_latency", "config": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
