"""Two simulated hosts on one Linux machine, for multi-node tests of torch.distributed programs.

Each host is a network namespace joined to the other by a rate-limited veth pair; processes started
with :func:`run_on_hosts` also get their own hostname (UTS namespace) and a private tmpfs on
``/dev/shm`` (mount namespace), so code that detects "same host" by hostname or by shared memory sees
two hosts. Everything needs root and iproute2 (``ip``, ``tc``) plus util-linux (``unshare``);
:func:`available` says whether this machine can do it, and tests skip with its reason.

Example::

    with two_hosts(rate="1gbit") as topo:
        results = run_on_hosts(topo, [torchrun_argv([script], node_rank=r,
                                                    master_addr=topo.hosts[0].address)
                                      for r in range(2)])
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple

_COUNTER = itertools.count()
DEFAULT_PREFIX = "d2h"
# Fresh namespaces have no listeners, so a fixed port can never be taken (unlike on the real host).
DEFAULT_MASTER_PORT = 29500
# Runs in each host process: set the hostname and mount a private /dev/shm, then become the program.
# `--propagation private` keeps the tmpfs from leaking into the real mount table; it vanishes when the
# last process of the mount namespace exits. mode=1777 matches a real /dev/shm.
_HOST_SH = 'hostname "$1" && mount -t tmpfs -o size=2g,mode=1777 tmpfs /dev/shm && shift && exec "$@"'


@dataclass(frozen=True)
class Host:
    """One simulated host: ``name`` (its netns), ``address`` and ``ifname`` (its veth end), ``hostname``."""

    name: str
    address: str
    ifname: str
    hostname: str


class LinkCounters(NamedTuple):
    """Byte counters of one veth end, as seen from inside its namespace."""

    tx_bytes: int
    rx_bytes: int


class HostResult(NamedTuple):
    """Outcome of one host's process: exit status (negative: killed by that signal) and its output."""

    returncode: int
    stdout: str
    stderr: str


class HostsTimeoutError(TimeoutError):
    """:func:`run_on_hosts` ran past its timeout; the message holds the tail of every host's output."""


@dataclass(frozen=True)
class Topology:
    """What :func:`two_hosts` yields: the two ``hosts`` and the link ``rate`` (``None``: unlimited)."""

    hosts: tuple[Host, Host]
    rate: str | None

    def counters(self) -> list[LinkCounters]:
        """Returns the current veth byte counters of each host, in ``hosts`` order."""
        out = []
        for h in self.hosts:
            info = json.loads(_ip("-n", h.name, "-s", "-j", "link", "show", "dev", h.ifname))[0]
            stats = info["stats64"]
            out.append(LinkCounters(stats["tx"]["bytes"], stats["rx"]["bytes"]))
        return out


def _ip(*args: str, tool: str = "ip", check: bool = True) -> str:
    r = subprocess.run([tool, *args], capture_output=True, text=True, timeout=30, check=False)
    if check and r.returncode != 0:
        raise RuntimeError(f"{tool} {' '.join(args)} failed ({r.returncode}): {r.stderr.strip()}")
    return r.stdout


def _kill_netns_pids(ns: str) -> None:
    # Processes keep a namespace (and its veth) alive after `ip netns del`, and torchrun workers run in
    # their own sessions, so a process-group kill can miss them: kill by namespace membership instead.
    for _ in range(50):
        pids = [int(p) for p in _ip("netns", "pids", ns, check=False).split()]
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)


@contextlib.contextmanager
def _no_interrupt() -> Iterator[None]:
    # A second Ctrl-C must not cut teardown short and leak namespaces: defer SIGINT until done.
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _teardown(names: Sequence[str]) -> None:
    with _no_interrupt():
        for ns in names:
            with contextlib.suppress(Exception):
                _kill_netns_pids(ns)
            # Deleting one end deletes the pair synchronously; namespace teardown alone is asynchronous.
            with contextlib.suppress(Exception):
                _ip("-n", ns, "link", "del", ns, check=False)
            # A veth created but not yet moved into its namespace still sits in the root namespace.
            with contextlib.suppress(Exception):
                _ip("link", "del", ns, check=False)
            with contextlib.suppress(Exception):
                _ip("netns", "del", ns, check=False)


def remove_stale(prefix: str = DEFAULT_PREFIX) -> None:
    """Removes namespaces left by runs (with this prefix) whose process no longer exists (e.g. SIGKILLed)."""
    pattern = re.compile(rf"^{re.escape(prefix)}(\d+)x\d+[ab]$")
    names = [line.split()[0] for line in _ip("netns", "list", check=False).splitlines() if line.strip()]
    stale = [n for n in names
             if (m := pattern.match(n)) and not os.path.exists(f"/proc/{m.group(1)}")]
    _teardown(stale)


@contextlib.contextmanager
def two_hosts(rate: str | None = "1gbit", prefix: str | None = None) -> Iterator[Topology]:
    """Creates two network namespaces joined by a veth pair, and removes them on exit.

    Args:
        rate: ``tc`` rate of a token-bucket limit on both veth ends (e.g. ``"1gbit"``); ``None``: none.
        prefix: Start of the namespace and interface names; defaults to ``DEFAULT_PREFIX``. The names
            are ``<prefix><pid>x<counter><a|b>`` and must fit the 15-character interface limit.

    Yields:
        The :class:`Topology`. Both ends use the same name as their namespace, which makes leaks easy
        to spot in ``ip netns list`` / ``ip link``.

    Raises:
        ValueError: The prefix makes the names too long.
        RuntimeError: An ``ip``/``tc`` command failed (e.g. not root).
    """
    prefix = DEFAULT_PREFIX if prefix is None else prefix
    remove_stale(prefix)  # a SIGKILLed earlier run could not clean up after itself
    pid, n = os.getpid(), next(_COUNTER)
    names = [f"{prefix}{pid}x{n}{side}" for side in "ab"]
    if len(names[0]) > 15:
        raise ValueError(f"name {names[0]!r} exceeds the 15-character interface name limit")
    # Namespaces isolate addresses anyway; deriving them from the pid only makes runs tellable apart.
    net = f"10.{(pid >> 8) & 255}.{pid & 255}"
    hosts = tuple(Host(ns, f"{net}.{i + 1}", ns, f"{prefix}-host{i}-{pid}x{n}")
                  for i, ns in enumerate(names))
    try:
        # Names are recorded before any creation, so a failure at any step still tears down the rest.
        for ns in names:
            _ip("netns", "add", ns)
        _ip("link", "add", names[0], "type", "veth", "peer", "name", names[1])
        for h in hosts:
            _ip("link", "set", h.ifname, "netns", h.name)
            _ip("-n", h.name, "addr", "add", f"{h.address}/30", "dev", h.ifname)
            _ip("-n", h.name, "link", "set", "lo", "up")
            _ip("-n", h.name, "link", "set", h.ifname, "up")
            if rate is not None:
                # burst must cover one timer tick at the rate (1gbit: ~125 kB at HZ=1000); 256 kB does.
                _ip("-n", h.name, "qdisc", "add", "dev", h.ifname, "root", "tbf", "rate", rate,
                    "burst", "256kb", "latency", "50ms", tool="tc")
        yield Topology(hosts, rate)
    finally:
        _teardown(names)


@functools.cache
def available() -> str | None:
    """Returns ``None`` if :func:`two_hosts` and :func:`run_on_hosts` work here, else the reason why not."""
    if not sys.platform.startswith("linux"):
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "simulating two hosts needs root (network, UTS and mount namespaces, tc)"
    missing = [t for t in ("ip", "tc", "unshare", "hostname", "mount") if shutil.which(t) is None]
    if missing:
        return f"missing tools: {', '.join(missing)} (apt-get install iproute2 util-linux hostname)"
    try:
        with two_hosts(prefix="d2hp") as topo:
            res = run_on_hosts(topo, [["true"], ["true"]], timeout_s=30)
            if any(r.returncode != 0 for r in res):
                return f"cannot start a process in a simulated host: {res[0].stderr.strip()[-500:]}"
    except Exception as e:  # noqa: BLE001 - any failure here is a reason to skip, reported verbatim
        return f"cannot create network namespaces here: {e}"
    return None


def _tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.splitlines()[-lines:])


def run_on_hosts(topology: Topology, argv_per_host: Sequence[Sequence[str]],
                 env: dict[str, str] | None = None, timeout_s: float = 180, *,
                 set_socket_ifname: bool = True, fail_fast_s: float | None = 30,
                 cwd: str | None = None) -> list[HostResult]:
    """Runs one process per simulated host, each with its own netns, hostname and ``/dev/shm``.

    Args:
        topology: From :func:`two_hosts`.
        argv_per_host: One argv per host, in ``topology.hosts`` order.
        env: Variables added to (overriding) ``os.environ`` for every host.
        timeout_s: Wall-clock limit for all hosts together.
        set_socket_ifname: Sets ``GLOO_SOCKET_IFNAME`` to the host's veth unless ``env`` sets it: the
            simulated hostname resolves nowhere, so gloo would fall back to 127.0.0.1 and never reach
            the other host.
        fail_fast_s: Once a host exits non-zero, the others get this long before they are killed
            (a torchrun whose peer died waits for it up to its own, long, timeout). ``None``: wait.
        cwd: Working directory of the processes.

    Returns:
        One :class:`HostResult` per host, in ``topology.hosts`` order.

    Raises:
        HostsTimeoutError: ``timeout_s`` passed; every process was killed first.
    """
    if len(argv_per_host) != len(topology.hosts):
        raise ValueError(f"{len(argv_per_host)} argvs for {len(topology.hosts)} hosts")
    with tempfile.TemporaryDirectory(prefix="d2h_out_") as tmp, contextlib.ExitStack() as stack:
        procs, files = [], []
        try:
            for i, (host, argv) in enumerate(zip(topology.hosts, argv_per_host)):
                host_env = {**os.environ, **(env or {})}
                if set_socket_ifname:
                    host_env.setdefault("GLOO_SOCKET_IFNAME", host.ifname)
                # Files, not pipes: a full pipe would block a chatty process while we wait for it.
                out, err = (stack.enter_context(open(os.path.join(tmp, f"{i}.{k}"), "w+b"))
                            for k in ("out", "err"))
                files.append((out, err))
                procs.append(subprocess.Popen(
                    ["ip", "netns", "exec", host.name, "unshare", "--uts", "--mount", "--propagation",
                     "private", "sh", "-c", _HOST_SH, "sh", host.hostname, *argv],
                    stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=host_env, cwd=cwd,
                    start_new_session=True))  # its own group: killable without touching pytest
            deadline, failed_at = time.monotonic() + timeout_s, None
            while any(p.poll() is None for p in procs):
                now = time.monotonic()
                if failed_at is None and any(p.returncode not in (None, 0) for p in procs):
                    failed_at = now
                if now > deadline or (fail_fast_s is not None and failed_at is not None
                                      and now > failed_at + fail_fast_s):
                    break
                time.sleep(0.1)
            timed_out = any(p.poll() is None for p in procs) and time.monotonic() > deadline
        finally:
            _kill_all(topology, procs)
        results = []
        for p, (out, err) in zip(procs, files):
            out.seek(0), err.seek(0)
            results.append(HostResult(p.returncode, out.read().decode(errors="replace"),
                                      err.read().decode(errors="replace")))
    if timed_out:
        tails = "\n".join(f"--- host {i} ({h.hostname}) rc={r.returncode} stdout:\n{_tail(r.stdout)}\n"
                          f"--- host {i} stderr:\n{_tail(r.stderr)}"
                          for i, (h, r) in enumerate(zip(topology.hosts, results)))
        raise HostsTimeoutError(f"processes on the simulated hosts ran past {timeout_s}s:\n{tails}")
    return results


def _kill_all(topology: Topology, procs: Sequence[subprocess.Popen]) -> None:
    with _no_interrupt():
        for p in procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
        for h in topology.hosts:  # children in other sessions (torchrun workers) too
            _kill_netns_pids(h.name)
        for p in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=10)


def torchrun_argv(args: Sequence[str], *, node_rank: int, master_addr: str,
                  master_port: int = DEFAULT_MASTER_PORT, nnodes: int = 2,
                  nproc_per_node: int = 2) -> list[str]:
    """Builds the argv of a ``torchrun`` node with the static rendezvous, using ``sys.executable``.

    The static rendezvous (torchrun's default once ``--node-rank``/``--master-addr`` are given) needs
    no etcd or c10d store of its own: node 0 hosts the TCPStore at ``master_addr:master_port``. Gloo must
    bind the host's veth: :func:`run_on_hosts` sets ``GLOO_SOCKET_IFNAME`` for that by default.

    Args:
        args: The script (or ``-m module``) and its arguments.
        node_rank: This host's index in ``topology.hosts``.
        master_addr: Address of host 0 (``topology.hosts[0].address``).
        master_port: Any port: it is free in the fresh namespace.
        nnodes: Number of hosts.
        nproc_per_node: Ranks per host.

    Returns:
        The argv to pass in ``argv_per_host``.
    """
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nnodes),
            "--nproc-per-node", str(nproc_per_node), "--node-rank", str(node_rank),
            "--master-addr", master_addr, "--master-port", str(master_port), *args]


def records(stdout: str, prefix: str) -> list[dict]:
    """The JSON objects that ranks printed after ``prefix`` in a host's output.

    Ranks of one host share a pipe, and a long line may reach it in several writes, so two ranks' lines
    can interleave: this finds each ``prefix`` anywhere in the text and decodes one object after it,
    rather than trusting line boundaries.

    Args:
        stdout: A host's captured output (``HostResult.stdout``).
        prefix: The marker that precedes each record, e.g. ``"PROBE "``.

    Returns:
        The decoded records in the order they appear.
    """
    decoder, out, start = json.JSONDecoder(), [], stdout.find(prefix)
    while start >= 0:
        obj, end = decoder.raw_decode(stdout, start + len(prefix))
        out.append(obj)
        start = stdout.find(prefix, end)
    return out
