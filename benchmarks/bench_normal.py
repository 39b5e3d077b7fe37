"""Normal-mode dispatch/combine time and bandwidth per payload format, with a raw all_to_all baseline.

    python -m benchmarks.bench_normal [--ranks 4] [--tokens 4096] [--hidden 7168] [--num-topk 8]
                                      [--num-experts 256] [--formats bf16 fp8 int8] [--json out.json]

Bytes follow DESIGN §7 (DeepEP's convention for normal mode): one row per (token, destination rank), the
local rank included, with the real bytes of a row: BF16 2·H; FP8 H + 4·H/128 scales; INT8 wire H + 4;
combine 2·H. Times are µs per call (median, p10/p90 over iterations; each sample is the max over ranks).
The ``all_to_all`` baseline is one ``torch.distributed.all_to_all_single`` of exactly those rows, with the
counts known in advance: plain torch.distributed moving the same data, without layout, handshake,
packing or expert-id rewriting.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from benchmarks._harness import (COMM_COLUMNS, ROW_BYTES, base_parser, comm_row, print_table, progress, run_ranks,
                                 write_json)


def _bench(rank: int, world: int, args) -> list[dict]:
    from deep_ep_ops import Buffer, quant

    group = dist.group.WORLD
    buf = Buffer(group, timeout_s=600)
    g = torch.Generator().manual_seed(rank)
    x = (torch.randn(args.tokens, args.hidden, generator=g) * 0.1).bfloat16()
    idx = torch.rand(args.tokens, args.num_experts, generator=g).topk(args.num_topk, dim=1).indices
    w = torch.rand(args.tokens, args.num_topk, generator=g)
    per_rank, _, per_expert, in_rank, _ = buf.get_dispatch_layout(idx, args.num_experts)
    layout = dict(num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert)
    rows_sent = torch.tensor([int(per_rank.sum())], dtype=torch.int64)
    dist.all_reduce(rows_sent, op=dist.ReduceOp.MAX, group=group)
    rows = []
    for i, fmt in enumerate(args.formats, 1):
        if rank == 0:
            progress(i, len(args.formats), fmt)
        payload = quant.per_block_fp8(x.float()) if fmt == "fp8" else x
        mode = "int8" if fmt == "int8" else None

        def dispatch():
            return buf.dispatch(payload, topk_idx=idx, topk_weights=w, quant_mode=mode, **layout)

        recv_x, _, recv_w, _, handle, _ = dispatch()
        y = recv_x if fmt == "bf16" else torch.zeros(handle[3].shape[0], args.hidden, dtype=torch.bfloat16)
        row = comm_row(dispatch, lambda: buf.combine(y, handle, recv_w), per_rank.long(), ROW_BYTES[fmt](args.hidden),
                       args.hidden, int(rows_sent), args.iters, args.warmup, group)
        rows.append({"format": fmt, **row, "dispatch_MB": int(rows_sent) * ROW_BYTES[fmt](args.hidden) / 1e6})
    buf.destroy()
    return rows


def main(argv=None) -> None:
    p = base_parser(__doc__.splitlines()[0])
    p.set_defaults(iters=10, warmup=2)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=7168)
    p.add_argument("--num-topk", type=int, default=8)
    p.add_argument("--num-experts", type=int, default=256)
    p.add_argument("--formats", nargs="+", default=["bf16", "fp8", "int8"], choices=sorted(ROW_BYTES))
    args = p.parse_args(argv)
    rows = run_ranks(args.ranks, _bench, args)
    print_table(
        f"normal mode, {args.ranks} gloo ranks, {args.tokens} tokens/rank, hidden {args.hidden}, top-{args.num_topk} of "
        f"{args.num_experts} experts; µs (median, p10-p90, max over ranks); GB/s = rows per (token, rank) x row bytes",
        [("format", "fmt", "s"), *COMM_COLUMNS, ("dispatch_MB", "MB/rank", ".1f")], rows)
    write_json(args.json, {"benchmark": "normal", "config": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
