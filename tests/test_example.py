"""The training example (deep_ep_ops/examples/train_moe.py) under torchrun: 4 ranks on this host as two
simulated nodes of 2, so dispatch crosses "nodes" over the hierarchical transport; the compiled block
trains (loss falls) and the replicated parameters stay equal on every rank."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.distributed

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_STEP = re.compile(r"^step (\d+) loss ([0-9.]+) .*\btransport (\S+) intra_node_bytes (\d+) inter_node_bytes (\d+)$")
_DONE = re.compile(r"^done: first loss ([0-9.]+) last loss ([0-9.]+) transport (\S+) .*\breplicated_drift (\S+)$")


def test_train_moe_on_two_simulated_nodes():
    env = {**os.environ, "DEEP_EP_OPS_RANKS_PER_NODE": "2", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [_ROOT, os.environ.get("PYTHONPATH")]))}
    env.pop("DEEP_USE_MODE", None)  # the automatic choice must pick hierarchical across the two nodes
    # --standalone: torchrun picks a free rendezvous port itself, so concurrent runs cannot collide.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4",
           "-m", "deep_ep_ops.examples.train_moe", "--steps", "5"]
    out = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300, cwd=_ROOT, env=env)
    assert out.returncode == 0, f"{out.stdout}\n{out.stderr[-4000:]}"
    lines = out.stdout.splitlines()
    steps = [m.groups() for m in map(_STEP.match, lines) if m]
    assert [int(s[0]) for s in steps] == list(range(5)), out.stdout
    losses = [float(s[1]) for s in steps]
    assert losses[-1] < 0.8 * losses[0], losses
    assert {s[2] for s in steps} == {"hierarchical"}, out.stdout
    assert all(int(s[3]) > 0 and int(s[4]) > 0 for s in steps), "bytes move inside and across the nodes"
    done = [m.groups() for m in map(_DONE.match, lines) if m]
    assert len(done) == 1, out.stdout
    first, last, transport, drift = done[0]
    assert (float(first), float(last), transport) == (losses[0], losses[-1], "hierarchical")
    assert float(drift) == 0.0, "replicated parameters diverged across ranks"
