"""The SQLite side of the store: schema migrations, connection pool and transactions.

Durability: WAL journal with `synchronous=FULL`. In WAL mode `NORMAL` already survives a killed
process (a committed transaction is in the WAL file in the OS page cache), but a power loss or
kernel crash can roll back the last commits. The store acknowledges an upload only after its blob
was fsynced; `FULL` makes the row just as durable for one extra fsync of the WAL per commit, which
is noise next to the blob's own fsyncs, and writes are rare (deploys, keys) next to reads.

Concurrency: a pool of connections, each used by one thread at a time, so reads run in parallel
(WAL readers never block). Writers take `BEGIN IMMEDIATE` (the database write lock up front, so a
transaction never fails half-way on a lock upgrade), behind a process-local lock so this process's
threads queue instead of polling SQLite's busy handler; other processes on the same data folder
(host replicas) wait on `busy_timeout`.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from wasminfer.errors import Unavailable, WasminferError

BUSY_TIMEOUT_S = 30.0

# MIGRATIONS[i] takes the schema from version i to i + 1 (stored in `PRAGMA user_version`). Append
# new entries; never edit a released one. All statements of one migration run in one transaction
# together with the version bump. Tables of other packages (jobs) are theirs: `migrate_part`.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        # Version numbers are never reused, even after a delete: caches keyed by (name, version)
        # elsewhere in the host can never serve a deleted function's code for a new upload.
        """CREATE TABLE version_counters (
            tenant TEXT NOT NULL,
            kind TEXT NOT NULL CHECK (kind IN ('function', 'model')),
            name TEXT NOT NULL,
            last_version INTEGER NOT NULL,
            PRIMARY KEY (tenant, kind, name)
        ) WITHOUT ROWID""",
        """CREATE TABLE functions (
            tenant TEXT NOT NULL DEFAULT 'default',
            name TEXT NOT NULL,
            current_version INTEGER NOT NULL,
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL,
            PRIMARY KEY (tenant, name),
            FOREIGN KEY (tenant, name, current_version)
                REFERENCES function_versions (tenant, name, version) DEFERRABLE INITIALLY DEFERRED
        )""",
        """CREATE TABLE function_versions (
            tenant TEXT NOT NULL DEFAULT 'default',
            name TEXT NOT NULL,
            version INTEGER NOT NULL CHECK (version > 0),
            sha256 TEXT NOT NULL CHECK (length(sha256) = 64),
            size INTEGER NOT NULL,
            manifest TEXT NOT NULL,
            abi TEXT NOT NULL,
            info TEXT NOT NULL,
            created_at REAL NOT NULL,
            PRIMARY KEY (tenant, name, version),
            FOREIGN KEY (tenant, name) REFERENCES functions (tenant, name) ON DELETE CASCADE
        )""",
        "CREATE INDEX function_versions_by_sha256 ON function_versions (sha256)",
        # The models named by each function's *current* manifest, kept in step with every write to
        # `functions.current_version`, so "is this model in use?" is one indexed query.
        """CREATE TABLE function_models (
            tenant TEXT NOT NULL DEFAULT 'default',
            function TEXT NOT NULL,
            model TEXT NOT NULL,
            PRIMARY KEY (tenant, function, model),
            FOREIGN KEY (tenant, function) REFERENCES functions (tenant, name) ON DELETE CASCADE
        ) WITHOUT ROWID""",
        "CREATE INDEX function_models_by_model ON function_models (tenant, model)",
        """CREATE TABLE models (
            tenant TEXT NOT NULL DEFAULT 'default',
            name TEXT NOT NULL,
            version INTEGER NOT NULL CHECK (version > 0),
            sha256 TEXT NOT NULL CHECK (length(sha256) = 64),
            size INTEGER NOT NULL,
            info TEXT NOT NULL,
            created_at REAL NOT NULL,
            PRIMARY KEY (tenant, name, version)
        )""",
        "CREATE INDEX models_by_sha256 ON models (sha256)",
        """CREATE TABLE api_keys (
            id TEXT PRIMARY KEY,
            tenant TEXT NOT NULL DEFAULT 'default',
            key_hash TEXT NOT NULL,
            scopes TEXT NOT NULL,
            created_at REAL NOT NULL,
            revoked INTEGER NOT NULL DEFAULT 0 CHECK (revoked IN (0, 1))
        )""",
        "CREATE INDEX api_keys_by_tenant ON api_keys (tenant)",
    ),
    (
        # Version 2 made the tables of asynchronous jobs; they are `wasminfer.jobs`'s now, which
        # keeps its own migrations (`jobs/schema.py`) and adopts the tables files of version 2 hold.
    ),
    (
        # The schema versions of the packages that keep tables of their own in this file (the
        # store's own is `PRAGMA user_version`): see `Database.migrate_part`.
        """CREATE TABLE schema_parts (
            part TEXT PRIMARY KEY,
            version INTEGER NOT NULL CHECK (version >= 0)
        ) WITHOUT ROWID""",
    ),
)
SCHEMA_VERSION = len(MIGRATIONS)


def _is_busy(exc: sqlite3.OperationalError) -> bool:
    return getattr(exc, "sqlite_errorcode", None) in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)


class Database:
    """The store's SQLite file: migrated on open, then used through `read()` / `write()`.

    Thread-safe; `close()` is idempotent and closes idle connections at once and busy ones when
    their transaction ends."""

    def __init__(self, path: Path, migrations: tuple[tuple[str, ...], ...] = MIGRATIONS) -> None:
        self.path = path
        self._idle: list[sqlite3.Connection] = []
        self._pool_lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._closed = False
        conn = self._connect()
        try:
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode != "wal":
                raise WasminferError(f"{path}: SQLite refused WAL mode (got {mode!r})")
            self._migrate(conn, migrations)
        except BaseException:
            conn.close()
            raise
        self._idle.append(conn)

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Close the database; later calls raise `Unavailable`. Idempotent."""
        with self._pool_lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    @contextmanager
    def read(self) -> Iterator[sqlite3.Connection]:
        """A connection inside a read transaction (one consistent snapshot for all its queries).
        Raises `Unavailable` if the database is closed or locked beyond the busy timeout."""
        with self._connection() as conn:
            try:
                conn.execute("BEGIN")
                yield conn
            except sqlite3.OperationalError as exc:
                if _is_busy(exc):
                    raise Unavailable("the store is busy; retry") from exc
                raise
            finally:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")

    @contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """A connection inside a write transaction that commits when the block ends and rolls back if
        it raises. Raises `Unavailable` if the database is closed or locked beyond the busy timeout."""
        with self._write_lock, self._connection() as conn:
            try:
                conn.execute("BEGIN IMMEDIATE")
                yield conn
                conn.execute("COMMIT")
            except sqlite3.OperationalError as exc:
                if _is_busy(exc):
                    raise Unavailable("the store is busy; retry") from exc
                raise
            finally:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")

    def schema_version(self) -> int:
        """The schema version of the file (`PRAGMA user_version`)."""
        with self.read() as conn:
            return int(conn.execute("PRAGMA user_version").fetchone()[0])

    @contextmanager
    def _connection(self) -> Iterator[sqlite3.Connection]:
        with self._pool_lock:
            if self._closed:
                raise Unavailable("the store is closed")
            conn = self._idle.pop() if self._idle else None
        if conn is None:
            conn = self._connect()
        healthy = False
        try:
            yield conn
            healthy = True
        finally:
            # A connection whose transaction could not be ended is not reused.
            healthy = healthy or not conn.in_transaction
            with self._pool_lock:
                keep = healthy and not self._closed
                if keep:
                    self._idle.append(conn)
            if not keep:
                conn.close()

    def _connect(self) -> sqlite3.Connection:
        # isolation_level=None: the sqlite3 module issues no implicit BEGIN/COMMIT; we do.
        # check_same_thread=False: pooled connections move between threads, one at a time.
        conn = sqlite3.connect(
            self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
        )
        try:
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA foreign_keys=ON")
        except BaseException:
            conn.close()
            raise
        return conn

    def migrate_part(self, part: str, migrations: tuple[tuple[str, ...], ...]) -> None:
        """Brings the tables that package `part` (e.g. "jobs") keeps in this file to the last of its
        own `migrations` (the same rules as the store's; the version is in table `schema_parts`).
        Raises `WasminferError` if the file holds a newer version of `part` than `migrations` know,
        `Unavailable` as `write` does."""
        with self.write() as conn:
            row = conn.execute("SELECT version FROM schema_parts WHERE part = ?", (part,)).fetchone()
            current = int(row[0]) if row is not None else 0
            self._apply(conn, f"{self.path} ({part})", current, migrations)
            if current != len(migrations):
                conn.execute(
                    "INSERT INTO schema_parts (part, version) VALUES (?, ?) "
                    "ON CONFLICT (part) DO UPDATE SET version = excluded.version",
                    (part, len(migrations)),
                )

    def part_version(self, part: str) -> int:
        """The schema version of package `part`'s tables in this file (0: none yet)."""
        with self.read() as conn:
            row = conn.execute("SELECT version FROM schema_parts WHERE part = ?", (part,)).fetchone()
            return int(row[0]) if row is not None else 0

    def _migrate(self, conn: sqlite3.Connection, migrations: tuple[tuple[str, ...], ...]) -> None:
        # IMMEDIATE: two processes opening a fresh folder at once migrate one after the other.
        conn.execute("BEGIN IMMEDIATE")
        try:
            current = int(conn.execute("PRAGMA user_version").fetchone()[0])
            self._apply(conn, str(self.path), current, migrations)
            if current != len(migrations):
                conn.execute(f"PRAGMA user_version = {len(migrations)}")
            conn.execute("COMMIT")
        finally:
            if conn.in_transaction:
                conn.execute("ROLLBACK")

    @staticmethod
    def _apply(conn: sqlite3.Connection, what: str, current: int,
               migrations: tuple[tuple[str, ...], ...]) -> None:
        if current > len(migrations):
            raise WasminferError(
                f"{what} has schema version {current}, newer than this wasminfer knows "
                f"({len(migrations)}): upgrade wasminfer"
            )
        for version in range(current, len(migrations)):
            for statement in migrations[version]:
                conn.execute(statement)
