"""`ConnectionShares`: how many client connections each process on one port holds, shared by those
processes through a small memory-mapped file in the reuseport backend's 0700 folder, so that a
process holding more than its share closes the surplus and the clients reconnect.

The kernel spreads connections over `SO_REUSEPORT` sockets by a hash of their ports, and a
kept-alive connection stays with the process that accepted it: a load generator that opens 16
connections once got 10 on one process and 6 on the other (`bench/hotpath.py`), and the process
with 6 sat idle part of the time while the other queued. Each process publishes its count here at
every tick of its server (uvicorn's, 0.1 s) and reads everyone's; one holding more than
`ceil(total / processes)` answers that many of its next requests with `Connection: close`. A client
that reconnects lands by the hash again, on the process with fewer connections half the time with
two processes, so the counts even out within a few ticks; a balanced spread closes nothing.

A slot holds its process' count plus one (0: no process there), written whole by one process and
only read by the others: a stale read costs one needless close or one tick of waiting, never more.
"""

from __future__ import annotations

import mmap
import os
import struct
from pathlib import Path

from wasminfer._fs import map_shared

SLOTS = 64  # processes on one port at most: the primary and `max_replicas - 1` replicas
_FORMAT = f"<{SLOTS}I"
_SIZE = struct.calcsize(_FORMAT)


class ConnectionShares:
    """One process' view of the shared counts: it writes slot `slot` and reads every slot.
    `close()` empties its slot and is idempotent."""

    def __init__(self, path: Path, slot: int) -> None:
        """Opens (creating if needed, mode 0600) the file at `path`. Raises `ValueError` for a slot
        outside 0..SLOTS-1, `OSError` if the file cannot be opened."""
        if not 0 <= slot < SLOTS:
            raise ValueError(f"connection share slot {slot}: give 0..{SLOTS - 1}")
        self.slot = slot
        self._map: mmap.mmap | None = map_shared(path, _SIZE)

    def publish(self, connections: int) -> int:
        """Records that this process holds `connections` client connections and returns how many of
        them it should close: those past `ceil(total / processes)` (0 once closed)."""
        m = self._map
        if m is None:
            return 0
        struct.pack_into("<I", m, 4 * self.slot, connections + 1)
        held: list[int] = [c - 1 for c in struct.unpack_from(_FORMAT, m) if c]
        share = -(-sum(held) // len(held))
        return max(0, connections - share)

    def counts(self) -> dict[int, int]:
        """Every occupied slot's count, by slot."""
        m = self._map
        if m is None:
            return {}
        return {i: c - 1 for i, c in enumerate(struct.unpack_from(_FORMAT, m)) if c}

    def close(self) -> None:
        m, self._map = self._map, None
        if m is not None:
            struct.pack_into("<I", m, 4 * self.slot, 0)
            m.close()


def vacate(path: Path, slot: int) -> None:
    """Empties `slot` of the file at `path`: for a process that died without closing its shares
    (its count would hold the others' share up). A missing file is left missing."""
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return
    try:
        os.pwrite(fd, struct.pack("<I", 0), 4 * slot)
    finally:
        os.close(fd)
