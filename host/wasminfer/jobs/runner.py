"""`JobRunner`: runs the items of queued jobs through `Platform.invoke`, in the capacity that
synchronous traffic leaves, fairly between tenants and jobs.

Threads: `workers` worker threads, each running one item at a time, and one control thread that
does all the runner's writes to the store (claiming chunks, committing their results, sweeping
expired jobs) so that a worker never waits on an fsync. Items of the same model, run by several
workers at once, reach `ModelRegistry.infer` together: a model with dynamic batching stacks them
into one run, with no other coordination than `Host.invoke`.

Per item a worker (1) takes a slot from the `SyncGate` (none while synchronous invocations need
the host), (2) picks the next item from the `FairQueue`, skipping functions with no free instance
(an async item never queues for an instance in front of a synchronous request) and tenants that
hold their share of the workers (`wasminfer.shares.tenant_cap`: a tenant alone leaves one worker in
eight, at least one, free; with others backlogged each gets its share, so one tenant's items that
sleep until their deadline never hold every worker), (3) invokes it.
A function with every instance busy, or being replaced, is a retry after a short backoff, not a
failure; every other error is the item's result.

One runner per data folder: the control thread takes an exclusive `flock` on
`<data_dir>/jobs/runner.lock` first (another process serving the same folder, a replica, accepts
jobs but leaves running them to the lock holder, and takes over when it dies). The lock holder
starts by putting every chunk left running back to queued (`JobStore.recover`): at-least-once.

Over 500 lines and one concept: the runner, whose workers and control thread share its queue, gate
and progress (the queue and gate themselves are `scheduler.py`).
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

from wasminfer.errors import FunctionNotFound, TooManyRequests, Unavailable, WasminferError
from wasminfer.shares import default_reserve, tenant_cap

from .items import Result
from .records import Job, JobSettings
from .scheduler import FairQueue, Lane, SyncGate
from .store import ClaimedChunk, JobStore

if TYPE_CHECKING:
    from wasminfer.service import Platform

try:
    import fcntl
except ImportError:  # not POSIX: one process per data folder is assumed
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger("wasminfer.jobs")

MAX_UNAVAILABLE_RETRIES = 50
BUSY_BACKOFF_S = 0.002
BLOCKED_POLL_S = 0.002  # how often a worker looks again when every function with work is full
BACKOFF_S = 0.5  # the control thread's pause after a failed store operation


class _Chunk:
    __slots__ = ("job", "seq", "first", "results", "remaining", "started", "failed")

    def __init__(self, job: _ActiveJob, claimed: ClaimedChunk) -> None:
        self.job = job
        self.seq = claimed.seq
        self.first = claimed.first_item
        self.results: list[Result | None] = [None] * len(claimed.items)
        self.remaining = len(claimed.items)
        self.started = 0
        self.failed = 0


class _Item:
    __slots__ = ("chunk", "pos", "body", "content_type", "attempts")

    def __init__(self, chunk: _Chunk, pos: int, body: bytes, content_type: str) -> None:
        self.chunk = chunk
        self.pos = pos
        self.body = body
        self.content_type = content_type
        self.attempts = 0


class _ActiveJob:
    __slots__ = ("job", "lane", "chunks", "more", "refill", "withdrawn")

    def __init__(self, job: Job) -> None:
        self.job = job
        self.lane: Lane[_Item] = Lane(job.id, job.tenant)
        self.chunks: dict[int, _Chunk] = {}  # claimed and not committed yet
        self.more = True  # the store may hold queued chunks of it
        self.refill = True  # the control thread should claim its next chunk
        self.withdrawn = False


class JobRunner:
    """Start with `start()`; `close()` drains (started chunks finish, for up to `drain_s`)."""

    def __init__(
        self,
        platform: Platform,
        store: JobStore,
        settings: JobSettings,
        gate: SyncGate,
        on_finished: Callable[[Job], None] = lambda job: None,
    ) -> None:
        self._platform = platform
        self._store = store
        self._settings = settings
        self._gate = gate
        self._on_finished = on_finished
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)  # workers wait here
        self._events = threading.Condition(self._lock)  # the control thread waits here
        self._queue: FairQueue[_Item] = FairQueue()
        self._active: dict[str, _ActiveJob] = {}
        # Jobs withdrawn here (being cancelled), by when: discovery must not take them up again in
        # the moment before their cancellation commits.
        self._withdrawn: dict[str, float] = {}
        self._completed: deque[_Chunk] = deque()
        self._discover = True
        self._backoff = False  # a store operation failed: pause before the next turn
        self._state = "new"  # new → running → draining → closed
        self._in_flight = 0
        self._tenant_in_flight: collections.Counter[str] = collections.Counter()
        self._threads: list[threading.Thread] = []
        self._lock_fd: int | None = None
        self.leader = threading.Event()  # set once this runner holds the data folder's lock
        self.items_total = 0
        self.items_failed = 0
        self.retries = 0

    # --- lifecycle --------------------------------------------------------------------------------
    def start(self) -> None:
        """Starts the threads (none with `workers=0`: jobs are accepted and wait). Idempotent."""
        with self._lock:
            if self._state != "new":
                return
            self._state = "running"
        if self._settings.workers == 0:
            return
        self._threads.append(threading.Thread(target=self._control, name="wasminfer-jobs", daemon=True))
        self._threads += [
            threading.Thread(target=self._worker, name=f"wasminfer-job-worker-{n}", daemon=True)
            for n in range(self._settings.workers)
        ]
        for thread in self._threads:
            thread.start()

    def close(self) -> None:
        """Stops taking new chunks, lets started ones finish for up to `drain_s`, commits what
        finished and gives back the chunks it had claimed but not started. Idempotent."""
        with self._lock:
            if self._state in ("draining", "closed"):
                return
            self._state = "draining"
            self._work.notify_all()
            self._events.notify_all()
        deadline = time.monotonic() + self._settings.drain_s
        workers = self._threads[1:]
        for thread in workers:
            thread.join(max(0.0, deadline - time.monotonic()))
        with self._lock:
            self._state = "closed"
            self._work.notify_all()
            self._events.notify_all()
        self._gate.close()
        for thread in self._threads:
            thread.join(max(1.0, deadline - time.monotonic()))

    def notify(self) -> None:
        """A job was submitted: look for it now rather than at the next poll."""
        with self._lock:
            self._discover = True
            self._events.notify()

    def withdraw(self, job_id: str, keep_started: bool = False) -> set[int] | None:
        """Drops the job's unstarted items and returns the chunks it had claimed and started none
        of (the caller cancels them in the store); chunks already started run to their end. With
        `keep_started`, changes nothing and returns None if any item of the job has started."""
        with self._lock:
            active = self._active.get(job_id)
            if active is not None and keep_started and any(c.started for c in active.chunks.values()):
                return None
            self._withdrawn[job_id] = time.monotonic()
            if active is None:
                return set()
            seqs = {seq for seq, chunk in active.chunks.items() if chunk.started == 0}
            active.lane.items = deque(i for i in active.lane.items if i.chunk.seq not in seqs)
            for seq in seqs:
                del active.chunks[seq]
            active.more = False
            active.withdrawn = True
            if not active.chunks:
                self._forget(active)
            return seqs

    def progress(self, job_id: str) -> tuple[int, int]:
        """`(done, failed)`: items of the job finished in this process and not committed yet."""
        with self._lock:
            active = self._active.get(job_id)
            if active is None:
                return 0, 0
            chunks = list(active.chunks.values())
            return sum(len(c.results) - c.remaining for c in chunks), sum(c.failed for c in chunks)

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {
                "leader": int(self.leader.is_set()),
                "active_jobs": len(self._active),
                "queued_items": self._queue.backlog(),
                "items_in_flight": self._in_flight,
                "items_total": self.items_total,
                "items_failed_total": self.items_failed,
                "retries_total": self.retries,
            }

    # --- workers ----------------------------------------------------------------------------------
    def _worker(self) -> None:
        cap = self._settings.workers
        while True:
            if not self._gate.acquire(cap):
                return
            with self._lock:
                picked = self._next_item()
                if picked is None:
                    self._gate.release()
                    if self._state == "closed" or (self._state == "draining" and not self._drain_left()):
                        return
                    self._work.wait(BLOCKED_POLL_S if self._queue.backlog() else None)
                    continue
                lane, item, estimate = picked
                item.chunk.started += 1
                self._in_flight += 1
                self._tenant_in_flight[lane.tenant] += 1
                active = item.chunk.job
                if active.more and not active.refill and self._wants_chunk(active):
                    active.refill = True
                    self._events.notify()
            started = time.perf_counter()
            try:
                result = self._run(active.job, item)
            finally:
                self._gate.release()
            elapsed = time.perf_counter() - started
            with self._lock:
                self._in_flight -= 1
                self._tenant_in_flight[lane.tenant] -= 1
                if not self._tenant_in_flight[lane.tenant]:
                    del self._tenant_in_flight[lane.tenant]
                self._queue.charge(lane, elapsed, estimate)
                if result is None:  # busy or being replaced: again, after a short wait
                    self.retries += 1
                    lane.not_before = time.monotonic() + min(0.5, BUSY_BACKOFF_S * (1 + item.attempts))
                    if active.job.id in self._active:
                        self._queue.push(lane, [item], front=True)
                else:
                    chunk = item.chunk
                    chunk.results[item.pos] = result
                    chunk.remaining -= 1
                    self.items_total += 1
                    if result[3] is not None:
                        chunk.failed += 1
                        self.items_failed += 1
                    if chunk.remaining == 0:
                        self._completed.append(chunk)
                        self._events.notify()
                self._work.notify()

    def _next_item(self) -> tuple[Lane[_Item], _Item, float] | None:
        if self._state == "running":
            workers = self._settings.workers
            active = len(self._queue.backlogged() | self._tenant_in_flight.keys())
            cap = tenant_cap(workers, active, workers, default_reserve(workers))
            held = self._tenant_in_flight
            return self._queue.pick(lambda lane: held[lane.tenant] < cap and self._runnable(lane))
        if self._state == "draining":  # only items of chunks that started: they must finish
            return self._queue.pick(lambda lane: lane.items[0].chunk.started > 0 and self._runnable(lane))
        return None

    def _drain_left(self) -> bool:
        """Whether items of started chunks wait (they are at the front of their lanes)."""
        return any(a.lane.items and a.lane.items[0].chunk.started > 0 for a in self._active.values())

    def _runnable(self, lane: Lane[_Item]) -> bool:
        """Whether the lane's function has a free instance now (async work never waits in a
        function's queue, where it would stand in front of synchronous requests)."""
        job = lane.items[0].chunk.job.job
        try:
            fn = self._platform.host(job.tenant).function(job.function)
        except (KeyError, FunctionNotFound):
            return True  # the invocation reports it, as an item's error
        stats = fn.pool.stats()
        return stats["waiting"] == 0 and stats["busy"] < stats["max_instances"]

    def _run(self, job: Job, item: _Item) -> Result | None:
        try:
            out = self._platform.invoke(job.function, item.body, item.content_type, tenant=job.tenant)
        except TooManyRequests:
            item.attempts += 1
            return None
        except Unavailable as exc:
            item.attempts += 1
            if item.attempts < MAX_UNAVAILABLE_RETRIES and self._state == "running":
                return None
            return (exc.status, None, None, exc.code, exc.message)
        except WasminferError as exc:
            return (exc.status, None, None, exc.code, exc.message)
        except Exception:
            log.exception("job %s: item %d failed unexpectedly", job.id, item.chunk.first + item.pos)
            return (500, None, None, "internal", "internal error while running this item")
        return (200, out.content_type, out.body, None, None)

    def _wants_chunk(self, active: _ActiveJob) -> bool:
        # Keep about one chunk of items ahead of the workers, and at most two chunks claimed.
        return len(active.chunks) < 2 and len(active.lane.items) < self._settings.chunk_items

    # --- the control thread -----------------------------------------------------------------------
    def _control(self) -> None:
        try:
            if not self._wait_ready() or not self._become_leader():
                return
            recovered = self._store.recover()
            if recovered:
                log.warning(
                    "jobs: %d chunk(s) were running when the last runner stopped; they run again", recovered
                )
            self._loop()
        except Exception:
            log.exception("the job runner stopped")
        finally:
            self._release_claims()
            if self._lock_fd is not None:
                os.close(self._lock_fd)  # releases the flock
                self._lock_fd = None

    def _wait_ready(self) -> bool:
        while not self._platform.ready:
            with self._lock:
                if self._state != "running":
                    return False
                self._events.wait(0.05)
        return True

    def _become_leader(self) -> bool:
        if fcntl is None:
            self.leader.set()
            return True
        fd = os.open(self._store.root / "runner.lock", os.O_RDWR | os.O_CREAT, 0o600)
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                with self._lock:
                    if self._state != "running":
                        os.close(fd)
                        return False
                    self._events.wait(self._settings.poll_s)
                continue
            self._lock_fd = fd
            self.leader.set()
            return True

    def _loop(self) -> None:
        next_poll = next_sweep = 0.0
        while True:
            now = time.monotonic()
            with self._lock:
                if self._state == "closed" or (
                    self._state == "draining" and self._in_flight == 0 and not self._drain_left()
                ):
                    completed = list(self._completed)
                    self._completed.clear()
                    stop = True
                else:
                    stop = False
            if stop:
                self._commit(completed)
                return
            with self._lock:
                completed = list(self._completed)
                self._completed.clear()
                running = self._state == "running"
                refill = [a for a in self._active.values() if a.refill] if running else []
                for a in refill:
                    a.refill = False
                discover = running and (self._discover or now >= next_poll)
                self._discover = False
            self._commit(completed)
            self._claim(refill)
            if discover:
                self._discover_jobs()
                next_poll = now + self._settings.poll_s
            if running and now >= next_sweep:
                self._sweep()
                next_sweep = now + self._settings.sweep_s
            with self._lock:
                idle = not (self._completed or self._discover or any(a.refill for a in self._active.values()))
                if self._backoff:
                    self._backoff = False
                    self._events.wait(BACKOFF_S)
                elif idle and self._state == "running":
                    self._events.wait(max(0.0, min(next_poll, next_sweep) - time.monotonic()))
                elif idle:
                    self._events.wait(0.05)

    def _discover_jobs(self) -> None:
        try:
            jobs = self._store.active()
            pending = self._store.pending_webhooks()
        except Exception as exc:
            log.warning("jobs: could not list queued jobs: %s", exc)
            return
        with self._lock:
            cutoff = time.monotonic() - 60.0
            self._withdrawn = {j: t for j, t in self._withdrawn.items() if t > cutoff}
            for job in jobs:
                if job.id not in self._active and job.id not in self._withdrawn:
                    active = _ActiveJob(job)
                    self._active[job.id] = active
                    self._queue.add(active.lane)
        for job in pending:
            self._on_finished(job)

    def _claim(self, actives: list[_ActiveJob]) -> None:
        """Claims the next chunk of each job, in one transaction."""
        if not actives:
            return
        try:
            claimed = self._store.claim_many([a.job.id for a in actives])
        except Exception as exc:  # the store is busy, the disk failed: again after a pause
            log.warning("jobs: could not claim chunks: %s", exc)
            with self._lock:
                for active in actives:
                    active.refill = True
                self._backoff = True
            return
        release: list[ClaimedChunk] = []
        with self._lock:
            for active in actives:
                chunk_claimed = claimed.get(active.job.id)
                if chunk_claimed is not None and (active.withdrawn or self._state != "running"):
                    release.append(chunk_claimed)
                elif chunk_claimed is None:
                    active.more = False
                    if not active.chunks:
                        self._forget(active)  # finished, or cancelled elsewhere
                else:
                    chunk = _Chunk(active, chunk_claimed)
                    active.chunks[chunk.seq] = chunk
                    items = [
                        _Item(chunk, n, body, ctype) for n, (body, ctype) in enumerate(chunk_claimed.items)
                    ]
                    self._queue.push(active.lane, items)
                    active.refill = self._wants_chunk(active)
                    self._work.notify(len(items))
        for chunk_claimed in release:
            try:
                self._store.release(chunk_claimed.job_id, [chunk_claimed.seq])
            except Exception as exc:  # it stays claimed until the next start's recovery
                log.warning("jobs: could not give back a chunk of %s: %s", chunk_claimed.job_id, exc)

    def _commit(self, chunks: list[_Chunk]) -> None:
        """Stores the results of finished chunks, in one transaction."""
        if not chunks:
            return
        try:
            jobs = self._store.complete_many(
                [(c.job.job.id, c.seq, [r for r in c.results if r is not None]) for c in chunks]
            )
        except Exception as exc:  # the store is busy, the disk failed: again after a pause
            log.warning("jobs: could not store the results of %d chunk(s): %s", len(chunks), exc)
            with self._lock:
                if self._state != "closed":
                    self._completed.extend(chunks)
                    self._backoff = True
            return
        finished = []
        with self._lock:
            for chunk, job in zip(chunks, jobs, strict=True):
                active = chunk.job
                active.chunks.pop(chunk.seq, None)
                if job is None or (job.finished and not active.chunks):
                    self._forget(active)
                elif active.more and self._wants_chunk(active):
                    active.refill = True
                if job is not None and job.finished and job.webhook_state == "pending":
                    finished.append(job)
        for job in finished:
            self._on_finished(job)

    def _forget(self, active: _ActiveJob) -> None:
        """Call with the lock held."""
        self._active.pop(active.job.id, None)
        self._queue.remove(active.lane)

    def _sweep(self) -> None:
        try:
            removed = self._store.sweep()
        except Exception as exc:
            log.warning("jobs: could not delete expired jobs: %s", exc)
            return
        if removed:
            log.info("jobs: deleted %d expired job(s)", removed)

    def _release_claims(self) -> None:
        with self._lock:
            claims = [
                (a.job.id, [seq for seq, c in a.chunks.items() if c.started == 0])
                for a in self._active.values()
            ]
        for job_id, seqs in claims:
            if seqs:
                try:
                    self._store.release(job_id, seqs)
                except (WasminferError, OSError):
                    pass  # recovery puts them back at the next start
