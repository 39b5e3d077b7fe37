"""Eager per-call cost of each ``torch.ops.deepep`` op versus its kernel and the bare transport.

    python -m benchmarks.bench_op_overhead [--ranks 1] [--tokens 8] [--hidden 64] [--json out.json]

Columns (µs per call, median over iterations, max over ranks):

* ``torch.ops``: the op as users call it (dispatcher + autograd wrapper + kernel), one call after a barrier.
* ``back to back``: the same op called ``--iters`` times in a row, per call: the host cost without the wake-up
  of a core that sat in the barrier (caches, branch predictors), the way a model's layers call it.
* ``kernel``: the kernel the op runs (the backend's whole-op path where it has one), called directly from
  Python, so ``torch.ops − kernel`` is what the torch.library registration costs.
* ``transport``: ``transport.all_to_all`` of the op's payload bytes alone (the baseline). ``kernel −
  transport`` is this package's own work: checks, handshake, packing and unpacking.
* ``handshake``: the fixed-size header exchange that every communicating op starts with.

Tiny inputs by default, so the figures are overhead rather than bandwidth. With one rank, the
transport is a local copy and the figures are pure host cost.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from benchmarks._harness import base_parser, print_table, progress, run_ranks, summary_us, time_calls, write_json


def _repeat(fn, times: int) -> None:
    """``fn()`` ``times`` times, each result dropped before the next call (as a model's layers do)."""
    for _ in range(times):
        fn()


def _bench(rank: int, world: int, tokens: int, hidden: int, iters: int, warmup: int) -> list[dict]:
    from deep_ep_ops import _handshake, _registry, _waits, normal, ops

    group = dist.group.WORLD
    g = group.group_name
    ctx = _registry.get(g)
    num_experts = 8 * world
    gen = torch.Generator().manual_seed(rank)
    idx = torch.rand(tokens, num_experts, generator=gen).topk(2, dim=1).indices
    w = torch.rand(tokens, 2, generator=gen)
    x = torch.randn(tokens, hidden, generator=gen, dtype=torch.float32).bfloat16()
    xg = x.float().requires_grad_()
    _, _, per_expert, in_rank = ops.get_dispatch_layout(idx, num_experts, g)
    out = ops.dispatch(x, in_rank, num_experts, g, topk_idx=idx, topk_weights=w, num_tokens_per_expert=per_expert)
    handle, recv_x = list(out.handle), out.recv_x
    send_counts = in_rank.sum(0)
    recv_counts = torch.diff(handle[0][:, rank].long(), prepend=torch.zeros(1, dtype=torch.int64))
    row_bytes = hidden * 2 + 16 * 2 + 8  # x, topk ids, weights, source index (8-byte aligned fields)

    def transport(send_n, recv_n):
        rows = torch.empty(int(send_n.sum()), row_bytes, dtype=torch.uint8)
        return lambda: _waits.wait(ctx, ctx.transport.all_to_all(rows, send_n.tolist(), recv_n.tolist()), "bench", 0)

    def handshake():
        rows = _handshake.header(ctx, "dispatch", 0, normal.DispatchSettings(*[0] * 9))
        _handshake.exchange(ctx, "dispatch", 0, rows)

    args_dispatch = (x, None, idx, w, in_rank, per_expert, num_experts, g, world)

    def kernel(name: str, portable):
        """What ``deepep::<name>`` runs: the backend's whole-op kernel where it has one, else the portable one."""
        return ctx.transport.override(name) or portable
    cases = [
        ("get_dispatch_layout", lambda: torch.ops.deepep.get_dispatch_layout(idx, num_experts, g, world, world),
         lambda: kernel("get_dispatch_layout", normal.get_dispatch_layout)(idx, num_experts, g, world, world), None),
        ("dispatch", lambda: torch.ops.deepep.dispatch(*args_dispatch),
         lambda: kernel("dispatch", normal.dispatch)(*args_dispatch),
         transport(send_counts, recv_counts)),
        ("dispatch (x requires grad)", lambda: torch.ops.deepep.dispatch(xg, *args_dispatch[1:]),
         lambda: kernel("dispatch", normal.dispatch)(xg.detach(), *args_dispatch[1:]), transport(send_counts, recv_counts)),
        ("dispatch.cached", lambda: torch.ops.deepep.dispatch.cached(x, None, None, handle, g, world),
         lambda: kernel("dispatch.cached", normal.cached_dispatch)(x, None, None, handle, g, world),
         transport(send_counts, recv_counts)),
        ("combine", lambda: torch.ops.deepep.combine(recv_x, handle, None, None, None, g, world),
         lambda: kernel("combine", normal.combine)(recv_x, handle, None, None, None, g, world),
         transport(recv_counts, send_counts)),
    ]
    rows = []
    for i, (name, op_call, kernel_call, transport_call) in enumerate(cases, 1):
        if rank == 0:
            progress(i, len(cases), name)
        op_us = summary_us(time_calls(op_call, iters, warmup, group))["median_us"]
        kernel_us = summary_us(time_calls(kernel_call, iters, warmup, group))["median_us"]
        in_a_row = summary_us(time_calls(lambda: _repeat(op_call, iters), 5, 1, group))["median_us"] / iters
        row = {"op": name, "torch_ops_us": op_us, "back_to_back_us": in_a_row, "kernel_us": kernel_us,
               "library_overhead_us": op_us - kernel_us, "transport_us": float("nan"), "handshake_us": float("nan")}
        if transport_call is not None:
            row["transport_us"] = summary_us(time_calls(transport_call, iters, warmup, group))["median_us"]
            row["handshake_us"] = summary_us(time_calls(handshake, iters, warmup, group))["median_us"]
        rows.append(row)
    return rows


def main(argv=None) -> None:
    p = base_parser(__doc__.splitlines()[0])
    p.set_defaults(ranks=1, iters=200, warmup=20)
    p.add_argument("--tokens", type=int, default=8)
    p.add_argument("--hidden", type=int, default=64)
    args = p.parse_args(argv)
    rows = run_ranks(args.ranks, _bench, args.tokens, args.hidden, args.iters, args.warmup)
    print_table(f"op overhead, {args.ranks} rank(s), {args.tokens} tokens x hidden {args.hidden} bf16, top-2 of "
                f"{8 * args.ranks} experts; µs per call (median of {args.iters}, max over ranks)",
                [("op", "op", "s"), ("torch_ops_us", "torch.ops", ".1f"), ("back_to_back_us", "back to back", ".1f"),
                 ("kernel_us", "kernel", ".1f"),
                 ("library_overhead_us", "torch.library overhead", ".1f"), ("transport_us", "transport (baseline)", ".1f"),
                 ("handshake_us", "handshake", ".1f")], rows)
    write_json(args.json, {"benchmark": "op_overhead", "config": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
