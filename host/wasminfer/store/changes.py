"""`ChangeMark`: a number every write of functions or models changes, shared by the processes of a
data folder through a small memory-mapped file (`<data_dir>/store.changes`).

Host replica processes that take their own connections serve functions deployed through another
process: before an invocation they compare the mark with the one they last synced at, and read the
store again only when it moved. A read is a load from shared memory (no system call, no SQLite), so
the check costs an invocation next to nothing; a write stores a fresh random value after its
transaction committed, so whoever sees the new value also sees the commit.

Random rather than a counter: two processes writing at once would each add one to the same old
value, and the second change would be missed by a reader that synced between the two. Only
equality is compared, so a torn read (a value half old, half new) costs one needless reread.
"""

from __future__ import annotations

import mmap
import random
import struct
from pathlib import Path

from wasminfer._fs import map_shared

_SIZE = 8
_FORMAT = "<Q"


class ChangeMark:
    """The shared mark of one data folder. `close()` is idempotent."""

    def __init__(self, path: Path) -> None:
        """Opens (creating if needed, mode 0600) the file at `path`. Raises `OSError`."""
        self._map: mmap.mmap | None = map_shared(path, _SIZE)
        self._random = random.Random()  # seeded from os.urandom: processes never draw the same values

    def value(self) -> int:
        """The mark now (0 before the first write in this data folder, or once closed)."""
        m = self._map
        if m is None:
            return 0
        value: int = struct.unpack_from(_FORMAT, m)[0]
        return value

    def bump(self) -> None:
        """Records a change (call it after the change committed)."""
        m = self._map
        if m is not None:
            struct.pack_into(_FORMAT, m, 0, self._random.getrandbits(64) or 1)

    def close(self) -> None:
        m, self._map = self._map, None
        if m is not None:
            m.close()
