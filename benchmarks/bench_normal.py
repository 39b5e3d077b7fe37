"""Normal-mode dispatch/combine bandwidth per transport and payload format, beside the same run's baselines.

    python -m benchmarks.bench_normal [--ranks 2] [--tokens 4096] [--hidden 7168] [--num-topk 8]
                                      [--num-experts 256] [--formats bf16 fp8 int8] [--transport shm all_to_all]
                                      [--json out.json] [--plot out.png]

Bytes follow DESIGN §7 (DeepEP's convention for normal mode): one row per (token, destination rank), the
local rank included, with the real bytes of a row: BF16 2·H; FP8 H + 4·H/128 scales; INT8 wire H + 4;
combine 2·H. Times are µs per call (median, p10/p90 over iterations; each sample is the max over ranks).
Baselines, for exactly those rows and bytes: ``a2a`` is one plain ``torch.distributed.all_to_all_single``
with counts known in advance and buffers allocated once; ``memcpy`` is a copy of the same bytes between
pre-faulted buffers, on every rank at once. ``x a2a`` and ``% memcpy`` compare the op's GB/s with them.
Defaults: DeepEP's test configuration (4096 tokens, H 7168, top-8 of 256), default allocator, no tuning.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from benchmarks._harness import (ROW_BYTES, base_parser, gbps, memcpy, plot, print_table, progress, raw_all_to_all,
                                 run_ranks, timed, write_json)


def _inputs(args, tokens: int, rank: int):
    g = torch.Generator().manual_seed(rank)
    x = (torch.randn(tokens, args.hidden, generator=g) * 0.1).bfloat16()
    idx = torch.rand(tokens, args.num_experts, generator=g).topk(args.num_topk, dim=1).indices
    return x, idx, torch.rand(tokens, args.num_topk, generator=g)


def _bench(rank: int, world: int, args) -> list[dict]:
    from deep_ep_ops import Buffer, quant

    group = dist.group.WORLD
    configs = [(n, fmt) for n in args.tokens for fmt in args.formats]
    rows = []
    for i, (tokens, fmt) in enumerate(configs, 1):
        x, idx, w = _inputs(args, tokens, rank)
        payload = quant.per_block_fp8(x.float()) if fmt == "fp8" else x
        mode = "int8" if fmt == "int8" else None
        row_bytes = ROW_BYTES[fmt](args.hidden)
        for transport in args.transport:
            if rank == 0:
                progress(i, len(configs), f"{tokens} tokens, {fmt}, {transport}")
            buf = Buffer(group, transport=transport, timeout_s=600)
            per_rank, _, per_expert, in_rank, _ = buf.get_dispatch_layout(idx, args.num_experts)
            layout = dict(num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert)

            def dispatch():
                return buf.dispatch(payload, topk_idx=idx, topk_weights=w, quant_mode=mode, **layout)

            recv_x, _, recv_w, _, handle, _ = dispatch()
            y = recv_x if fmt == "bf16" else torch.zeros(handle[3].shape[0], args.hidden, dtype=torch.bfloat16)
            t_dispatch = timed(dispatch, args, group)
            t_combine = timed(lambda: buf.combine(y, handle, recv_w), args, group)
            buf.destroy()
            sent = torch.tensor([int(per_rank.sum())], dtype=torch.int64)
            dist.all_reduce(sent, op=dist.ReduceOp.MAX, group=group)
            moved = int(sent)
            row = {"tokens": tokens, "transport": transport, "format": fmt, "MB_per_rank": moved * row_bytes / 1e6}
            for name, t, nbytes in (("dispatch", t_dispatch, row_bytes), ("combine", t_combine, 2 * args.hidden)):
                a2a = timed(raw_all_to_all(per_rank.long(), nbytes, group), args, group)["median_us"]
                copy = timed(memcpy(int(per_rank.sum()) * nbytes), args, group)["median_us"]
                op_gbps = gbps(moved * nbytes, t["median_us"])
                row.update({f"{name}_us": t["median_us"], f"{name}_p10_us": t["p10_us"], f"{name}_p90_us": t["p90_us"],
                            f"{name}_GBps": op_gbps, f"{name}_a2a_GBps": gbps(moved * nbytes, a2a),
                            f"{name}_memcpy_GBps": gbps(moved * nbytes, copy),
                            f"{name}_x_a2a": op_gbps / gbps(moved * nbytes, a2a),
                            f"{name}_pct_memcpy": 100 * op_gbps / gbps(moved * nbytes, copy)})
            rows.append(row)
    return rows


COLUMNS = [("tokens", "tokens", "d"), ("transport", "transport", "s"), ("format", "fmt", "s")] + [
    c for name in ("dispatch", "combine") for c in (
        (f"{name}_us", f"{name} µs", ".0f"), (f"{name}_p10_us", "p10", ".0f"), (f"{name}_p90_us", "p90", ".0f"),
        (f"{name}_GBps", "GB/s", ".2f"), (f"{name}_a2a_GBps", "a2a GB/s", ".2f"),
        (f"{name}_memcpy_GBps", "memcpy GB/s", ".2f"), (f"{name}_x_a2a", "x a2a", ".2f"),
        (f"{name}_pct_memcpy", "% memcpy", ".0f"))] + [("MB_per_rank", "MB/rank", ".1f")]


def main(argv=None) -> None:
    p = base_parser(__doc__.splitlines()[0])
    p.set_defaults(iters=10, warmup=2)
    p.add_argument("--tokens", type=int, nargs="+", default=[4096])
    p.add_argument("--hidden", type=int, default=7168)
    p.add_argument("--num-topk", type=int, default=8)
    p.add_argument("--num-experts", type=int, default=256)
    p.add_argument("--formats", nargs="+", default=["bf16", "fp8", "int8"], choices=sorted(ROW_BYTES))
    args = p.parse_args(argv)
    rows = run_ranks(args.ranks, _bench, args)
    title = (f"normal mode, {args.ranks} ranks, hidden {args.hidden}, top-{args.num_topk} of {args.num_experts} "
             f"experts; µs (median, p10-p90, max over ranks); GB/s = rows per (token, rank) x row bytes")
    print_table(title, COLUMNS, rows)
    series: dict[str, list] = {}
    for r in rows:
        if r["format"] == args.formats[0]:
            for name in ("dispatch", "combine"):
                series.setdefault(f"{r['transport']} {name}", []).append((r["tokens"], r[f"{name}_GBps"]))
                if r["transport"] == args.transport[0]:
                    series.setdefault(f"baseline a2a {name}", []).append((r["tokens"], r[f"{name}_a2a_GBps"]))
                    series.setdefault(f"baseline memcpy {name}", []).append((r["tokens"], r[f"{name}_memcpy_GBps"]))
    plot(args.plot, title + f" ({args.formats[0]})", "tokens", "tokens per rank", "GB/s", series)
    write_json(args.json, {"benchmark": "normal", "config": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
