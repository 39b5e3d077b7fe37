"""Train a small DeepSeek-style MoE block with expert parallelism, compiled with ``torch.compile``.

Two hosts, two ranks each (the multi-node recipe; run it on both hosts, ``--node-rank 1`` on the second)::

    torchrun --nnodes 2 --nproc-per-node 2 --node-rank 0 --master-addr HOST0 --master-port 29500 \\
        -m deep_ep_ops.examples.train_moe --steps 10

One host, two ranks (``shm`` transport); or four ranks as two simulated nodes (``hierarchical``)::

    torchrun --nnodes 1 --nproc-per-node 2 -m deep_ep_ops.examples.train_moe
    DEEP_EP_OPS_RANKS_PER_NODE=2 torchrun --nnodes 1 --nproc-per-node 4 -m deep_ep_ops.examples.train_moe

The block is RMSNorm → sigmoid gate, top-k, normalized weights (DeepSeek-V3) → ``Buffer.dispatch`` →
this rank's routed SwiGLU experts → ``Buffer.combine``, plus a shared SwiGLU expert on every token, plus
the residual. Routed experts are sharded (rank r owns experts ``r*E/R .. (r+1)*E/R - 1``); everything else
is replicated and its gradients are all-reduced. The block runs under ``torch.compile(fullgraph=True)``
(``--backend aot_eager`` by default, ``inductor`` works too; ``--no-compile`` for eager). The target is a
fixed random teacher function, so the loss falls within a few steps. Rank 0 prints one line per step and a final ``done:`` line::

    step 3 loss 0.063277 tokens/s 3400 ms 75.3 transport hierarchical intra_node_bytes 831456 inter_node_bytes 537480
    done: first loss 0.112273 last loss 0.053225 transport hierarchical compile_s 2.3 step_ms 75.3 ... replicated_drift 0
"""

from __future__ import annotations

import argparse
import datetime
import os
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

from deep_ep_ops import Buffer


class SwiGLU(torch.nn.Module):
    """A dense SwiGLU MLP (the shared expert, and the teacher)."""

    def __init__(self, hidden: int, inter: int):
        super().__init__()
        self.w13 = torch.nn.Linear(hidden, 2 * inter, bias=False)
        self.w2 = torch.nn.Linear(inter, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w13(x).chunk(2, dim=-1)
        return self.w2(F.silu(gate) * up)


class MoEBlock(torch.nn.Module):
    """``x + shared(norm(x)) + routed(norm(x))`` with the routed experts spread over the group.

    Args:
        buf: the expert-parallel Buffer; its group decides which experts this rank owns.
        args: parsed command line (``hidden``, ``inter``, ``experts``, ``topk``, ``score``).
    """

    def __init__(self, buf: Buffer, args: argparse.Namespace):
        super().__init__()
        self.buf, self.num_experts, self.topk, self.score = buf, args.experts, args.topk, args.score
        # Same seed on every rank, so the replicated parameters start identical without a broadcast.
        torch.manual_seed(0)
        self.norm = torch.nn.RMSNorm(args.hidden)
        self.gate = torch.nn.Linear(args.hidden, args.experts, bias=False)
        self.shared = SwiGLU(args.hidden, args.inter)
        # All experts come from one generator and each rank keeps its slice: the model is the same whatever
        # the world size.
        g = torch.Generator().manual_seed(1)
        local = args.experts // buf.group_size
        first = buf.rank * local
        w13 = torch.randn(args.experts, args.hidden, 2 * args.inter, generator=g) * args.hidden ** -0.5
        w2 = torch.randn(args.experts, args.inter, args.hidden, generator=g) * args.inter ** -0.5
        self.w13 = torch.nn.Parameter(w13[first:first + local].clone())
        self.w2 = torch.nn.Parameter(w2[first:first + local].clone())

    def route(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k expert ids (int64) and their weights, normalized to sum to 1 per token."""
        logits = self.gate(h)
        scores = logits.sigmoid() if self.score == "sigmoid" else logits.softmax(dim=-1)
        weights, idx = scores.topk(self.topk, dim=-1)
        return idx, weights / weights.sum(dim=-1, keepdim=True)

    def experts(self, recv_x, recv_idx, recv_w) -> torch.Tensor:
        """Every local expert on every received row, each row weighted by its routing weight for that expert
        (0 where the row did not pick it). Dense over rows on purpose: no data-dependent indexing, so the
        graph has one symbolic row count and no graph break; the cost is ``local experts x rows``."""
        local, hidden, inter2 = self.w13.shape
        mine = recv_idx.unsqueeze(-1) == torch.arange(local, device=recv_idx.device)  # [n, K, L]
        weight = (recv_w.unsqueeze(-1) * mine).sum(dim=1)  # [n, L]
        # Two plain matmuls over all local experts at once: the experts sit side by side in the columns of
        # the first and are summed by the second. (A batched [L, n, .] einsum lowers to a bmm that inductor
        # cannot lay out for the unbacked row count n.)
        gate_up = (recv_x @ self.w13.transpose(0, 1).reshape(hidden, local * inter2)).unflatten(1, (local, inter2))
        gate, up = gate_up.chunk(2, dim=-1)
        act = F.silu(gate) * up * weight.unsqueeze(-1)  # [n, L, I]; weighted before w2, which is linear
        return act.flatten(1) @ self.w2.reshape(-1, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        idx, w = self.route(h)
        per_rank, _, per_expert, in_rank, _ = self.buf.get_dispatch_layout(idx, self.num_experts)
        # dispatch and combine are differentiable: the backward of dispatch is a combine, and of combine a
        # cached dispatch, so the expert gradients from every rank's tokens reach the expert's owner, and the
        # gate gets its gradient through the dispatched topk_weights.
        recv_x, recv_idx, recv_w, _, handle, _ = self.buf.dispatch(
            h, topk_idx=idx, topk_weights=w, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
            num_tokens_per_expert=per_expert)
        routed, _, _ = self.buf.combine(self.experts(recv_x, recv_idx, recv_w), handle)
        return x + self.shared(h) + routed


def batch(args, step: int, rank: int, teacher: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Fresh tokens per (step, rank) and the teacher's target for them."""
    g = torch.Generator().manual_seed(1_000_003 * step + rank)
    x = torch.randn(args.tokens, args.hidden, generator=g)
    with torch.no_grad():
        return x, x + teacher(F.rms_norm(x, (args.hidden,)))


def sync_grads(params: list[torch.nn.Parameter]) -> None:
    """Sums the replicated parameters' gradients over the group in one all-reduce (flattened).

    Each rank's loss is already divided by the world size, so the sum is the gradient of the mean loss,
    which is also what the experts received through combine's backward.
    """
    flat = torch.cat([p.grad.flatten() for p in params])
    dist.all_reduce(flat)
    for p, g in zip(params, flat.split([p.numel() for p in params])):
        p.grad.copy_(g.view_as(p))


def train(args: argparse.Namespace) -> None:
    """Runs ``args.steps`` AdamW steps on this rank; rank 0 prints the log."""
    rank, world = dist.get_rank(), dist.get_world_size()
    buf = Buffer(dist.group.WORLD)
    model = MoEBlock(buf, args)
    teacher = SwiGLU(args.hidden, args.inter).requires_grad_(False)  # seeded by MoEBlock: same on every rank
    replicated = [p for n, p in model.named_parameters() if n not in ("w13", "w2")]
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    # fullgraph: the whole block (gate, layout, dispatch, experts, combine) must be one graph; the received
    # row count is an unbacked size, so later steps reuse that graph whatever the routing.
    forward = torch.compile(model, fullgraph=True, backend=args.backend) if args.compile else model
    losses, times = [], []
    for step in range(args.steps):
        x, target = batch(args, step, rank, teacher)
        t0 = time.perf_counter()
        loss = F.mse_loss(forward(x), target)
        (loss / world).backward()
        sync_grads(replicated)
        opt.step()
        opt.zero_grad(set_to_none=True)
        elapsed = time.perf_counter() - t0  # rank 0's; the ranks move in lockstep through the collectives
        sent = buf.get_bytes_sent(reset=True)
        # One all-reduce for the log: the mean loss and the group's total bytes (fp64 holds them exactly).
        stats = torch.tensor([loss.item() / world, sent["intra_node"], sent["inter_node"]], dtype=torch.float64)
        dist.all_reduce(stats)
        losses.append(stats[0].item())
        times.append(elapsed)
        if rank == 0:
            print(f"step {step} loss {losses[-1]:.6f} tokens/s {args.tokens * world / elapsed:.0f} "
                  f"ms {elapsed * 1e3:.1f} transport {buf.transport} intra_node_bytes {int(stats[1])} "
                  f"inter_node_bytes {int(stats[2])}", flush=True)
    # The replicated parameters must still be equal on every rank (same gradients, same AdamW updates).
    mine = torch.cat([p.detach().flatten() for p in replicated])
    rank0 = mine.clone()
    dist.broadcast(rank0, 0)
    drift = (mine - rank0).abs().max()
    dist.all_reduce(drift, op=dist.ReduceOp.MAX)
    if rank == 0:
        # Step 0 includes compiling the forward and backward graphs; the median of the rest is the steady step.
        steady = sorted(times[1:])[len(times[1:]) // 2] if len(times) > 1 else times[0]
        print(f"done: first loss {losses[0]:.6f} last loss {losses[-1]:.6f} transport {buf.transport} "
              f"compile_s {max(0.0, times[0] - steady):.1f} step_ms {steady * 1e3:.1f} ranks {world} "
              f"ranks_per_node {buf.num_ranks_per_node} replicated_drift {drift.item():g}", flush=True)
    buf.destroy()


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=10, help="optimizer steps (default 10)")
    p.add_argument("--tokens", type=int, default=64, help="tokens per rank per step (default 64)")
    p.add_argument("--hidden", type=int, default=128, help="hidden size (default 128)")
    p.add_argument("--inter", type=int, default=64, help="expert intermediate size (default 64)")
    p.add_argument("--experts", type=int, default=16, help="routed experts, divisible by the world size (default 16)")
    p.add_argument("--topk", type=int, default=4, help="experts per token (default 4)")
    p.add_argument("--score", choices=("sigmoid", "softmax"), default="sigmoid",
                   help="gate scores: DeepSeek-V3's sigmoid or V2's softmax (default sigmoid)")
    p.add_argument("--lr", type=float, default=1e-2, help="AdamW learning rate (default 1e-2)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                   help="torch.compile the block with fullgraph=True (default on)")
    # aot_eager by default: it traces forward and backward (AOT autograd) through the ops in a few seconds.
    # inductor works too (same losses to the printed digits), but its cold compile of the forward and
    # backward graphs costs about 7 CPU-seconds per rank: too slow for 4 ranks on a 2-core laptop.
    p.add_argument("--backend", default="aot_eager", help="torch.compile backend: aot_eager (default), inductor, eager")
    args = p.parse_args(argv)
    if args.topk > args.experts or min(args.steps, args.tokens, args.topk) < 1:
        p.error("need positive --steps/--tokens/--topk and --topk <= --experts")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    # Without torchrun (``python -m deep_ep_ops.examples.train_moe``): a world of one on localhost.
    for key, value in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29512"), ("RANK", "0"), ("WORLD_SIZE", "1")):
        os.environ.setdefault(key, value)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=300))  # env:// from torchrun
    if args.experts % dist.get_world_size():
        raise SystemExit(f"--experts {args.experts} must be divisible by the world size {dist.get_world_size()}")
    if dist.get_rank() == 0:
        print(f"train_moe: {dist.get_world_size()} ranks, {args.tokens} tokens/rank, hidden {args.hidden}, "
              f"{args.experts} experts top-{args.topk} ({args.score}) + shared expert, "
              f"{'compiled with ' + args.backend if args.compile else 'eager'}", flush=True)
    try:
        train(args)
        dist.barrier()  # nobody tears gloo down while a peer may still be talking to it
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
