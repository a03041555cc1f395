"""`StoreFollower`: how a replica process that takes its own connections runs what was deployed
through another process — before an invocation, it makes its copy of the function the store's
current one if the store's change mark (`store.changes`) moved since it last looked.

The writer moves the mark after its commit and before it answers, so an invocation that starts
after a deploy was answered (on any connection, to any process) runs what was deployed. When the
mark has not moved the check is one load from shared memory and a dict lookup.
"""

from __future__ import annotations

import asyncio
import contextlib

import anyio.to_thread

from wasminfer.errors import FunctionNotFound
from wasminfer.service import Platform

Key = tuple[str, str]  # (tenant, function)

# Functions whose mark the follower remembers (names that do not exist included: a caller trying
# names must not make it read the store for each); past it, it forgets them all.
MAX_FOLLOWED = 4096


class StoreFollower:
    """Keeps `platform`'s functions as the store has them, lazily, per function. Runs on one event
    loop."""

    def __init__(self, platform: Platform) -> None:
        self.platform = platform
        self.changes = platform.store.changes
        self._followed: dict[Key, int] = {}  # the mark each function was last synced at
        self._refreshing: dict[Key, asyncio.Task[None]] = {}

    def fresh(self, tenant: str, name: str) -> bool:
        """Whether this process' copy of function `name` is the store's current one as far as the
        last change mark says (`follow` would return at once)."""
        return self._followed.get((tenant, name)) == self.changes.value()

    async def follow(self, tenant: str, name: str) -> None:
        """Makes this process' copy of function `name` the store's current one if the mark moved
        since it was last synced (`Platform.refresh`, on a worker thread; concurrent callers share
        one refresh). Raises `FunctionNotFound` and what a deploy raises."""
        key = (tenant, name)
        while True:
            mark = self.changes.value()
            if self._followed.get(key) == mark:
                return
            pending = self._refreshing.get(key)
            if pending is not None:  # started by another caller, maybe at an older mark: look again
                with contextlib.suppress(Exception):
                    await asyncio.shield(pending)
                continue
            task = asyncio.create_task(self._refresh(key, mark))
            task.add_done_callback(lambda t: t.cancelled() or t.exception())  # retrieved: no warning
            self._refreshing[key] = task
            await asyncio.shield(task)
            return

    async def _refresh(self, key: Key, mark: int) -> None:
        tenant, name = key
        try:
            await anyio.to_thread.run_sync(lambda: self.platform.refresh(name, tenant=tenant))
        except FunctionNotFound:
            self._remember(key, mark)
            raise
        else:
            self._remember(key, mark)
        finally:
            self._refreshing.pop(key, None)

    def _remember(self, key: Key, mark: int) -> None:
        if len(self._followed) >= MAX_FOLLOWED:
            self._followed.clear()
        self._followed[key] = mark
