"""A pool of spawned gloo ranks that stays up for the session and runs many cases.

Spawning ranks costs seconds, so each world size is spawned once. ``pool.run(fn, *args)`` calls the
module-level ``fn(rank, world_size, *args)`` on every rank and returns the per-rank results, or raises
with the traceback of the first rank that failed. After a failure or a timeout the pool is restarted
before the next case, because the process group may be unusable.
"""

from __future__ import annotations

import datetime
import os
import queue
import socket
import time
import traceback

import torch.multiprocessing as mp

RUN_TIMEOUT_S = float(os.environ.get("DEEP_EP_OPS_TEST_CASE_TIMEOUT_S", "240"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, inq, outq) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world_size, timeout=datetime.timedelta(seconds=RUN_TIMEOUT_S))
        import deep_ep_ops  # noqa: F401

        outq.put((rank, "ready", None))
    except BaseException:
        outq.put((rank, "err", traceback.format_exc()))
        return
    while True:
        item = inq.get()
        if item is None:
            break
        fn, args = item
        try:
            outq.put((rank, "ok", fn(rank, world_size, *args)))
        except BaseException:
            outq.put((rank, "err", traceback.format_exc()))
    dist.destroy_process_group()


class RankPool:
    """``world_size`` spawned ranks joined in one gloo group on 127.0.0.1."""

    def __init__(self, world_size: int):
        self.world_size = world_size
        self._procs = []
        self._start()

    def _start(self) -> None:
        ctx = mp.get_context("spawn")
        port = _free_port()
        self._inqs = [ctx.Queue() for _ in range(self.world_size)]
        self._outq = ctx.Queue()
        self._procs = [ctx.Process(target=_worker, args=(r, self.world_size, port, self._inqs[r], self._outq),
                                   daemon=True) for r in range(self.world_size)]
        for p in self._procs:
            p.start()
        self._collect("startup", timeout_s=120)

    def _collect(self, what: str, timeout_s: float, raise_errors: bool = True) -> list:
        results: list = [None] * self.world_size
        errors: dict[int, str] = {}
        pending = set(range(self.world_size))
        deadline = time.monotonic() + timeout_s
        while pending:
            try:
                rank, kind, value = self._outq.get(timeout=1.0)
            except queue.Empty:
                dead = [r for r in pending if not self._procs[r].is_alive()]
                for r in dead:
                    pending.discard(r)
                    errors[r] = f"rank {r} died (exit code {self._procs[r].exitcode})"
                if time.monotonic() > deadline:
                    self.close()
                    raise TimeoutError(f"{what}: ranks {sorted(pending)} did not finish within {timeout_s:g} s") from None
                continue
            pending.discard(rank)
            if kind == "err":
                errors[rank] = value
            else:
                results[rank] = value
        if errors and not raise_errors:
            self.close()
            return [("err", errors[r]) if r in errors else ("ok", results[r]) for r in range(self.world_size)]
        if errors:
            self.close()
            first = min(errors)
            others = f" (ranks {sorted(errors)} failed)" if len(errors) > 1 else ""
            raise AssertionError(f"{what} failed on rank {first}{others}:\n{errors[first]}")
        return results

    def run(self, fn, *args, timeout_s: float = RUN_TIMEOUT_S, raise_errors: bool = True) -> list:
        """Runs ``fn(rank, world_size, *args)`` on every rank; returns the per-rank results.

        With ``raise_errors=False`` returns ``("ok", result)`` or ``("err", traceback)`` per rank instead.
        """
        if not self._procs:
            self._start()
        for q in self._inqs:
            q.put((fn, args))
        return self._collect(f"{fn.__name__}{args}", timeout_s, raise_errors)

    def close(self) -> None:
        for q in self._inqs:
            try:
                q.put(None)
            except Exception:
                pass
        for p in self._procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
        self._procs = []
