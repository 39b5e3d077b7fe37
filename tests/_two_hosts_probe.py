"""Probe for tests/test_two_hosts.py, run by torchrun on each simulated host.

Run as ``torchrun ... tests/_two_hosts_probe.py [TOKEN]``, or alone as a world of one. Each rank joins a gloo group from torchrun's
environment, all-reduces a tensor big enough to cross the link visibly, marks its ``/dev/shm`` with
``TOKEN``, and prints one line ``PROBE {json}`` with what it saw, for the test to check.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import sys

import torch
import torch.distributed as dist


def _all_gather_int(value: int, world: int) -> list[int]:
    out = [torch.zeros(1, dtype=torch.int64) for _ in range(world)]
    dist.all_gather(out, torch.tensor([value], dtype=torch.int64))
    return [int(t.item()) for t in out]


def _all_gather_str(value: str, world: int) -> list[str]:
    # Fixed-size byte tensors: all_gather_object would need numpy, which the test venv may lack.
    raw = value.encode()[:64].ljust(64, b"\0")
    out = [torch.zeros(64, dtype=torch.uint8) for _ in range(world)]
    dist.all_gather(out, torch.tensor(list(raw), dtype=torch.uint8))
    return [bytes(t.tolist()).rstrip(b"\0").decode() for t in out]


def main() -> None:
    token = sys.argv[1] if len(sys.argv) > 1 else "d2hprobe"
    standalone = "TORCHELASTIC_RUN_ID" not in os.environ
    # Without torchrun (``python tests/_two_hosts_probe.py``): a world of one on localhost.
    for key, value in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29511"), ("RANK", "0"),
                       ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("GROUP_RANK", "0")):
        os.environ.setdefault(key, value)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    # 1 MiB of float32: enough traffic to stand out from the link's background packets.
    t = torch.full((1 << 18,), float(rank + 1))
    dist.all_reduce(t)
    # Ranks of one host must see each other's marker in /dev/shm, and no other host's.
    with open(f"/dev/shm/{token}-rank{rank}", "w"):
        pass
    dist.barrier()
    shm_files = sorted(os.listdir("/dev/shm"))  # all of them: none may show up in the real /dev/shm
    markers = [f for f in shm_files if f.startswith(token)]
    seen = [[name, dev] for name, dev in zip(_all_gather_str(socket.gethostname(), world),
                                             _all_gather_int(os.stat("/dev/shm").st_dev, world))]
    # One write per record: the host's ranks share a pipe (the test also copes with interleaving).
    line = "PROBE " + json.dumps({
        "rank": rank, "world": world, "local_rank": int(os.environ["LOCAL_RANK"]),
        "node_rank": int(os.environ["GROUP_RANK"]), "sum_min": t.min().item(), "sum_max": t.max().item(),
        "hostname": socket.gethostname(), "shm_dev": os.stat("/dev/shm").st_dev,
        "markers": markers, "shm_files": shm_files, "all": seen}) + "\n"
    sys.stdout.flush()
    os.write(sys.stdout.fileno(), line.encode())
    dist.barrier()  # nobody tears gloo down while a peer may still be talking to it
    dist.destroy_process_group()
    if standalone:  # the real /dev/shm: leave nothing (on a simulated host the tmpfs goes away)
        os.unlink(f"/dev/shm/{token}-rank{rank}")


if __name__ == "__main__":
    main()
