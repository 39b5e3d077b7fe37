"""Low-latency dispatch/combine latency per wire format, with a raw all_to_all baseline in the same run.

    python -m benchmarks.bench_low_latency [--ranks 4] [--tokens 1 4 16 32 64 128] [--formats bf16 fp8 int8]
                                           [--hidden 7168] [--num-topk 8] [--num-experts 256] [--json out.json]

Per config: time per call in µs (median, p10/p90 over iterations; each sample is the max over ranks),
and bandwidth. Bytes follow DESIGN §7: one row per (token, selected expert), the local rank included, with
the real wire bytes of a row (BF16: 2·H; FP8: H + 4·H/128 scales; INT8: H + 4; combine: 2·H). The op
moves more than that, because its static exchange pads every (source, destination) chunk to
``M·min(K, L)`` rows so that shapes never depend on data. ``wire MB`` is what it actually sends per rank.
The ``all_to_all`` baseline is one ``torch.distributed.all_to_all_single`` of exactly the logical rows,
with counts known in advance (no handshake, packing or padding): the cost of moving the same data
with plain torch.distributed. ``num_max_dispatch_tokens_per_rank`` equals the token count.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from benchmarks._harness import (COMM_COLUMNS, ROW_BYTES, base_parser, comm_row, print_table, progress, run_ranks,
                                 write_json)

FORMAT_KWARGS = {"bf16": dict(use_fp8=False), "fp8": dict(use_fp8=True), "int8": dict(use_fp8=False, quant_mode="int8")}


def _bench(rank: int, world: int, args) -> list[dict]:
    from deep_ep_ops import Buffer
    from deep_ep_ops.layout import chunk_caps

    group = dist.group.WORLD
    buf = Buffer(group, low_latency_mode=True, timeout_s=600)
    configs = [(n, f) for n in args.tokens for f in args.formats]
    rows = []
    for i, (n, fmt) in enumerate(configs, 1):
        if rank == 0:
            progress(i, len(configs), f"{n} tokens, {fmt}")
        g = torch.Generator().manual_seed(1000 * n + rank)
        x = (torch.randn(n, args.hidden, generator=g) * 0.1).bfloat16()
        idx = torch.rand(n, args.num_experts, generator=g).topk(args.num_topk, dim=1).indices
        w = torch.rand(n, args.num_topk, generator=g)
        kw = FORMAT_KWARGS[fmt]
        recv_x, _, handle, _, _ = buf.low_latency_dispatch(x, idx, n, args.num_experts, **kw)
        y = torch.empty(handle[0].shape + (args.hidden,), dtype=torch.bfloat16)
        local = args.num_experts // world
        per_dest = torch.zeros(world, dtype=torch.int64).index_add_(
            0, idx.flatten() // local, torch.ones(idx.numel(), dtype=torch.int64))
        selections = torch.tensor([idx.numel()], dtype=torch.int64)
        dist.all_reduce(selections, op=dist.ReduceOp.MAX, group=group)
        row_bytes = ROW_BYTES[fmt](args.hidden)
        row = comm_row(lambda: buf.low_latency_dispatch(x, idx, n, args.num_experts, **kw),
                       lambda: buf.low_latency_combine(y, idx, w, handle), per_dest, row_bytes, args.hidden,
                       int(selections), args.iters, args.warmup, group)
        wire = sum(chunk_caps(world, n, args.num_topk, args.num_experts, 0))
        rows.append({"tokens": n, "format": fmt, **row, "logical_MB": int(selections) * row_bytes / 1e6,
                     "wire_MB": wire * (row_bytes + 8) / 1e6})
        del recv_x, y
    buf.destroy()
    return rows


def main(argv=None) -> None:
    p = base_parser(__doc__.splitlines()[0])
    p.set_defaults(iters=10, warmup=2)
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 4, 16, 32, 64, 128])
    p.add_argument("--formats", nargs="+", default=["bf16", "fp8", "int8"], choices=sorted(ROW_BYTES))
    p.add_argument("--hidden", type=int, default=7168)
    p.add_argument("--num-topk", type=int, default=8)
    p.add_argument("--num-experts", type=int, default=256)
    args = p.parse_args(argv)
    rows = run_ranks(args.ranks, _bench, args)
    print_table(
        f"low-latency, {args.ranks} gloo ranks, hidden {args.hidden}, top-{args.num_topk} of {args.num_experts} "
        f"experts, M = tokens; µs (median, p10-p90, max over ranks); GB/s = rows per (token, expert) x wire bytes",
        [("tokens", "tokens", "d"), ("format", "fmt", "s"), *COMM_COLUMNS, ("logical_MB", "logical MB", ".2f"),
         ("wire_MB", "wire MB", ".2f")], rows)
    write_json(args.json, {"benchmark": "low_latency", "config": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
