"""`replicas.balance.ConnectionShares`: the processes on one port share their connection counts
through a real memory-mapped file, and one holding more than its share is told how many to close."""

from __future__ import annotations

from pathlib import Path

import pytest

from wasminfer.replicas.balance import SLOTS, ConnectionShares, vacate


def test_an_uneven_spread_gives_the_fuller_process_its_surplus(tmp_path: Path) -> None:
    path = tmp_path / "connections.shares"
    primary, replica = ConnectionShares(path, 0), ConnectionShares(path, 3)
    try:
        assert replica.publish(6) == 0  # alone on the port so far: everything is its share
        assert primary.publish(10) == 2  # 16 over 2 processes: 8 each, 2 too many here
        assert replica.publish(6) == 0
        assert primary.counts() == replica.counts() == {0: 10, 3: 6}
        # even, and odd totals (the ceiling's share): nothing to close
        assert replica.publish(8) == 0 and primary.publish(8) == 0
        assert replica.publish(7) == 0 and primary.publish(8) == 0
        # a process with no connection still counts as one of the port's
        assert replica.publish(0) == 0 and primary.publish(3) == 1
    finally:
        primary.close()
        replica.close()


def test_a_process_that_leaves_no_longer_holds_the_share_up(tmp_path: Path) -> None:
    path = tmp_path / "connections.shares"
    primary, draining = ConnectionShares(path, 0), ConnectionShares(path, 1)
    try:
        draining.publish(2)
        assert primary.publish(6) == 2
        draining.close()
        draining.close()  # idempotent
        assert draining.publish(5) == 0  # closed: publishes nothing
        assert primary.counts() == {0: 6}
        assert primary.publish(6) == 0  # the only process on the port
        # A killed process never empties its slot: its backend does.
        killed = ConnectionShares(path, 2)
        killed.publish(1)
        killed._map = None  # as a process gone without close(): its count stays in the file
        assert primary.counts() == {0: 6, 2: 1}
        vacate(path, 2)
        assert primary.counts() == {0: 6}
        vacate(tmp_path / "never-made", 2)  # no file: nothing to empty, no error
        assert not (tmp_path / "never-made").exists()
    finally:
        primary.close()


def test_slots_obeyed_and_violated(tmp_path: Path) -> None:
    path = tmp_path / "connections.shares"
    last = ConnectionShares(path, SLOTS - 1)
    try:
        assert last.publish(4) == 0 and last.counts() == {SLOTS - 1: 4}
    finally:
        last.close()
    for slot in (-1, SLOTS):
        with pytest.raises(ValueError, match=rf"connection share slot {slot}: give 0\.\.{SLOTS - 1}"):
            ConnectionShares(path, slot)
    assert (path.stat().st_mode & 0o777) == 0o600
