"""Crash safety of `wasminfer.store`: a writer process is SIGKILLed at random moments, again and
again, on one data folder; after every kill the store must hold every write the writer acknowledged,
with intact blobs, and nothing half-written.

Run as a script (`python test_store_crash.py DATA_DIR SEED`) this file is the writer: it prints one
JSON line per write, flushed, after the store call returned (i.e. after the commit).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

import wasminfer.store
from wasminfer.store import Store

ROUNDS = 40


def writer(data_dir: str, seed: int) -> None:
    rng = random.Random(seed)
    with Store(data_dir) as store:
        print("ready", flush=True)
        for i in range(1_000_000):
            roll = rng.random()
            # Sizes from tiny to a few hundred KiB, so kills land in blob writes, fsyncs and commits.
            size = rng.choice([16, 4096, 65_536, 300_000])
            if roll < 0.45:
                models = [f"m{rng.randrange(3)}"] if rng.random() < 0.5 else []
                fv = store.put_function(
                    f"fn{rng.randrange(4)}", rng.randbytes(size), {"models": models, "seq": i}, "handler"
                )
                record = {"kind": "function", "name": fv.name, "version": fv.version, "sha256": fv.sha256}
            elif roll < 0.9:
                m = store.put_model(f"m{rng.randrange(3)}", rng.randbytes(size), {"seq": i})
                record = {"kind": "model", "name": m.name, "version": m.version, "sha256": m.sha256}
            else:
                store.gc(grace_s=0)
                continue
            print(json.dumps(record), flush=True)


def verify(data_dir: Path, acked: list[dict[str, Any]], new: list[dict[str, Any]]) -> None:
    conn = sqlite3.connect(data_dir / "store.db")
    try:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    finally:
        conn.close()
    with Store(data_dir) as store:
        for record in acked:
            if record["kind"] == "function":
                got: Any = store.get_function(record["name"], record["version"])
            else:
                got = store.get_model(record["name"], record["version"])
            assert got.sha256 == record["sha256"], record
        # Hash the blobs written this round (earlier rounds were hashed when they were new).
        for record in new:
            assert hashlib.sha256(store.blobs.get(record["sha256"])).hexdigest() == record["sha256"]
        # No row points to a missing blob; current pointers and foreign keys hold.
        assert store.check() == []


@pytest.mark.slow
def test_sigkill_at_random_moments_loses_no_acknowledged_write(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    package_root = Path(wasminfer.store.__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(package_root), os.environ.get("PYTHONPATH", "")])}
    rng = random.Random(20240501)
    acked: list[dict[str, Any]] = []
    started = time.monotonic()
    for round_ in range(ROUNDS):
        with subprocess.Popen(
            [sys.executable, __file__, str(data_dir), str(round_)], stdout=subprocess.PIPE, env=env
        ) as proc:
            assert proc.stdout is not None
            try:
                assert proc.stdout.readline() == b"ready\n"
                time.sleep(rng.uniform(0.0, 0.12))
            finally:
                proc.send_signal(signal.SIGKILL)
                out = proc.stdout.read()
        assert proc.returncode == -signal.SIGKILL, "the writer ended before it was killed"
        # Only complete lines were acknowledged; a cut-off last line was not.
        new = [json.loads(line) for line in out.split(b"\n")[:-1]]
        acked += new
        verify(data_dir, acked, new)

    elapsed = time.monotonic() - started
    assert len(acked) > ROUNDS, "the writer barely wrote anything before the kills"
    # Version numbers only ever grow, across crashes too.
    last: dict[tuple[str, str], int] = {}
    for record in acked:
        key = (record["kind"], record["name"])
        assert record["version"] > last.get(key, 0), record
        last[key] = record["version"]
    with Store(data_dir) as store:
        store.gc(grace_s=0)  # removes the orphans of interrupted uploads, nothing referenced
        assert store.check(verify_hashes=True) == []
        store.put_function("after-crashes", b"\0asm", {}, "handler")
    print(f"{ROUNDS} kills, {len(acked)} acknowledged writes, {elapsed:.1f} s")


if __name__ == "__main__":
    writer(sys.argv[1], int(sys.argv[2]))
