"""Tier 2: a peer that stalls or dies, or the store host dying, fails every survivor fast and clearly.

The matrix {normal, low-latency (receive hook), fused} × {shm, all_to_all} × {peer stalls, peer dies
(SIGKILL), store host dies (SIGKILL)} × {2, 3 ranks} runs in one 5-process world (``cases_faults``), spawned
here rather than in the shared pool since ranks die. Every survivor must raise a deepep error naming the
faulty rank within ``timeout_s + 5`` s, its next use of the Buffer must say that the group failed earlier,
nothing may hang, and no ``/dev/shm`` segment of the run may outlive it. A new run then starts cleanly.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time

import pytest

import cases_faults

pytestmark = pytest.mark.distributed

TIMEOUT_S = 3.0
#: The whole run: startup of 5 processes (imports are slow on a loaded 2-core machine) and every cell.
RUN_LIMIT_S = 240.0
CONFIG = {"timeout_s": TIMEOUT_S, "sizes": [2, 3], "modes": ["normal", "low_latency", "fused"],
          "transports": ["shm", "all_to_all"]}
OPS = {"normal": "dispatch", "low_latency": "low_latency_dispatch", "fused": "fused_deep_moe"}
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _leftovers(pids: list[int]) -> list[str]:
    return sorted(e for e in os.listdir("/dev/shm") if any(e.startswith(f"deepep-{pid}-") for pid in pids))


@pytest.fixture(scope="module")
def matrix(tmp_path_factory):
    """Runs the fault world once; returns ``(results by cell and rank, pids, worker logs)``."""
    out = tmp_path_factory.mktemp("faults")
    port, world = _free_port(), 5
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([_ROOT, os.environ.get("PYTHONPATH", "")]))
    logs = [open(out / f"{r}.log", "w") for r in range(world)]
    procs = [subprocess.Popen([sys.executable, "-W", "ignore", cases_faults.__file__, str(r), str(world), str(port),
                               str(out), json.dumps(CONFIG)], stdout=logs[r], stderr=subprocess.STDOUT, env=env)
             for r in range(world)]
    deadline = time.monotonic() + RUN_LIMIT_S
    try:
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            if any(p.poll() not in (None, 0, -9) for p in procs):
                break  # a worker failed: the others may wait for it forever
            time.sleep(0.05)  # poll() also reaps the processes that died, as a launcher would
    finally:
        hung = [r for r, p in enumerate(procs) if p.poll() is None]
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for f in logs:
            f.close()
    text = {r: (out / f"{r}.log").read_text()[-3000:] for r in range(world)}
    failed = {r: p.returncode for r, p in enumerate(procs) if p.returncode not in (0, -9) and r not in hung}
    assert not failed, f"workers failed {failed}:\n" + "\n".join(text[r] for r in failed)
    assert not hung, f"ranks {hung} still ran after {RUN_LIMIT_S:g} s:\n" + "\n".join(text[r] for r in hung)
    results = {}
    for r in (cases_faults.A, cases_faults.B, cases_faults.C):
        assert (out / f"{r}.json").exists(), f"survivor {r} wrote no results:\n{text[r]}"
        for item in json.loads((out / f"{r}.json").read_text()):
            results[tuple(item["cell"]), r] = item
    named = [json.loads((out / f"{r}.shm.json").read_text()) for r in (cases_faults.H, cases_faults.S)]
    return results, [p.pid for p in procs], named


def _expected_name(phase: str, size: int) -> str:
    if phase == "store_host_dies":
        return r"rank 0, dead \(process \d+ exited\), the host of the c10d store"
    rank = size - 1  # the faulty process is the last rank of its group, global rank 4
    return rf"rank {rank} \(global rank 4\)" + (r", dead \(process \d+ exited\)" if phase == "peer_dies" else "")


@pytest.mark.parametrize("cell", cases_faults.cells(CONFIG), ids=lambda c: "-".join(map(str, c)))
def test_survivors_fail_fast_naming_the_rank(matrix, cell):
    results, _, _ = matrix
    phase, size, mode, _ = cell
    survivors = [r for r in cases_faults.members(phase, size) if r != cases_faults.faulty(phase)]
    for r in survivors:
        got = results[cell, r]
        assert got["elapsed"] < TIMEOUT_S + 5, got
        kind = "TimeoutError" if phase == "stall" else "RuntimeError"
        assert got["type"] == kind, got
        assert got["message"].startswith(f"deepep::{OPS[mode]}: expected "), got
        assert re.search(r"got no answer from " + _expected_name(phase, size), got["message"]), got
        if phase == "stall":
            assert got["elapsed"] >= TIMEOUT_S - 0.1, got
        # The next use says that the group failed, at once, quoting the first error.
        assert got["next_type"] == "RuntimeError", got
        assert "whose exchange failed earlier" in got["next_message"], got
        assert got["message"] in got["next_message"], got


def test_nothing_left_in_dev_shm(matrix):
    """Two ranks were SIGKILLed with segments named under /dev/shm; the survivors removed them."""
    _, pids, named_at_death = matrix
    assert all(named_at_death), named_at_death  # else this test would prove nothing
    assert _leftovers(pids) == []


def test_a_new_run_starts_cleanly(matrix, pools):
    assert pools(2).run(cases_faults.fresh_run) == ["ok", "ok"]
