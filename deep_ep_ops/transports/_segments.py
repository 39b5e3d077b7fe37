"""POSIX shared-memory segments for the ``shm`` backend: create, map, unlink, and clean up after crashes.

Each rank creates its own receive segments (``O_CREAT | O_EXCL``, mode 0600) and maps its peers'. Names
carry the creating process id, so that a segment whose creator is gone can be recognized and removed:

    /dev/shm/deepep-<pid>-<run>-r<rank>-<kind><generation>

The name is unlinked as soon as every peer has mapped the segment: the memory lives on in the mappings,
and a process killed afterwards (even by SIGKILL) leaves nothing under ``/dev/shm``. A crash before that
point, or one while output blocks are named (``shm.py``), leaves names behind, which :func:`remove_stale`
deletes once their creator has exited: run by every new Buffer (all runs), and for its own run by a survivor
that finds a peer dead and by every backend that closes, so that the survivors of a run clean up after it.
"""

from __future__ import annotations

import errno
import mmap
import os
import re
import time

import torch

SHM_DIR = "/dev/shm"
_PREFIX = "deepep-"
_NAME = re.compile(r"^deepep-(\d+)-([0-9a-f]+)-r\d+-[a-z]\d+$")


def name(pid: int, run: int, rank: int, kind: str, generation: int = 0) -> str:
    return f"{_PREFIX}{pid}-{run:x}-r{rank}-{kind}{generation}"


def _alive(pid: int) -> bool:
    """Whether process ``pid`` runs. A zombie (exited, not yet reaped by its parent) counts as gone: its
    memory and sockets are already released, and a launcher may take a while to reap it."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state not in ("Z", "X")


def remove_stale(run: int | None = None) -> list[str]:
    """Unlinks segments whose creator process has exited (all runs, or only ``run``); returns their names."""
    removed = []
    try:
        entries = os.listdir(SHM_DIR)
    except OSError:
        return removed
    for entry in entries:
        match = _NAME.match(entry)
        if match is None or (run is not None and int(match.group(2), 16) != run):
            continue
        if not _alive(int(match.group(1))):
            try:
                os.unlink(os.path.join(SHM_DIR, entry))
                removed.append(entry)
            except OSError:
                pass
    return removed


def unlink(segment_name: str) -> None:
    """Removes a name (the memory stays mapped where it is mapped); a missing name is fine."""
    try:
        os.unlink(os.path.join(SHM_DIR, segment_name))
    except FileNotFoundError:
        pass


class Segment:
    """One mapped segment: ``tensor`` is a uint8 view of all of it."""

    def __init__(self, segment_name: str, size: int, create: bool, timeout_s: float = 0.0, what: str = "",
                 check=None):
        """Creates (``create``) or maps an existing segment, waiting at most ``timeout_s`` for it to appear;
        ``check()``, called while waiting, raises when the creator is known to be gone."""
        path = os.path.join(SHM_DIR, segment_name)
        self.name, self.size = segment_name, size
        if create:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.ftruncate(fd, size)
            except OSError:
                os.close(fd)
                unlink(segment_name)
                raise
        else:
            deadline = time.monotonic() + timeout_s
            while True:
                try:
                    fd = os.open(path, os.O_RDWR)
                    break
                except OSError as exc:
                    if exc.errno != errno.ENOENT or time.monotonic() >= deadline:
                        raise TimeoutError(f"deepep: expected the shared-memory segment {segment_name!r} of {what} "
                                           f"within {timeout_s:g} s, got none") from exc
                    if check is not None:
                        check()
                    time.sleep(0.001)
            # The creator sizes the segment right after creating it; wait for that too.
            while os.fstat(fd).st_size < size and time.monotonic() < deadline:
                time.sleep(0.001)
        try:
            self.mapping = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        self.tensor = torch.frombuffer(self.mapping, dtype=torch.uint8)

    def close(self) -> None:
        """Unmaps the segment (views of it must be gone)."""
        self.tensor = None
        try:
            self.mapping.close()
        except (BufferError, ValueError):  # a view is still alive somewhere; the mapping dies with it
            pass
