"""Tier-2 fault matrix worker: one process of a 5-process gloo world that loses peers on purpose.

Run as ``python cases_faults.py RANK WORLD PORT OUT_DIR CONFIG_JSON`` (see ``test_faults_dist.py``). Processes
are not a :class:`~_pool.RankPool`: two of them die, and the store host with them, so nothing could be reused.

Roles (global ranks): ``H = 0`` hosts the c10d store; ``A = 1``, ``B = 2``, ``C = 3`` survive everything;
``S = 4`` is the faulty peer. Every cell (fault × group size × mode × transport) gets its own process group
and Buffer, built and run for three good steps up front. Then, one fault at a time:

1. ``stall``: S sleeps; A (in the 2-rank groups ``[A, S]``) and B, C (in ``[B, C, S]``) run a fourth step on
   each of their stall cells (side by side, a thread per cell, so that the phase lasts one timeout) and must
   time out naming S.
2. ``peer_dies``: S SIGKILLs itself; the same survivors in fresh ``[A, S]`` / ``[B, C, S]`` cells must fail
   fast naming S.
3. ``store_host_dies``: H SIGKILLs itself; A in ``[H, A]`` and B, C in ``[H, B, C]`` must fail fast naming H,
   the store host.

After each error the survivor uses the Buffer once more, which must raise at once saying that the group
failed earlier. Each survivor writes ``OUT_DIR/RANK.json``: per cell the seconds to the error, the error's
type and message, and the same for the next use. Phases are sequenced through the c10d store while it lives.
"""

from __future__ import annotations

import datetime
import json
import os
import signal
import sys
import threading
import time
import traceback

import torch
import torch.distributed as dist

H, A, B, C, S = range(5)
PHASES = ("stall", "peer_dies", "store_host_dies")
HIDDEN, M, K, INTERMEDIATE = 128, 4, 2, 64
SETUP_TIMEOUT_S = 60.0


def members(phase: str, size: int) -> list[int]:
    if phase == "store_host_dies":
        return [H, A] if size == 2 else [H, B, C]
    return [A, S] if size == 2 else [B, C, S]


def faulty(phase: str) -> int:
    return H if phase == "store_host_dies" else S


def cells(config: dict) -> list[tuple[str, int, str, str]]:
    return [(phase, size, mode, transport) for phase in PHASES for size in config["sizes"]
            for mode in config["modes"] for transport in config["transports"]]


class Cell:
    """One Buffer and the inputs of its steps."""

    def __init__(self, group, rank: int, size: int, mode: str, transport: str, timeout_s: float):
        from deep_ep_ops import Buffer, make_fused_weights

        self.mode, self.experts = mode, 2 * size
        g = torch.Generator().manual_seed(rank)
        self.x = torch.randn(M, HIDDEN, generator=g).bfloat16()
        self.idx = torch.rand(M, self.experts, generator=g).topk(K, dim=1).indices
        self.w = torch.rand(M, K, generator=g)
        if mode == "fused":
            w13 = torch.randn(2, 2 * INTERMEDIATE, HIDDEN, generator=g) * HIDDEN ** -0.5
            w2 = torch.randn(2, HIDDEN, INTERMEDIATE, generator=g) * INTERMEDIATE ** -0.5
            self.weights = make_fused_weights(w13, w2, 1)
        self.buf = Buffer(group, low_latency_mode=mode != "normal", transport=transport, timeout_s=timeout_s,
                          explicitly_destroy=True)

    def step(self) -> None:
        buf = self.buf
        if self.mode == "normal":
            lay = buf.get_dispatch_layout(self.idx, self.experts)
            recv_x, _, _, _, handle, _ = buf.dispatch(self.x, topk_idx=self.idx, topk_weights=self.w,
                                                      num_tokens_per_rank=lay[0], is_token_in_rank=lay[3],
                                                      num_tokens_per_expert=lay[2])
            buf.combine(recv_x, handle)
        elif self.mode == "low_latency":
            # The receive hook: the wait for the peers happens inside hook().
            recv, _, handle, _, hook = buf.low_latency_dispatch(self.x, self.idx, M, self.experts, use_fp8=False,
                                                                return_recv_hook=True)
            hook()
            buf.low_latency_combine(recv, self.idx, self.w, handle)
        else:
            buf.fused_deep_moe(self.x, self.idx, self.w, *self.weights, M, self.experts)


def _attempt(cell: Cell) -> tuple[float, str, str]:
    start = time.monotonic()
    try:
        cell.step()
    except BaseException as exc:  # noqa: BLE001  (whatever escapes is what the test checks)
        return time.monotonic() - start, type(exc).__name__, str(exc)
    return time.monotonic() - start, "", "no error"


def _record(cell: Cell, key: tuple, rank: int) -> dict:
    """The failing step and the next use of the Buffer after it."""
    elapsed, kind, message = _attempt(cell)
    _, next_kind, next_message = _attempt(cell)
    return {"cell": list(key), "rank": rank, "elapsed": elapsed, "type": kind, "message": message,
            "next_type": next_kind, "next_message": next_message}


def _sync(kv, key: str, count: int, limit_s: float = 120.0) -> None:
    """Waits until ``count`` processes have added themselves to ``key`` (through the store, which lives)."""
    kv.add(key, 1)
    deadline = time.monotonic() + limit_s
    while kv.add(key, 0) < count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"phase sync {key!r}: expected {count} processes")
        time.sleep(0.05)


def main(rank: int, world: int, port: int, out_dir: str, config: dict) -> None:
    started = time.monotonic()

    def log(what: str) -> None:  # into the worker's log, which the test shows when something goes wrong
        print(f"[rank {rank} +{time.monotonic() - started:.1f}s] {what}", flush=True)

    import deep_ep_ops  # noqa: F401  (before the setup's collectives: the first import takes seconds here)

    torch.set_num_threads(1)
    timeout_s = config["timeout_s"]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    kv = dist.distributed_c10d._get_default_store()
    log("joined the world")
    mine: dict[tuple, Cell] = {}
    for key in cells(config):
        phase, size, mode, transport = key
        group = dist.new_group(members(phase, size))  # collective over the world: every process calls it
        dist.barrier()  # the members arrive together, so that a loaded machine does not time out the setup
        if rank in members(phase, size):
            # Set up under a generous timeout: on a loaded machine a rank's first op may lag by seconds. The
            # faults then meet the timeout under test.
            mine[key] = Cell(group, rank, size, mode, transport, SETUP_TIMEOUT_S)
            for _ in range(3):
                mine[key].step()
            mine[key].buf._ctx.timeout_s = timeout_s
    dist.barrier()
    log(f"set up {len(mine)} cells")
    results = []
    for phase in PHASES:
        here = {m for size in config["sizes"] for m in members(phase, size)}
        if rank not in here:
            continue
        _sync(kv, f"{phase}/ready", len(here))
        log(f"phase {phase}")
        if rank == faulty(phase):
            if phase == "stall":  # alive but silent until every survivor is done with its stall cells
                _sync(kv, "stall/done", len(here))
                continue
            # What this process leaves named under /dev/shm (output blocks), for the test to see it removed.
            named = [e for e in os.listdir("/dev/shm") if e.startswith(f"deepep-{os.getpid()}-")]
            with open(os.path.join(out_dir, f"{rank}.shm.json"), "w") as f:
                json.dump(named, f)
            time.sleep(0.3)  # the survivors are inside the step by now (in their first cell)
            os.kill(os.getpid(), signal.SIGKILL)
        keys = [k for k in mine if k[0] == phase]
        if phase == "stall":
            # Each stall costs the full timeout: the cells wait side by side, one thread each (their groups
            # and Buffers are independent), so the phase takes one timeout instead of one per cell.
            threads = [threading.Thread(target=lambda k=k: results.append(_record(mine[k], k, rank))) for k in keys]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        else:
            # One after another: the first cell is inside its step when the peer dies, the others start after.
            results.extend(_record(mine[k], k, rank) for k in keys)
        if phase == "stall":
            _sync(kv, "stall/done", len(here))
    log("done")
    for cell in mine.values():
        cell.buf.destroy()  # unlinks this process's segments, and those its dead peers left
    with open(os.path.join(out_dir, f"{rank}.json.tmp"), "w") as f:
        json.dump(results, f)
    os.replace(os.path.join(out_dir, f"{rank}.json.tmp"), os.path.join(out_dir, f"{rank}.json"))
    sys.stdout.flush()
    # Not a normal exit: torch's process-group teardown may wait for collectives of the groups whose
    # peers are gone; what this test checks (the package's cleanup) happened in destroy().
    os._exit(0)


def fresh_run(rank: int, world: int) -> str:
    """A new run (the shared pool's ranks) after the fault world: a Buffer on shm starts and works."""
    cell = Cell(dist.group.WORLD, rank, world, "normal", "shm", 30.0)
    try:
        cell.step()
    finally:
        cell.buf.destroy()
    return "ok"


if __name__ == "__main__":
    try:
        main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], json.loads(sys.argv[5]))
    except BaseException:
        traceback.print_exc()
        sys.stdout.flush()
        os._exit(1)  # see main: a normal exit may wait for dead peers
