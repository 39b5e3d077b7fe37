"""Smoke test of tests/_netns.py: torchrun over two simulated hosts (2 nodes x 2 ranks, gloo)."""

from __future__ import annotations

import os
import subprocess
import uuid
import warnings

import pytest

from benchmarks import _netns

pytestmark = pytest.mark.distributed

_TESTS = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_TESTS)


def _names_in(cmd: list[str]) -> str:
    return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout


def test_torchrun_two_hosts():
    reason = _netns.available()
    if reason is not None:
        pytest.skip(reason)
    token = f"d2hprobe{uuid.uuid4().hex[:12]}"
    shm_before = set(os.listdir("/dev/shm"))
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [_ROOT, os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": "1"}  # 4 ranks on a 2-core machine
    probe = os.path.join(_TESTS, "_two_hosts_probe.py")
    with _netns.two_hosts(rate="1gbit") as topo:
        names = [h.name for h in topo.hosts]
        before = topo.counters()
        argvs = [_netns.torchrun_argv([probe, token], node_rank=i, master_addr=topo.hosts[0].address)
                 for i in range(2)]
        results = _netns.run_on_hosts(topo, argvs, env=env, timeout_s=120, cwd=_ROOT)
        after = topo.counters()

    for i, r in enumerate(results):
        assert r.returncode == 0, f"host {i} rc={r.returncode}\n{r.stdout}\n{r.stderr[-4000:]}"
    lines = [p for r in results for p in _netns.records(r.stdout, "PROBE ")]
    by_rank = {p["rank"]: p for p in lines}
    assert sorted(by_rank) == [0, 1, 2, 3], results
    for rank, p in by_rank.items():
        assert p["world"] == 4
        assert p["sum_min"] == p["sum_max"] == 1 + 2 + 3 + 4
        assert p["node_rank"] == rank // 2, "ranks 0,1 on host 0 and 2,3 on host 1"
        # Each host's /dev/shm holds exactly its own two ranks' markers.
        assert p["markers"] == [f"{token}-rank{r}" for r in (rank // 2 * 2, rank // 2 * 2 + 1)]
    seen = by_rank[0]["all"]
    assert all(p["all"] == seen for p in lines), "all_gather_object agrees on every rank"
    hostnames, devs = [s[0] for s in seen], [s[1] for s in seen]
    assert len(set(hostnames)) == 2 and hostnames[0] == hostnames[1] and hostnames[2] == hostnames[3]
    assert hostnames == [topo.hosts[0].hostname] * 2 + [topo.hosts[1].hostname] * 2
    assert len(set(devs)) == 2 and devs[0] == devs[1] and devs[2] == devs[3]
    assert os.stat("/dev/shm").st_dev not in devs

    # The 1 MiB all-reduce crossed the veth in both directions.
    for b, a in zip(before, after):
        assert a.tx_bytes - b.tx_bytes > 500_000 and a.rx_bytes - b.rx_bytes > 500_000, (before, after)

    # Nothing of the run is left: namespaces, veth ends, or files in the real /dev/shm.
    assert not set(names) & set(_names_in(["ip", "netns", "list"]).split())
    links = _names_in(["ip", "-o", "link"])
    assert not any(n in links for n in names), links
    # Other processes on the machine (a concurrent test run) may add files to the real /dev/shm, so
    # only files attributable to this run fail the test: its token, or anything its hosts had in theirs.
    new_shm = set(os.listdir("/dev/shm")) - shm_before
    ours = {f for p in lines for f in p["shm_files"]}
    leaked = {f for f in new_shm if token in f or f in ours}
    assert not leaked, f"files of the run leaked into the real /dev/shm: {sorted(leaked)}"
    if new_shm:
        warnings.warn(f"new files in the real /dev/shm, not from this run: {sorted(new_shm)}",
                      stacklevel=1)


def test_ops_across_two_hosts():
    """The ops on a real network between two simulated hosts (2 x 2 ranks, 1 Gbit/s): host detection picks
    the hierarchical transport, and every normal-mode case (both transports), low-latency, fused and a compiled
    layer's backward equal the reference. Checks run inside the ranks (tests/_two_hosts_ops.py)."""
    reason = _netns.available()
    if reason is not None:
        pytest.skip(reason)
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [_ROOT, os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": "1", "DEEP_USE_MODE": "", "DEEP_EP_OPS_RANKS_PER_NODE": ""}
    worker = os.path.join(_TESTS, "_two_hosts_ops.py")
    with _netns.two_hosts(rate="1gbit") as topo:
        argvs = [_netns.torchrun_argv([worker], node_rank=i, master_addr=topo.hosts[0].address) for i in range(2)]
        results = _netns.run_on_hosts(topo, argvs, env=env, timeout_s=240, cwd=_ROOT)
    for i, r in enumerate(results):
        assert r.returncode == 0, f"host {i} rc={r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}"
    lines = _netns.records(results[0].stdout, "TWO_HOSTS ")
    assert len(lines) == 1, results[0].stdout
    assert lines[0]["detected"] == {"transport": "hierarchical", "num_ranks_per_node": 2}
    assert lines[0]["ran"]["hierarchical"] == lines[0]["ran"]["all_to_all"] > 0


def test_example_across_two_hosts():
    """The multi-node recipe as the README gives it: one torchrun per simulated host, 2 ranks each; the
    compiled DeepSeek-style block trains over the hierarchical transport, with bytes crossing the link."""
    import test_example

    reason = _netns.available()
    if reason is not None:
        pytest.skip(reason)
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [_ROOT, os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": "1", "DEEP_USE_MODE": "", "DEEP_EP_OPS_RANKS_PER_NODE": ""}
    args = ["-m", "deep_ep_ops.examples.train_moe", "--steps", "4"]
    with _netns.two_hosts(rate="1gbit") as topo:
        before = topo.counters()
        argvs = [_netns.torchrun_argv(args, node_rank=i, master_addr=topo.hosts[0].address) for i in range(2)]
        results = _netns.run_on_hosts(topo, argvs, env=env, timeout_s=300, cwd=_ROOT)
        after = topo.counters()
    for i, r in enumerate(results):
        assert r.returncode == 0, f"host {i} rc={r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}"
    lines = results[0].stdout.splitlines()
    steps = [m.groups() for m in map(test_example._STEP.match, lines) if m]
    assert [int(s[0]) for s in steps] == list(range(4)), results[0].stdout
    assert {s[2] for s in steps} == {"hierarchical"}
    assert all(int(s[4]) > 0 for s in steps), "bytes cross the nodes every step"
    done = [m.groups() for m in map(test_example._DONE.match, lines) if m]
    assert len(done) == 1 and float(done[0][1]) < float(done[0][0]) and float(done[0][3]) == 0.0, done
    # The op counters' cross-node bytes did cross the veth (which adds TCP/IP and gloo's own traffic).
    crossed = sum(a.tx_bytes - b.tx_bytes for b, a in zip(before, after))
    assert crossed >= sum(int(s[4]) for s in steps), (crossed, steps)
