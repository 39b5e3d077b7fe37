"""Internode normal mode: flat vs hierarchical dispatch + combine between two simulated hosts.

    sudo python -m benchmarks.bench_internode [--rate 1gbit] [--tokens 4096] [--hidden 7168] [--json out.json]

Two network namespaces joined by a ``tc``-limited veth pair (``benchmarks/_netns.py``), each with its own
hostname and ``/dev/shm``, run ``torchrun`` with 2 ranks per host (as root). Each transport runs the same
dispatch + combine of bf16 tokens (top-k of E, uniform routing); rank 0 gathers per op:

* time: median over iterations of the slowest rank, each call after a barrier;
* bytes across nodes: the op's own counters (``Buffer.get_bytes_sent``), summed over ranks, beside what the
  veth interfaces carried (``tx_bytes`` of both hosts; adds TCP/IP headers and gloo's own messages);
* payload rows across nodes that the routing needs: one per (token, remote rank) for a flat exchange, one
  per distinct (token, remote node) for a node-aware one;
* the baseline: one plain ``all_to_all_single`` of flat dispatch's rows (buffers allocated once), and the
  link's time for the flat bytes at ``--rate``.

Run as a worker (``--worker``) by torchrun inside the hosts; the launcher is the default entry point.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

import torch
import torch.distributed as dist

from benchmarks import _harness

_PREFIX = "INTERNODE "
_RATES = {"gbit": 1e9, "mbit": 1e6}


def _parser():
    p = _harness.base_parser(__doc__.splitlines()[0])
    p.set_defaults(iters=5, warmup=1, transport=["all_to_all", "hierarchical"])  # runs vary: 4 ranks on 2 cores
    p.add_argument("--tokens", type=int, default=4096, help="tokens per rank (default 4096)")
    p.add_argument("--hidden", type=int, default=7168, help="hidden size (default 7168)")
    p.add_argument("--experts", type=int, default=256, help="experts (default 256)")
    p.add_argument("--topk", type=int, default=8, help="experts per token (default 8)")
    p.add_argument("--rate", default="1gbit", help="tc rate of the link, e.g. 1gbit, 500mbit (default 1gbit)")
    p.add_argument("--ranks-per-host", type=int, default=2, help="ranks per simulated host (default 2)")
    p.add_argument("--timeout", type=float, default=1200, help="seconds for the whole run (default 1200)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return p


def _link_tx(ifname: str) -> int:
    with open(f"/sys/class/net/{ifname}/statistics/tx_bytes") as f:
        return int(f.read())


def _phase(fn, ifname: str, local_rank: int):
    """Runs ``fn`` on every rank after a barrier; returns (seconds, this host's veth tx bytes during it)."""
    dist.barrier()
    before = _link_tx(ifname) if local_rank == 0 else 0
    start = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - start
    dist.barrier()  # the host's other rank has finished sending too
    return out, seconds, (_link_tx(ifname) - before if local_rank == 0 else 0)


def _sum(values: list[float]) -> float:
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def _max(values: list[float]) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def worker(args) -> None:
    """One rank: each transport's dispatch + combine, then the all_to_all baseline; rank 0 prints the rows."""
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=args.timeout))
    from deep_ep_ops import Buffer

    rank, world = dist.get_rank(), dist.get_world_size()
    local_rank, ifname = int(os.environ["LOCAL_RANK"]), os.environ["GLOO_SOCKET_IFNAME"]
    per_node = args.ranks_per_host
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(args.tokens, args.hidden, generator=g).bfloat16()
    idx = torch.rand(args.tokens, args.experts, generator=g).topk(args.topk, dim=1).indices
    weights = torch.rand(args.tokens, args.topk, generator=g)
    rows = []
    for n, transport in enumerate(args.transport):
        if rank == 0:
            _harness.progress(n + 1, len(args.transport) + 1, f"{transport}: {args.warmup}+{args.iters} iterations")
        buf = Buffer(dist.group.WORLD, transport=transport, timeout_s=args.timeout)
        per_rank, per_rdma, per_expert, in_rank, _ = buf.get_dispatch_layout(idx, args.experts)
        times, link, sent = {"dispatch": [], "combine": []}, {"dispatch": 0, "combine": 0}, {}
        for it in range(args.warmup + args.iters):
            buf.get_bytes_sent(reset=True)
            dispatched, t_d, tx_d = _phase(lambda: buf.dispatch(
                x, topk_idx=idx, topk_weights=weights, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
                num_tokens_per_expert=per_expert), ifname, local_rank)
            sent["dispatch"] = buf.get_bytes_sent(reset=True)
            recv_x, _, recv_w, _, handle, _ = dispatched
            _, t_c, tx_c = _phase(lambda: buf.combine(recv_x, handle, topk_weights=recv_w), ifname, local_rank)
            sent["combine"] = buf.get_bytes_sent(reset=True)
            if it >= args.warmup:
                times["dispatch"].append(t_d), times["combine"].append(t_c)
                link["dispatch"] += tx_d / args.iters
                link["combine"] += tx_c / args.iters
            del recv_x, recv_w, handle
        buf.destroy()
        my_node = rank // per_node
        remote = [r for r in range(world) if r // per_node != my_node]
        need_rank = float(in_rank[:, remote].sum())  # rows to remote ranks
        need_node = float(sum(per_rdma[b] for b in range(world // per_node) if b != my_node)) \
            if per_rdma is not None else need_rank
        totals = _sum([sent["dispatch"]["inter_node"], sent["combine"]["inter_node"], sent["dispatch"]["intra_node"],
                       sent["combine"]["intra_node"], link["dispatch"], link["combine"], need_rank, need_node])
        slowest = [_max(list(times[op])) for op in ("dispatch", "combine")]
        rows.append({
            "transport": transport, "dispatch_ms": _median(slowest[0]) * 1e3, "combine_ms": _median(slowest[1]) * 1e3,
            "both_ms": _median([a + b for a, b in zip(*slowest)]) * 1e3,
            "dispatch_inter_MB": totals[0] / 1e6, "combine_inter_MB": totals[1] / 1e6,
            "dispatch_intra_MB": totals[2] / 1e6, "combine_intra_MB": totals[3] / 1e6,
            "dispatch_veth_MB": totals[4] / 1e6, "combine_veth_MB": totals[5] / 1e6,
            "rows_token_rank": int(totals[6]), "rows_token_node": int(totals[7]),
        })
    if rank == 0:
        _harness.progress(len(args.transport) + 1, len(args.transport) + 1, "baseline all_to_all_single")
    row_bytes = args.hidden * 2
    send_counts = in_rank.sum(dim=0).to(torch.int64)  # flat dispatch's rows per destination
    baseline = _harness.time_calls(_harness.raw_all_to_all(send_counts, row_bytes, dist.group.WORLD),
                                   args.iters, args.warmup, dist.group.WORLD)
    if rank == 0:
        print(_PREFIX + json.dumps({"rows": rows, "a2a_ms": _median(baseline) * 1e3}), flush=True)
    dist.barrier()  # nobody tears gloo down while a peer may still be talking to it
    dist.destroy_process_group()


def _median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def _rate_bytes_per_s(rate: str) -> float:
    for unit, scale in _RATES.items():
        if rate.endswith(unit):
            return float(rate[: -len(unit)]) * scale / 8
    raise SystemExit(f"--rate: expected <number>gbit or <number>mbit, got {rate!r}")


def launch(args, argv: list[str]) -> dict:
    """Builds the two hosts, runs the workers, returns rank 0's figures (plus the derived ratios)."""
    from benchmarks import _netns

    reason = _netns.available()
    if reason is not None:
        raise SystemExit(f"bench_internode: cannot simulate two hosts here: {reason}")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": "1", "DEEP_USE_MODE": "", "DEEP_EP_OPS_RANKS_PER_NODE": ""}
    worker_argv = ["-m", "benchmarks.bench_internode", "--worker", *argv]
    print(f"bench_internode: 2 hosts x {args.ranks_per_host} ranks, link {args.rate}, {args.tokens} tokens/rank, "
          f"H {args.hidden}, top-{args.topk} of {args.experts}, bf16; transports {args.transport}", flush=True)
    with _netns.two_hosts(rate=args.rate) as topo:
        argvs = [_netns.torchrun_argv(worker_argv, node_rank=i, master_addr=topo.hosts[0].address,
                                      nproc_per_node=args.ranks_per_host) for i in range(2)]
        results = _netns.run_on_hosts(topo, argvs, env=env, timeout_s=args.timeout, cwd=root)
    for i, r in enumerate(results):
        sys.stderr.write(r.stderr[-2000:] if r.returncode else "")
        if r.returncode:
            raise SystemExit(f"bench_internode: host {i} failed (rc {r.returncode})")
    out = _netns.records(results[0].stdout, _PREFIX)[0]
    link_s = _rate_bytes_per_s(args.rate)
    for row in out["rows"]:
        row["inter_MB"] = row["dispatch_inter_MB"] + row["combine_inter_MB"]
        row["veth_MB"] = row["dispatch_veth_MB"] + row["combine_veth_MB"]
        row["link_ms"] = row["inter_MB"] * 1e6 / link_s * 1e3 / 2  # both directions carry half the bytes
        row["x_a2a"] = out["a2a_ms"] / row["dispatch_ms"]
    return out


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = _parser().parse_args(argv)
    if args.worker:
        worker(args)
        return
    out = launch(args, [a for a in argv if a != "--worker"])
    rows = out["rows"]
    _harness.print_table(
        f"dispatch + combine across 2 simulated hosts ({args.rate}); a2a baseline (flat dispatch's rows, plain "
        f"all_to_all_single): {out['a2a_ms']:.0f} ms",
        [("transport", "transport", ""), ("dispatch_ms", "dispatch ms", ".0f"), ("combine_ms", "combine ms", ".0f"),
         ("both_ms", "both ms", ".0f"), ("x_a2a", "dispatch x a2a", ".2f"),
         ("dispatch_inter_MB", "disp. inter MB", ".1f"), ("combine_inter_MB", "comb. inter MB", ".1f"),
         ("veth_MB", "veth MB", ".1f"), ("dispatch_intra_MB", "disp. intra MB", ".1f"),
         ("rows_token_rank", "rows (tok,rank)", "d"), ("rows_token_node", "rows (tok,node)", "d"),
         ("link_ms", "link ms", ".0f")], rows)
    by_name = {r["transport"]: r for r in rows}
    if {"all_to_all", "hierarchical"} <= set(by_name):
        flat, hier = by_name["all_to_all"], by_name["hierarchical"]
        out["hier_vs_flat"] = {
            "inter_bytes": hier["inter_MB"] / flat["inter_MB"],
            "veth_bytes": hier["veth_MB"] / flat["veth_MB"],
            "dispatch_payload_rows": hier["rows_token_node"] / hier["rows_token_rank"],
            "speedup_both": flat["both_ms"] / hier["both_ms"],
        }
        r = out["hier_vs_flat"]
        print(f"\nhierarchical / flat: cross-node bytes {r['inter_bytes']:.1%} (op counters; target <= 60%), "
              f"{r['veth_bytes']:.1%} (veth); payload rows (token,node)/(token,rank) {r['dispatch_payload_rows']:.1%}; "
              f"dispatch+combine {r['speedup_both']:.2f}x faster (target >= 1.5x)")
    _harness.write_json(args.json, {"config": vars(args), **out})


if __name__ == "__main__":
    main()
