"""Compiling uploaded Wasm in a child process, with a time and a memory limit.

Compiling is the one thing a Wasm upload makes the host do that epoch interruption cannot stop:
Cranelift runs to the end, on every core, inside the caller's process. A few hundred KiB are enough
to make it slow (measured here on 2 cores: 100 000 empty functions, 0.4 MB, 20 s; 1 000 functions
declaring 50 000 locals each, 8 KB, 9 s; a million functions fit in 4 MB), and memory grows with
it. So every compile runs in a worker process of its own (`python _compiler.py`): niced, under an
address-space limit, killed at `timeout_s`. It writes the compiled artefact to the path the caller
gives (the compile cache), atomically; the caller then loads it with `deserialize_file`, which is
what a cache hit does anyway.

Two tiers (`TIERS`): "optimised", the engine's own configuration, whose artefacts are cached; and
"fast" (no Cranelift optimisations, the single-pass register allocator), ~2.5x less compile time for
~1.2-1.6x slower guest code, whose artefact comes back over the pipe (it is never cached, so nothing
is written or fsynced on a new module's way to its first answer): `_tiers.Tiering` answers with
it first and swaps the optimised code in behind it. Both load into the host's engine: neither
setting is one wasmtime requires of a loaded artefact. The memory reservation is one: the Python
runtime's engine (`_wide.py`) has its own (`engine_config(wide=True)`), which a job names.

Workers stay alive between compiles (starting one costs an interpreter and `import wasmtime`,
~100-300 ms here: more than compiling a small guest), one per compile in flight (plus one kept for
background compiles, at the lowest priority), and one is started ahead (`Compiler.prestart`: when
the engine is made, and after a compile took the last idle one or killed its worker), so a new
module's compile finds a worker already running. A worker that timed out, died or whose compile was
cancelled is killed and replaced.

This file runs as a script in the worker, so it imports nothing of wasminfer: `engine_config` lives
here, and `_engine.py` builds the host's engine from it (a compiled artefact loads only into an engine
of the same configuration). That is why it is one concept past the module-size rule: the worker's
loop and the caller's side of its pipe protocol change together, and the worker can import no
sibling module to hold either half.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import wasmtime

#: Wall-clock limit of one compile (`WASMINFER_COMPILE_TIMEOUT_S`). A componentize-py component (it
#: embeds CPython, ~18 MB) takes 10-20 s here; core modules of real guests take milliseconds.
DEFAULT_TIMEOUT_S = float(os.environ.get("WASMINFER_COMPILE_TIMEOUT_S", "120"))
#: Address-space limit of a worker (`WASMINFER_COMPILE_MEMORY_MB`): past it the compile fails.
DEFAULT_MEMORY_BYTES = int(os.environ.get("WASMINFER_COMPILE_MEMORY_MB", "6144")) << 20
#: Workers kept idle between compiles.
MAX_IDLE_WORKERS = 2
_NICE = 10  # compiles yield the cores to invocations
#: Background compiles (the optimised tier behind a fast one) yield them to uploads as well: a niceness
#: can only go up without privileges, so they have a worker of their own. Not 19: at 19 (1.5% of a
#: nice-0 process's weight) a 60 ms compile starved for over 2 minutes beside three busy processes on
#: 2 cores, leaving functions on fast-tier code and nothing in the cache; at 12 (7%) it takes seconds.
_BACKGROUND_NICE = 12
#: Heap an upload worker keeps between compiles beyond what it held at start (`_Heap`).
KEEP_HEAP_BYTES = 24 << 20
#: The pipe a worker replies on holds this much (Linux, `F_SETPIPE_SZ`; 64 KiB by default): a small
#: module's fast-tier artefact (digits: 165 KB) is then written in one go, not in 64 KiB rounds that
#: each wait for the host to read and the niced worker to be scheduled again.
REPLY_PIPE_BYTES = 512 << 10


#: Compile tiers: "fast" for a new module's first answers, "optimised" for everything after.
TIERS = ("fast", "optimised")


#: (memory reservation, guard) by `wide`. Small virtual reservations: thousands of instances must fit
#: in the address space and in vm.max_map_count; bounds checks are explicit instead (a few % on guest
#: code). The wide engine's are wasmtime's 64-bit defaults: a 32-bit address plus any offset lands in
#: the reservation or its guard, so Cranelift emits no checks, and a memory never moves as it grows.
_MEMORY = {False: (64 << 20, 64 << 10), True: (4 << 30, 32 << 20)}
_MAX_WASM_STACK = 512 << 10


def engine_config(tier: str = "optimised", wide: bool = False) -> wasmtime.Config:
    """The configuration of every engine of wasminfer (see `_engine.Engine`); `tier="fast"` is the
    compile workers' quick first tier (its code runs in the same engine); `wide`: the Python
    runtime's engine (`_wide.py`), whose memories are reserved whole (no bounds checks)."""
    config = wasmtime.Config()
    config.epoch_interruption = True
    config.cranelift_opt_level = "speed" if tier == "optimised" else "none"
    if tier == "fast":
        # By name: wasmtime-py's enum of this C API setting is numbered one off from the C header's.
        _cranelift_flag(config, "regalloc_algorithm", "single_pass")
    config.wasm_threads = False
    config.shared_memory = False
    reservation, guard = _MEMORY[wide]
    config.memory_reservation = reservation
    config.memory_guard_size = guard
    config.max_wasm_stack = _MAX_WASM_STACK
    config.wasm_component_model = True  # Python functions are components (runtime/_component.py)
    config.wasm_exceptions = True  # the Python runtime's CPython (runtime/python.py) throws and catches
    return config


def _cranelift_flag(config: wasmtime.Config, name: str, value: str) -> None:
    import ctypes

    from wasmtime import _ffi as ffi

    ffi.wasmtime_config_cranelift_flag_set(config.ptr(), ctypes.c_char_p(name.encode()),
                                           ctypes.c_char_p(value.encode()))


def _fingerprint(wide: bool) -> str:
    reservation, guard = _MEMORY[wide]
    return f"opt=speed;res={_size(reservation)};guard={_size(guard)};stack={_size(_MAX_WASM_STACK)};cm;exn"


def _size(n: int) -> str:
    for unit, shift in (("G", 30), ("M", 20), ("K", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift}{unit}"
    return str(n)


#: What `engine_config` sets (the optimised tier: the only one cached), for the names of artefacts.
CONFIG_FINGERPRINT = _fingerprint(False)
#: The same for `engine_config(wide=True)`.
WIDE_CONFIG_FINGERPRINT = _fingerprint(True)


class CompileError(Exception):
    """The bytes do not compile: invalid, refused by the engine, too slow or too big to compile."""


class CompilerCrashed(CompileError):
    """The worker died while compiling: out of memory, or killed from outside (worth one retry when
    the same bytes compiled before, e.g. in the fast tier)."""


# --- the worker (this file run as a script) ---------------------------------------------------------
def _worker_main(memory_bytes: int, nice: int, keep_heap_bytes: int) -> None:
    try:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    except (ImportError, ValueError, OSError):
        pass  # not on this platform: the time limit still holds
    try:
        os.nice(nice)
    except OSError:
        pass
    engines: dict[tuple[str, bool], wasmtime.Engine] = {}  # by (tier, wide), made on first use
    heap = _Heap(keep_heap_bytes)
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    while True:
        header = stdin.readline()
        if not header:
            return
        job = json.loads(header)
        wasm = stdin.read(job["size"])
        artefact = b""
        started, cpu = time.perf_counter(), time.process_time()
        try:
            config = (job["tier"], bool(job.get("wide")))
            engine = engines.get(config)
            if engine is None:
                engine = engines[config] = wasmtime.Engine(engine_config(*config))
            artefact = _compile(engine, job["kind"], wasm)
            compiled = time.perf_counter()
            if job["out"] is not None:
                _write(artefact, Path(job["out"]))
                artefact = b""
            reply: dict[str, Any] = {
                "ok": True, "size": len(artefact),
                # what the worker itself spent, for the caller's breakdown (bench/newfn_breakdown.py)
                "compile_s": compiled - started, "write_s": time.perf_counter() - compiled,
                "cpu_s": time.process_time() - cpu,
            }
        except wasmtime.WasmtimeError as exc:
            reply = {"ok": False, "error": str(exc)}
        except MemoryError:
            reply = {"ok": False, "error": "compiling it needs more memory than the host allows"}
        stdout.write(json.dumps(reply).encode() + b"\n" + artefact)
        stdout.flush()
        del artefact, wasm
        heap.settle()


class _Heap:
    """Gives the heap Cranelift freed back to the system once a worker holds more than `keep_bytes`
    beyond what it held at start: glibc keeps it otherwise, and an idle worker then holds the peak
    of every compile it ran. Kept below that, because a compile that finds its heap already mapped
    runs faster: trimmed after every compile, the next digits compile (22 KB) page-faulted ~10 MiB
    back in (measured: 16.0 ms of CPU per fast compile trimmed, 14.7 kept, medians of 25 each; the
    idle upload worker holds 2.3-2.7 MiB more USS, 14.3 -> 16.6-17.0 MiB). The background worker
    (optimised compiles, nobody waits) keeps nothing. Trimmed after the reply: nobody waits for it."""

    def __init__(self, keep_bytes: int) -> None:
        self.keep_bytes = keep_bytes
        self._start = _resident_bytes()

    def needs_trim(self, resident: int | None) -> bool:
        """Whether a worker holding `resident` bytes (None: unknown) gives its free heap back."""
        return resident is None or self._start is None or resident - self._start > self.keep_bytes

    def settle(self) -> None:
        if not self.needs_trim(_resident_bytes()):
            return
        try:
            import ctypes

            ctypes.CDLL(None).malloc_trim(0)
        except (OSError, AttributeError):
            pass  # not glibc


def _resident_bytes() -> int | None:
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None  # not Linux: always trimmed


def _compile(engine: wasmtime.Engine, kind: str, wasm: bytes) -> bytes:
    if kind == "component":
        from wasmtime import component

        return bytes(component.Component(engine, wasm).serialize())
    return bytes(wasmtime.Module(engine, wasm).serialize())


def _write(artefact: bytes, out: Path) -> None:
    tmp = _partial(out, os.getpid())
    with open(tmp, "wb") as f:
        f.write(artefact)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out)


# --- the client (in the host) -----------------------------------------------------------------------
class _Worker:
    def __init__(self, memory_bytes: int, background: bool = False) -> None:
        self.background = background
        self.proc = subprocess.Popen(
            [sys.executable, __file__, str(memory_bytes), str(_BACKGROUND_NICE if background else _NICE),
             str(0 if background else KEEP_HEAP_BYTES)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            close_fds=True,
        )
        if REPLY_PIPE_BYTES:
            _grow_pipe(self.proc.stdout, REPLY_PIPE_BYTES)
        self.memory_bytes = memory_bytes
        #: The last compile's reply: what the worker spent compiling (`compile_s`, `cpu_s`: all its
        #: threads) and writing (`write_s`), and the caller's whole round trip (`roundtrip_s`).
        self.timings: dict[str, float] = {}

    def compile(self, kind: str, tier: str, wasm: bytes, out: Path | None, timeout_s: float,
                cancel: threading.Event | None = None, wide: bool = False) -> bytes:
        proc = self.proc
        assert proc.stdin is not None and proc.stdout is not None
        header = json.dumps({"kind": kind, "tier": tier, "wide": wide,
                             "out": None if out is None else str(out), "size": len(wasm)}).encode() + b"\n"
        started = time.monotonic()
        deadline = started + timeout_s
        # Written as the worker reads it, under the same deadline: a worker that stopped reading
        # (stopped, swapped out, stuck) must not block the caller on a full pipe.
        job = memoryview(header + wasm)
        fd = proc.stdin.fileno()
        os.set_blocking(fd, False)
        while job:
            if not self._wait([], [fd], deadline, cancel):
                continue
            try:
                job = job[os.write(fd, job):]
            except BlockingIOError:
                continue
            except OSError:  # a broken pipe: it died
                raise _WorkerDied() from None
        fd = proc.stdout.fileno()
        data = bytearray()
        need = size = -1  # once the reply's line is in: where the artefact after it ends, its size
        while len(data) < need or need < 0:
            if not self._wait([fd], [], deadline, cancel):
                continue
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                raise _WorkerDied()
            data += chunk
            if need < 0 and b"\n" in data:
                end = data.index(b"\n") + 1
                reply = json.loads(data[:end])
                if not reply["ok"]:
                    raise CompileError(reply["error"])
                size = int(reply["size"])
                need = end + size
        self.timings = {k: float(reply[k]) for k in ("compile_s", "write_s", "cpu_s")}
        self.timings["roundtrip_s"] = time.monotonic() - started
        return bytes(data[need - size:need])

    @staticmethod
    def _wait(reads: list[int], writes: list[int], deadline: float, cancel: threading.Event | None) -> bool:
        """Whether the fds are ready within a poll interval. Raises `_Cancelled` or `_WorkerTimedOut`."""
        if cancel is not None and cancel.is_set():
            raise _Cancelled()
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise _WorkerTimedOut()
        ready = select.select(reads, writes, [], min(remaining, _CANCEL_POLL_S))
        return bool(ready[0] or ready[1])

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                stream.close()

    def close(self) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.close()  # EOF: the worker returns
            self.proc.wait(timeout=5)
        except (OSError, subprocess.TimeoutExpired):
            pass
        self.kill()


def _grow_pipe(stream: Any, size: int) -> None:
    try:
        import fcntl

        fcntl.fcntl(stream.fileno(), fcntl.F_SETPIPE_SZ, size)
    except (ImportError, AttributeError, OSError):
        pass  # not Linux, or past the user's pipe quota (fs.pipe-user-pages-soft): the default pipe


class _WorkerTimedOut(Exception):
    pass


class _WorkerDied(Exception):
    pass


class _Cancelled(Exception):
    pass


_CANCEL_POLL_S = 0.05  # how soon a cancelled compile's worker is killed


class Compiler:
    """Compiles in worker processes. Thread-safe; one per process (`compiler()`)."""

    def __init__(self, memory_bytes: int = DEFAULT_MEMORY_BYTES) -> None:
        self.memory_bytes = memory_bytes
        self._idle: list[_Worker] = []
        self._lock = threading.Lock()
        self._closed = False
        self.started = 0  # workers started (for tests: a worker is reused)
        self._busy: dict[int, str] = {}  # pid -> tier of the workers compiling
        self._background: _Worker | None = None  # idle, for background compiles
        #: What the last compile that succeeded spent, in seconds (see `_Worker.timings`).
        self.timings: dict[str, float] = {}

    def compile(self, kind: str, wasm: bytes, out: Path, timeout_s: float = DEFAULT_TIMEOUT_S,
                cancel: threading.Event | None = None, *, background: bool = False,
                wide: bool = False) -> None:
        """Compiles `wasm` (a core module, or a component if `kind == "component"`) in the optimised
        tier and writes the serialised artefact to `out`, atomically (fsynced): `out` holds a whole
        artefact or nothing. `background`: in the one worker kept for background compiles (at the
        lowest priority; one such compile at a time), never one an upload is about to need. `wide`:
        for the wide engine (`engine_config(wide=True)`), the only one its artefact loads into.

        Raises `CompileError` if the bytes do not compile, if compiling takes longer than
        `timeout_s`, if `cancel` is set meanwhile (the worker is killed within ~50 ms);
        `CompilerCrashed` if the worker runs out of memory or dies.
        """
        try:
            self._compile(kind, "optimised", wasm, out, timeout_s, cancel, background, wide)
        finally:
            # A background compile took no idle worker, so it owes none: prestarting here, while an
            # upload's compile holds the only idle worker, left a second idle worker (~15 MiB) for
            # good once that one came back (measured: 1 in 3 density runs of 40 functions).
            if not background:
                self.prestart()

    def compile_fast(self, kind: str, wasm: bytes, timeout_s: float = DEFAULT_TIMEOUT_S,
                     cancel: threading.Event | None = None) -> bytes:
        """The serialised artefact of `wasm` compiled in the fast tier, passed back over the pipe (no
        file). Raises what `compile` raises."""
        try:
            return self._compile(kind, "fast", wasm, None, timeout_s, cancel, False)
        finally:
            self.prestart()

    def busy(self) -> dict[int, str]:
        """The process ids of the workers compiling, with the tier each compiles in."""
        with self._lock:
            return dict(self._busy)

    def _compile(self, kind: str, tier: str, wasm: bytes, out: Path | None, timeout_s: float,
                 cancel: threading.Event | None, background: bool, wide: bool = False) -> bytes:
        worker = self._take(background)
        pid = worker.proc.pid
        with self._lock:
            self._busy[pid] = tier
        try:
            return self._run(worker, kind, tier, wasm, out, timeout_s, cancel, wide)
        finally:
            with self._lock:
                self._busy.pop(pid, None)

    def _run(self, worker: _Worker, kind: str, tier: str, wasm: bytes, out: Path | None, timeout_s: float,
             cancel: threading.Event | None, wide: bool) -> bytes:
        try:
            artefact = worker.compile(kind, tier, wasm, out, timeout_s, cancel, wide)
        except _Cancelled:
            self._discard(worker, out)
            raise CompileError("the compile was cancelled") from None
        except _WorkerTimedOut:
            self._discard(worker, out)
            raise CompileError(
                f"compiling it took longer than the host's limit of {timeout_s:g} s "
                "(WASMINFER_COMPILE_TIMEOUT_S); a module this slow to compile is refused"
            ) from None
        except _WorkerDied:
            self._discard(worker, out)
            raise CompilerCrashed(
                "the compiler ran out of memory or crashed on it (the host allows "
                f"{self.memory_bytes >> 20} MiB per compile, WASMINFER_COMPILE_MEMORY_MB)"
            ) from None
        except CompileError:
            self._give_back(worker)  # the bytes were bad, not the worker
            raise
        except BaseException:
            self._discard(worker, out)  # the protocol state is unknown
            raise
        self.timings = worker.timings
        self._give_back(worker)
        return artefact

    @staticmethod
    def _discard(worker: _Worker, out: Path | None) -> None:
        worker.kill()
        if out is not None:
            _partial(out, worker.proc.pid).unlink(missing_ok=True)

    def prestart(self) -> None:
        """Starts a worker for the next compile unless one is idle already (it loads its interpreter
        and wasmtime while nothing waits for it)."""
        with self._lock:
            if self._idle or self._closed:
                return
            self.started += 1
        self._give_back(_Worker(self.memory_bytes))

    def prestart_background(self) -> None:
        """Starts the worker kept for background compiles unless it runs already: the first optimised
        compile would start it, and its interpreter's start (~100-300 ms of a core) would meet a new
        server's first uploads and requests."""
        with self._lock:
            if self._background is not None or self._closed:
                return
            self.started += 1
        self._give_back(_Worker(self.memory_bytes, background=True))

    def idle(self) -> list[int]:
        """The process ids of the idle workers."""
        with self._lock:
            return [w.proc.pid for w in self._idle]

    def _take(self, background: bool = False) -> _Worker:
        with self._lock:
            if background:
                worker, self._background = self._background, None
                if worker is not None:
                    if worker.proc.poll() is None:
                        return worker
                    worker.kill()
            else:
                while self._idle:
                    worker = self._idle.pop()
                    if worker.proc.poll() is None:
                        return worker
                    worker.kill()
            self.started += 1
        return _Worker(self.memory_bytes, background)

    def _give_back(self, worker: _Worker) -> None:
        with self._lock:
            if worker.background:
                if self._background is None and not self._closed:
                    self._background = worker
                    return
            elif len(self._idle) < MAX_IDLE_WORKERS:
                self._idle.append(worker)
                return
        worker.close()

    def close(self) -> None:
        """Stops the idle workers, and starts none ahead any more (a later compile starts its own)."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
            if self._background is not None:
                idle.append(self._background)
                self._background = None
        for worker in idle:
            worker.close()


def _partial(out: Path, pid: int) -> Path:
    """Where worker `pid` writes `out` before renaming it (two workers may compile one module)."""
    return out.with_name(f".tmp-{pid}-{out.name}")


_compiler: Compiler | None = None
_compiler_lock = threading.Lock()


def compiler() -> Compiler:
    """The process' compiler (its workers are shared by every engine: each job names its config)."""
    global _compiler
    with _compiler_lock:
        if _compiler is None:
            _compiler = Compiler()
            _at_exit(_compiler.close)
        return _compiler


def _at_exit(fn: Callable[[], None]) -> None:
    import atexit

    atexit.register(fn)


if __name__ == "__main__":
    _worker_main(int(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_MEMORY_BYTES,
                 int(sys.argv[2]) if len(sys.argv) > 2 else _NICE,
                 int(sys.argv[3]) if len(sys.argv) > 3 else KEEP_HEAP_BYTES)
