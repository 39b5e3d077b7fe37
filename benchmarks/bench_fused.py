"""fused_deep_moe versus the unfused chain (LL dispatch → grouped GEMMs → LL combine) on the same inputs.

    python -m benchmarks.bench_fused [--ranks 2] [--transport shm all_to_all] [--tokens 64 128] [--hidden 4096] [--intermediate 1024]
                                     [--num-experts 64] [--num-topk 8] [--quant-modes 1 0] [--json out.json]

Both compute the same result bit for bit (tests/cases_fused.py). The unfused chain is what a user
writes with the public ops: ``Buffer.low_latency_dispatch`` into the ``[L, R*M, H]`` layout, one GEMM pair
per expert on its valid rows, then ``Buffer.low_latency_combine``. The fused op skips that layout: it runs
the expert GEMMs on the received rows and sends the outputs back in the order they arrived. Times are
µs per call (median, p10/p90 over iterations, max over ranks); speed-up = unfused / fused. ``experts alone``
times only the expert FFNs both variants run (the same weights, as many rows per expert as the fused call
received), and ``ceiling`` = unfused / experts alone: the speed-up a fused op would reach if its dispatch,
layout and combine cost nothing.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from benchmarks._harness import base_parser, print_table, progress, run_ranks, summary_us, time_calls, write_json


def _bench(rank: int, world: int, args) -> list[dict]:
    from deep_ep_ops import Buffer, make_fused_weights
    from benchmarks._chains import unfused_deep_moe

    group = dist.group.WORLD
    local = args.num_experts // world
    g = torch.Generator().manual_seed(1 + rank)
    w13 = torch.randn(local, 2 * args.intermediate, args.hidden, generator=g) * args.hidden ** -0.5
    w2 = torch.randn(local, args.hidden, args.intermediate, generator=g) * args.intermediate ** -0.5
    configs = [(t, n, q) for t in args.transport for n in args.tokens for q in args.quant_modes]
    rows, buf = [], None
    for i, (transport, n, quant_mode) in enumerate(configs, 1):
        if rank == 0:
            progress(i, len(configs), f"{transport}: {n} tokens, quant_mode {quant_mode}")
        if buf is None or buf.transport != transport:
            if buf is not None:
                buf.destroy()
            buf = Buffer(group, low_latency_mode=True, timeout_s=600, transport=transport)
        weights = make_fused_weights(w13, w2, quant_mode)
        x = (torch.randn(n, args.hidden, generator=g) * 0.5).bfloat16()
        idx = torch.rand(n, args.num_experts, generator=g).topk(args.num_topk, dim=1).indices
        w = torch.rand(n, args.num_topk, generator=g)
        call = (x, idx, w, *weights, n, args.num_experts)
        fused = summary_us(time_calls(lambda: buf.fused_deep_moe(*call, quant_mode=quant_mode), args.iters,
                                      args.warmup, group))
        unfused = summary_us(time_calls(lambda: unfused_deep_moe(buf, *call, quant_mode=quant_mode), args.iters,
                                        args.warmup, group))
        experts = summary_us(time_calls(_experts_alone(buf.fused_deep_moe(*call, quant_mode=quant_mode)[1],
                                                       weights, local, world, args.hidden, quant_mode, g),
                                        args.iters, args.warmup, group))
        rows.append({"transport": transport, "tokens": n, "quant_mode": quant_mode, "fused_us": fused["median_us"],
                     "fused_p10_us": fused["p10_us"], "fused_p90_us": fused["p90_us"],
                     "unfused_us": unfused["median_us"], "unfused_p10_us": unfused["p10_us"],
                     "unfused_p90_us": unfused["p90_us"], "speedup": unfused["median_us"] / fused["median_us"],
                     "experts_us": experts["median_us"], "ceiling": unfused["median_us"] / experts["median_us"]})
    buf.destroy()
    return rows


def _experts_alone(ep_recv_count, weights, local: int, world: int, hidden: int, quant_mode: int, g):
    """The expert FFNs alone, on as many rows per local expert as this rank received (random rows of the wire
    dtype, the same weights): what both variants compute, so ``unfused / this`` is the most any fusion of
    the communication around them can gain."""
    from deep_ep_ops import ffn

    rows = ep_recv_count.view(local, world).sum(1).tolist()
    if quant_mode == 1:
        xs = [torch.randint(-127, 128, (n, hidden), generator=g, dtype=torch.int8) for n in rows]
        scales = [torch.rand(n, generator=g) / 127 for n in rows]
    else:
        xs, scales = [(torch.randn(n, hidden, generator=g) * 0.5).bfloat16() for n in rows], [None] * local

    def run():
        for i, n in enumerate(rows):
            if n:
                ffn.expert_ffn(xs[i], scales[i], weights[0][i], weights[1][i], weights[2][i], weights[3][i], quant_mode)
    return run


def main(argv=None) -> None:
    p = base_parser(__doc__.splitlines()[0])
    p.set_defaults(iters=5, warmup=1)
    p.add_argument("--tokens", type=int, nargs="+", default=[64, 128])
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--intermediate", type=int, default=1024)
    p.add_argument("--num-experts", type=int, default=64)
    p.add_argument("--num-topk", type=int, default=8)
    p.add_argument("--quant-modes", type=int, nargs="+", default=[1, 0], choices=[0, 1])
    args = p.parse_args(argv)
    rows = run_ranks(args.ranks, _bench, args)
    print_table(
        f"fused_deep_moe vs unfused chain, {args.ranks} gloo ranks, hidden {args.hidden}, intermediate "
        f"{args.intermediate}, top-{args.num_topk} of {args.num_experts} experts, M = tokens; µs (median, p10-p90, "
        f"max over ranks)",
        [("transport", "transport", ""), ("tokens", "tokens", "d"), ("quant_mode", "quant_mode", "d"), ("fused_us", "fused µs", ".0f"),
         ("fused_p10_us", "p10", ".0f"), ("fused_p90_us", "p90", ".0f"), ("unfused_us", "unfused µs", ".0f"),
         ("unfused_p10_us", "p10", ".0f"), ("unfused_p90_us", "p90", ".0f"), ("speedup", "speed-up", ".2f"),
         ("experts_us", "experts alone µs", ".0f"), ("ceiling", "ceiling", ".2f")], rows)
    write_json(args.json, {"benchmark": "fused", "config": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
