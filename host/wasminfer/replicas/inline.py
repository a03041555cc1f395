"""`InlinePolicy`: which invocations run on the event loop itself instead of a worker thread.

Handing a call to a worker thread and back costs more GIL time than a small model's whole
invocation: for the digits example the hand-off (waking a thread, the GIL passing twice, the
future's callback) took about as long as the guest and `session.run` together, and halved what one
process served (measured: bench/results/hotpath.json). So a function whose recent invocations were
short runs on the loop; a long one still leaves it, because while an invocation runs inline nothing
else in the process's event loop moves (no other request is read, routed or answered).

Decided per function, adaptively, from what its invocations cost:

- **eligible**: every model its manifest names runs on its own (no dynamic batching: an inline
  call waiting `max_queue_delay_us` for others to join its batch would wait for requests the
  blocked loop cannot read; and no bound on concurrent runs, whose queue it could wait in), and its
  pool has an instance free now (an inline call never waits for one);
- **short**: after `MIN_SAMPLES` invocations, the moving average of their CPU time is at most
  `max_us` (the CPU time of the thread that ran each: its wall time would count every other
  thread's turn at the GIL, and the scheduler's on a loaded machine). The CPU time is read for the
  first `MIN_SAMPLES` invocations of a function, then for one in `CPU_SAMPLE_EVERY` (`measures`):
  a thread's CPU clock is a system call, which on a busy 2-core VM took tens of µs each, two per
  invocation (bench/hotpath.py's profile: a fifth of the server's time for digits);
- **never waits**: an invocation that blocked in a host call (a WASI sleep, measured by the
  runtime: `runtime.blocked_ns`) keeps this version of the function on threads for good: it
  computes little, and would hold the loop for as long as it sleeps;
- **not recently slow**: a function goes to threads for a cooldown (1 s, doubling for each slow
  spell that follows within `RESET_S`, up to `MAX_COOLDOWN_S`) when an invocation computes for
  more than `SLOW_FACTOR` × `max_us` (an unmeasured inline run that held the loop that long has
  the next one measured), or when the moving average of its inline runs' wall time (what they held
  the loop; every inline run's) passes that: a guest that sleeps in a host call computes little but
  holds the loop all the same, while one run slowed by the scheduler moves the average by a fifth
  of at most `WALL_CLIP` x the bound (two in a row still send the function to threads).
  A function that turns slow (an input that makes it loop, a guest that sleeps) holds the loop for
  one invocation or a few, never for a stream of them.

The worst case is those invocations: a function that was short and is not any more holds the loop
until it returns or reaches its own `timeout_ms`. Mode "never" (`max_us` 0) keeps every invocation
on threads; "always" runs every eligible invocation inline (tests, and the benchmark's comparison).

Everything here runs on the event loop (no lock).
"""

from __future__ import annotations

import time
import weakref
from dataclasses import dataclass
from typing import Any

from wasminfer.errors import ModelNotFound

MODES = ("auto", "always", "never")
MIN_SAMPLES = 8
CPU_SAMPLE_EVERY = 16  # past MIN_SAMPLES, one invocation in this many has its CPU time read
SLOW_FACTOR = 4
WALL_CLIP = 3  # one inline run's wall time counts in the average up to this many times the slow bound
WEIGHT = 0.2  # of the newest cost in the moving average: about the last 5-10 invocations
FIRST_COOLDOWN_S = 1.0
MAX_COOLDOWN_S = 60.0
RESET_S = 120.0  # calm this long after a slow run: the next cooldown starts from the first again


@dataclass(slots=True)
class _Learned:
    fn: weakref.ref[Any]  # the `DeployedFunction` learned about: a new version starts over
    samples: int = 0
    mean_us: float = 0.0
    cooldown_until: float = 0.0
    cooldown_s: float = 0.0
    slow_at: float = -1e18
    wall_us: float = 0.0  # moving average of the inline runs' wall time since the last cooldown
    waits: bool = False  # an invocation blocked in a host call (a WASI sleep): never inline again
    unmeasured: int = 0  # invocations since the last whose CPU time was read
    measure_next: bool = False  # an unmeasured inline run held the loop past the slow bound


class InlinePolicy:
    """Decides, per function, whether an invocation runs inline (see the module doc)."""

    def __init__(self, mode: str = "auto", max_us: float = 1000.0, *, clock: Any = time.monotonic) -> None:
        """Raises `ValueError` for an unknown `mode` or a negative `max_us`."""
        if mode not in MODES:
            raise ValueError(f"inline mode must be one of {', '.join(MODES)}, not {mode!r}")
        if max_us < 0:
            raise ValueError("inline max_us must be 0 or more")
        self.mode = "never" if max_us == 0 and mode == "auto" else mode
        self.max_us = max_us
        self._clock = clock
        self._learned: dict[tuple[str, str], _Learned] = {}
        self._swept = 16  # entries at the last sweep of forgotten functions (see `_sweep`)
        self.inline_total = 0  # invocations run inline
        self.cooldowns_total = 0  # slow invocations that sent their function back to threads

    def decide(self, key: tuple[str, str], fn: Any) -> bool:
        """Whether the next invocation of `fn` (the `DeployedFunction` of `key`) runs inline."""
        mode = self.mode
        if mode == "never" or (mode == "auto" and not self.short(key, fn)):
            return False
        return eligible(fn)

    def short(self, key: tuple[str, str], fn: Any) -> bool:
        """Whether what was learned of `fn` lets it run inline: enough invocations, short on
        average, none slow lately."""
        learned = self._learned.get(key)
        return (
            learned is not None
            and learned.fn() is fn
            and not learned.waits
            and learned.samples >= MIN_SAMPLES
            and learned.mean_us <= self.max_us
            and learned.cooldown_until <= self._clock()
        )

    def measures(self, key: tuple[str, str]) -> bool:
        """Whether the next invocation of `key` should have its CPU time read for `observe` (see the
        module doc); never outside mode "auto", which alone learns."""
        if self.mode != "auto":
            return False
        learned = self._learned.get(key)
        if learned is None or learned.samples < MIN_SAMPLES or learned.measure_next:
            return True
        learned.unmeasured += 1
        if learned.unmeasured >= CPU_SAMPLE_EVERY:
            learned.unmeasured = 0
            return True
        return False

    def observe(
        self, key: tuple[str, str], fn: Any, cpu_us: float | None, inline_wall_us: float | None = None,
        blocked_us: float = 0.0,
    ) -> None:
        """Learns the cost of one invocation of `fn`: the CPU time of the thread that ran it (None:
        not read, see `measures`), for an inline run its wall time, and the time it blocked in host
        calls (see the module doc)."""
        if self.mode != "auto":
            return
        learned = self._learned.get(key)
        if learned is None or learned.fn() is not fn:
            learned = self._learned[key] = _Learned(weakref.ref(fn))
            if len(self._learned) > 2 * self._swept:
                self._sweep()
        bound = self.max_us * SLOW_FACTOR
        slow = False
        if cpu_us is not None:
            if learned.samples:
                learned.mean_us += (cpu_us - learned.mean_us) * WEIGHT
            else:
                learned.mean_us = cpu_us
            learned.samples += 1
            learned.measure_next = False
            slow = cpu_us > bound
        elif inline_wall_us is not None and inline_wall_us > bound:
            learned.measure_next = True  # it may have computed that long: read the next one's
        if blocked_us > 0:
            learned.waits = True
        if inline_wall_us is not None:
            # One run held off the CPU for a long while (on 2 busy cores: tens to hundreds of ms, a
            # cooldown every second or so) weighs no more than `WALL_CLIP` x the bound.
            wall = min(inline_wall_us, bound * WALL_CLIP)
            learned.wall_us += (wall - learned.wall_us) * WEIGHT
            slow = slow or learned.wall_us > bound
        if slow:
            now = self._clock()
            if now - learned.slow_at > RESET_S:
                learned.cooldown_s = FIRST_COOLDOWN_S
            else:
                learned.cooldown_s = min(MAX_COOLDOWN_S, max(FIRST_COOLDOWN_S, learned.cooldown_s * 2))
            learned.slow_at = now
            learned.cooldown_until = now + learned.cooldown_s
            learned.wall_us = 0.0
            self.cooldowns_total += 1

    def _sweep(self) -> None:
        """Forgets the functions deleted or replaced since (their `DeployedFunction` is gone)."""
        self._learned = {k: x for k, x in self._learned.items() if x.fn() is not None}
        self._swept = max(16, len(self._learned))

    def stats(self, tenant: str | None = None) -> dict[str, Any]:
        """The mode, the threshold, the counts, and per function what was learned (of `tenant`'s
        functions only, when given)."""
        now = self._clock()
        out: dict[str, Any] = {"mode": self.mode, "max_us": self.max_us}
        if tenant is None:  # counts over every tenant: the operator's view only
            out.update(inline_total=self.inline_total, cooldowns_total=self.cooldowns_total)
        out["functions"] = {
            f"{t}/{n}": {
                "samples": x.samples,
                "mean_cpu_us": round(x.mean_us, 1),
                "mean_inline_wall_us": round(x.wall_us, 1),
                "waits": x.waits,
                "cooling_s": round(max(0.0, x.cooldown_until - now), 3),
            }
            for (t, n), x in self._learned.items()
            if tenant is None or t == tenant
        }
        return out


def eligible(fn: Any) -> bool:
    """Whether an invocation of `fn` (a `DeployedFunction`) may run inline now: it is no component,
    none of its models batches or bounds its concurrent runs, and its pool has an instance free
    (see the module doc)."""
    if fn.abi == "component" or not fn.pool.has_room():
        # a component's WASI (wasmtime's own, preview 2) sleeps where `blocked_ns` cannot see
        return False
    models = fn.host.models
    for name in fn.manifest.models:
        try:
            info = models.get(name)
        except ModelNotFound:  # unloaded meanwhile: the invocation says so, from a thread
            return False
        if info.batching is not None or info.max_concurrent_runs:
            return False
    return True
