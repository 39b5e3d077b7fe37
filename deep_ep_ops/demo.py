"""The main job: an MoE layer over ``deep_ep_ops.Buffer`` on N spawned CPU ranks, checked every step.

    python -m deep_ep_ops.demo --ranks 4 --tokens 128 --hidden 512 --experts 16 --topk 4 --steps 5

Each step every rank draws a batch (the token count varies per rank and step), gates it, and runs
``get_dispatch_layout`` → ``dispatch`` → its local experts' SwiGLU MLP → ``combine``. It then checks the
result against ``deep_ep_ops.reference`` (all ranks simulated in one process, with the same expert code),
where it must match exactly, and against a dense fp32 MoE, within bf16 rounding. Rank 0 prints a table
per step.
"""

from __future__ import annotations

import argparse
import datetime
import os
import socket
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _weights(args, seed: int = 1234):
    g = torch.Generator().manual_seed(seed)
    scale = args.hidden ** -0.5
    gate = torch.randn(args.hidden, args.experts, generator=g) * scale
    w13 = torch.randn(args.experts, 2 * args.intermediate, args.hidden, generator=g) * scale
    w2 = torch.randn(args.experts, args.hidden, args.intermediate, generator=g) * args.intermediate ** -0.5
    return gate, w13, w2


def _batch(args, step: int, rank: int, gate: torch.Tensor):
    g = torch.Generator().manual_seed(10_000 * step + rank)
    n = int(torch.randint(args.tokens // 2, args.tokens + 1, (1,), generator=g))
    x = torch.randn(n, args.hidden, generator=g).to(torch.bfloat16)
    scores = (x.float() @ gate).softmax(dim=-1)
    weights, idx = scores.topk(args.topk, dim=-1)
    return x, idx, weights / weights.sum(dim=-1, keepdim=True)


def experts(recv_x, recv_idx, recv_w, w13, w2, first_expert: int) -> torch.Tensor:
    """Local experts on received rows: ``Σ_slots weight · SwiGLU-MLP_e(x)``, fp32 math, bf16 out."""
    out = torch.zeros(recv_x.shape[0], recv_x.shape[1])
    for i in range(w13.shape[0]):
        weight = (recv_w * (recv_idx == i)).sum(dim=1)
        rows = (recv_idx == i).any(dim=1).nonzero().flatten()
        if rows.numel():
            gate_up = recv_x[rows].float() @ w13[first_expert + i].t()
            gate_h, up = gate_up.chunk(2, dim=-1)
            out[rows] += weight[rows, None] * ((torch.nn.functional.silu(gate_h) * up) @ w2[first_expert + i].t())
    return out.to(recv_x.dtype)


def _dense(x, idx, w, w13, w2) -> torch.Tensor:
    out = torch.zeros(x.shape[0], x.shape[1])
    for k in range(idx.shape[1]):
        gate_up = torch.einsum("th,tih->ti", x.float(), w13[idx[:, k]])
        gate_h, up = gate_up.chunk(2, dim=-1)
        out += w[:, k, None] * torch.einsum("ti,thi->th", torch.nn.functional.silu(gate_h) * up, w2[idx[:, k]])
    return out


def _worker(rank: int, args, port: int) -> None:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // args.ranks))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=args.ranks,
                            timeout=datetime.timedelta(seconds=300))
    import deep_ep_ops
    from deep_ep_ops import reference

    gate, w13, w2 = _weights(args)
    num_local_experts = args.experts // args.ranks
    buf = deep_ep_ops.Buffer(dist.group.WORLD, timeout_s=120)
    worst_ref = worst_dense = 0.0
    for step in range(args.steps):
        x, idx, w = _batch(args, step, rank, gate)
        times = {}
        t0 = time.perf_counter()
        per_rank, _, per_expert, in_rank, _ = buf.get_dispatch_layout(idx, args.experts)
        times["layout"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        recv_x, recv_idx, recv_w, counts, handle, _ = buf.dispatch(
            x, topk_idx=idx, topk_weights=w, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
            num_tokens_per_expert=per_expert)
        times["dispatch"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        y = experts(recv_x, recv_idx, recv_w, w13, w2, rank * num_local_experts)
        times["experts"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        out, _, _ = buf.combine(y, handle)
        times["combine"] = time.perf_counter() - t0

        batches = [_batch(args, step, r, gate) for r in range(args.ranks)]
        ref = reference.dispatch([b[0] for b in batches], [b[1] for b in batches], [b[2] for b in batches], args.experts)
        ref_y = [experts(d.recv_x, d.recv_topk_idx, d.recv_topk_weights, w13, w2, r * num_local_experts) for r, d in enumerate(ref)]
        want = reference.combine(ref_y, ref)[rank][0]
        err_ref = (out.float() - want.float()).abs().max().item() if out.numel() else 0.0
        err_dense = (out.float() - _dense(x, idx, w, w13, w2)).abs().max().item() if out.numel() else 0.0
        worst_ref, worst_dense = max(worst_ref, err_ref), max(worst_dense, err_dense)
        # Tensors, not all_gather_object: that needs NumPy, which torch does not depend on.
        row = torch.tensor([rank, x.shape[0], int(per_rank.sum()), recv_x.shape[0], *(times[k] for k in _OPS),
                            err_ref, err_dense], dtype=torch.float64)
        rows = [torch.empty_like(row) for _ in range(args.ranks)]
        dist.all_gather(rows, row)
        if rank == 0:
            _print_step(step, args, [r.tolist() for r in rows], counts)
    buf.destroy()
    worst = torch.tensor([worst_ref, worst_dense], dtype=torch.float64)
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    ok = worst[0].item() == 0.0
    if rank == 0:
        print(f"\n{'PASS' if ok else 'FAIL'}: {args.steps} steps on {args.ranks} ranks; max |out - reference| = "
              f"{worst[0].item():.3g} (must be 0), max |out - dense fp32 MoE| = {worst[1].item():.3g} (bf16 rounding)",
              flush=True)
    dist.destroy_process_group()
    if rank == 0 and not ok:
        sys.exit(1)


_OPS = ("layout", "dispatch", "experts", "combine")


def _print_step(step: int, args, rows, counts) -> None:
    print(f"\nstep {step + 1}/{args.steps}  (rank 0 received per local expert: {counts})", flush=True)
    header = (f"{'rank':>4} {'tokens':>6} {'sent':>5} {'recv':>5} {'layout ms':>9} {'dispatch ms':>11} "
              f"{'experts ms':>10} {'combine ms':>10} {'err vs ref':>10} {'err vs dense':>12}")
    print(header)
    for rank, n, sent, recv, layout_s, dispatch_s, experts_s, combine_s, err_ref, err_dense in rows:
        print(f"{int(rank):>4} {int(n):>6} {int(sent):>5} {int(recv):>5} {layout_s * 1e3:>9.2f} {dispatch_s * 1e3:>11.2f} "
              f"{experts_s * 1e3:>10.2f} {combine_s * 1e3:>10.2f} {err_ref:>10.3g} {err_dense:>12.3g}")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ranks", type=int, default=4, help="CPU ranks to spawn (default 4)")
    p.add_argument("--tokens", type=int, default=128, help="max tokens per rank per step (default 128)")
    p.add_argument("--hidden", type=int, default=512, help="hidden size (default 512)")
    p.add_argument("--intermediate", type=int, default=256, help="expert intermediate size (default 256)")
    p.add_argument("--experts", type=int, default=16, help="routed experts, divisible by --ranks (default 16)")
    p.add_argument("--topk", type=int, default=4, help="experts per token (default 4)")
    p.add_argument("--steps", type=int, default=5, help="steps (default 5)")
    args = p.parse_args(argv)
    if args.experts % args.ranks or args.topk > args.experts or min(args.ranks, args.tokens, args.steps) < 1:
        p.error("need --experts divisible by --ranks, --topk <= --experts, and positive --ranks/--tokens/--steps")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    print(f"deep_ep_ops demo: {args.ranks} CPU ranks (gloo), up to {args.tokens} tokens/rank, hidden {args.hidden}, "
          f"{args.experts} experts, top-{args.topk}, {args.steps} steps", flush=True)
    mp.spawn(_worker, args=(args, port), nprocs=args.ranks)


if __name__ == "__main__":
    main()
