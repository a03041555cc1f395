"""`Platform`: the embedded default host replica joined with the durable store.

What the gateway (and the CLI's `serve`) talk to. It owns the order of every write: a function or
model is validated by the host first (compiled, prewarmed, loaded), then persisted; if persisting
fails the host goes back to what the store says. At start it redeploys everything the store holds,
with no re-upload, and compiled modules come from the host's disk cache (no recompile).

Tenancy: every method takes `tenant` (default `"default"`). Each tenant gets a `Host` of its own, so
its functions *and its models* live in their own namespace: a guest calls `infer("digits")` by a
bare name, and the runtime resolves that name in its host's one `ModelRegistry`; two tenants with a
model named `digits` therefore need two registries. Within a tenant, every function still shares
one ONNX Runtime session per model.

Threads: every method blocks (SQLite, compiling, loading models, running guests); the gateway calls
them on worker threads. Deploys, deletes and rollbacks are serialised by one lock (they are rare),
held only to swap what the host serves and write the store: guest code (a module's `_initialize`,
prewarming) runs before it is taken, under the function's own `timeout_ms`, so one tenant's slow
start holds up nobody else's deploy. `invoke` never takes it. Never imports starlette.

API keys (`api_keys.py`) and the digests replicas compare (`digests.py`) live in modules of their
own; the names the gateway and the CLI take from here are re-exported. This module is over 500
lines and still one concept: `Platform`, whose every operation (start-up, models, functions,
versions, keys, sync) is the same ordering of host and store.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wasminfer.api_keys import ConfiguredKey, KeyRing, Principal, parse_keys
from wasminfer.digests import deployment_digest, model_digest
from wasminfer.errors import (
    BadRequest,
    Conflict,
    FunctionLoadFailed,
    FunctionLoading,
    FunctionNotFound,
    ModelNotFound,
    Unavailable,
    WasminferError,
)
from wasminfer.manifest import Manifest
from wasminfer.models import ModelInfo
from wasminfer.models.options import ADDED_LATER
from wasminfer.runtime import DeployedFunction, Host, InvokeResult, LogLine, OutputStream
from wasminfer.runtime.memory import MemoryBudget, MemorySettings
from wasminfer.store import DEFAULT_TENANT, FunctionVersion, ModelRecord, Store, validate_name
from wasminfer.store.keys import SCOPES, check_known_scopes

__all__ = [
    "DEFAULT_TENANT",
    "SCOPES",
    "ConfiguredKey",
    "InvokeResult",
    "LogLine",
    "Platform",
    "Principal",
    "deployment_digest",
    "parse_keys",
]

log = logging.getLogger("wasminfer")

Progress = Callable[[str], None]


# --- what the platform hands out ------------------------------------------------------------------
@dataclass
class LoadReport:
    """What `Platform.start` redeployed from the store, and what it could not."""

    models: int = 0
    functions: int = 0
    from_cache: int = 0  # functions whose compiled module came from the disk cache
    failures: list[str] = field(default_factory=list)
    seconds: float = 0.0  # until ready
    loading: int = 0  # functions still loading (ready came first: see `Platform.start`)

    def to_dict(self) -> dict[str, Any]:
        return {
            "models": self.models,
            "functions": self.functions,
            "from_cache": self.from_cache,
            "failures": list(self.failures),
            "seconds": round(self.seconds, 3),
            "loading": self.loading,
        }


#: How long `Platform.start` waits for stored functions to load before it declares the platform
#: ready; functions still loading then serve when they are done (503 `function_loading` until then).
READY_WAIT_S = 10.0
#: Threads that load stored functions at start (a slow `_initialize` holds only its own).
LOAD_THREADS = 4


def _model_info(info: ModelInfo) -> dict[str, Any]:
    """The stable part of a `ModelInfo` (what the store keeps; load time and RSS vary per load),
    with the options it was loaded with (threads, batching), so that every later load is the same."""
    return {
        "inputs": [s.to_dict() for s in info.inputs],
        "outputs": [s.to_dict() for s in info.outputs],
        "metadata": dict(info.metadata),
        "options": _without_later_defaults(info.options()),
    }


def _without_later_defaults(options: Mapping[str, Any]) -> dict[str, Any]:
    """`options` without those added later that are at the value older versions have (`ADDED_LATER`):
    the store compares an upload's info with the latest version's, and the same bytes uploaded
    again must not become a new version."""
    return {k: v for k, v in options.items() if k not in ADDED_LATER or v != ADDED_LATER[k]}


def _load_options(options: Mapping[str, int | None] | None) -> dict[str, int]:
    """`ModelRegistry.load` keywords from stored or given options (None: the option's default).
    A version stored before options were kept has none: the defaults."""
    return {k: v for k, v in (options or {}).items() if v is not None}


def _stored_options(rec: ModelRecord) -> dict[str, int]:
    return _load_options(rec.info.get("options"))


def _module_info(fn: DeployedFunction) -> dict[str, Any]:
    """Imports, exports and initial memory of a deployed module or component (what `inspect` saw)."""
    compiled = fn.compiled
    info: dict[str, Any] = {
        "imports": [f"{i.module}.{i.name}" if i.name else i.module for i in compiled.imports],
        "exports": sorted(compiled.exports),
    }
    initial_memory = getattr(compiled, "initial_memory_bytes", None)  # core modules only
    if callable(initial_memory):
        info["initial_memory_bytes"] = initial_memory()
    return info


class _BlobAhead:
    """An upload's blob, written on a thread of `writers` while the upload compiles: its fsyncs (three,
    0.4-4 ms each on this machine) then overlap the compile instead of following it on the way to
    the reply. The store's own write after validation finds it there (and writes it itself if this
    one failed or could not start); a refused upload discards it, so it still leaves no blob
    (SECURITY.md). The threads are the platform's, kept between uploads: starting one per upload
    cost 0.26-0.42 ms on the upload's way (measured inside a digits upload, 15 of them)."""

    def __init__(self, writers: ThreadPoolExecutor, store: Store, data: bytes) -> None:
        self._store = store
        self._sha256: str | None = None
        try:
            self._done: Future[None] | None = writers.submit(self._put, data)
        except RuntimeError:  # the platform is closing: the store's own write says what happens
            self._done = None

    def _put(self, data: bytes) -> None:
        try:
            self._sha256 = self._store.blobs.put(data)
        except OSError:
            pass  # the store's own write raises it, if it comes to that

    def wait(self) -> None:
        if self._done is not None:
            self._done.result()

    def discard(self) -> None:
        self.wait()
        if self._sha256 is not None:
            try:
                self._store.discard_blob(self._sha256)
            except Exception:  # noqa: BLE001 - the refusal is the error to report; gc removes it later
                log.exception("could not discard the blob of a refused upload")


class Platform:
    """The store and this process' hosts, kept in step. Idempotent `close()`; a context manager.

    `start()` must run (once) before the platform serves; until it has finished, `ready` is False
    and every method but `authenticate` raises `Unavailable`.
    """

    def __init__(
        self, data_dir: str | Path, *, keys: Iterable[ConfiguredKey] = (), log_capacity: int = 2000,
        memory: MemorySettings | None = None,
    ) -> None:
        """Opens the store in `data_dir` (cheap; `start` loads it). `memory`: the host's memory
        budget and each tenant's quota (default `MemorySettings.from_env()`). Raises what `Store`
        raises, `BadRequest` for malformed memory settings in the environment."""
        self.data_dir = Path(data_dir)
        self.store = Store(self.data_dir)
        #: Writes uploads' blobs while they compile (`_BlobAhead`): one per upload in flight, up to this.
        self._blob_writers = ThreadPoolExecutor(max_workers=8, thread_name_prefix="wasminfer-blob")
        self.cache_dir = self.data_dir / "cache"
        self.keys = KeyRing(self.store, keys)
        self._hosts: dict[str, Host] = {}
        # One wasmtime engine per process (one epoch ticker, one compile cache), shared by the
        # tenants' hosts; each tenant gets its own host so its models live in its own registry.
        self._engine = Host.new_engine(self.cache_dir)
        self._log_capacity = log_capacity
        self.memory = MemoryBudget.from_settings(memory or MemorySettings.from_env())
        self._lock = threading.RLock()  # deploys, deletes, rollbacks, close: the swap and the store write
        self._start_lock = threading.Lock()
        # (tenant, function) -> ("loading", None) or ("failed", reason): stored functions `start` has
        # not (yet) loaded. Written under `_lock`; a deploy, rollback or delete of the name clears it.
        self._load_states: dict[tuple[str, str], tuple[str, str | None]] = {}
        self._ready = threading.Event()
        self._closed = False
        self.load_report: LoadReport | None = None
        #: No key anywhere: every request acts as the default tenant's admin (loopback only).
        self.open_access = not self.keys.any_key()

    # --- lifecycle ----------------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    def start(self, progress: Progress | None = None, *, load: bool = True,
              ready_wait_s: float = READY_WAIT_S) -> LoadReport:
        """Redeploys every stored model and the current version of every stored function.

        Functions load on `LOAD_THREADS` threads, outside the deploy lock, each instance start
        (`_initialize`) under its manifest's `timeout_ms`. The platform is ready once they all have
        loaded or after `ready_wait_s`, whichever comes first: one still loading then is in state
        "loading" (invoking it: 503 `function_loading`) until it is done. An item that fails to load
        is logged and listed in the report, a function also in state "failed" with the reason in its
        view (invoking it: 503 `function_load_failed`); the rest still serve. Idempotent: a second
        call returns the first report. `load=False` loads nothing (a host replica process: it takes
        each function from the store when the first request for it comes, see `sync`).
        """
        report_progress = progress or (lambda _msg: None)
        with self._start_lock:
            if self.load_report is not None:
                return self.load_report
            if self._closed:
                raise Unavailable("the platform is closed")
            started = time.perf_counter()
            report = LoadReport()
            jobs: list[tuple[Host, FunctionVersion]] = []
            for tenant in self.store.tenants() if load else []:
                host = self._ensure_host(tenant)
                for rec in self.store.list_models(tenant=tenant):
                    report_progress(f"loading model {tenant}/{rec.name} v{rec.version}")
                    try:
                        host.deploy_model(rec.name, self.store.blobs.get(rec.sha256), **_stored_options(rec))
                        report.models += 1
                    except (WasminferError, OSError) as exc:
                        self._failed(report, f"model {tenant}/{rec.name} v{rec.version}", exc)
                for fv in self.store.list_functions(tenant=tenant):
                    jobs.append((host, fv))
            with self._lock:
                for _, fv in jobs:
                    self._load_states[fv.tenant, fv.name] = ("loading", None)
                report.loading = len(jobs)
            done = self._load_functions(jobs, report, report_progress)
            done.wait(ready_wait_s)
            report.seconds = time.perf_counter() - started
            self.load_report = report
            self._ready.set()
            log.info(
                "loaded %d model(s) and %d function(s) (%d compiled modules from cache) in %.2f s%s",
                report.models,
                report.functions,
                report.from_cache,
                report.seconds,
                f"; {report.loading} function(s) still loading" if report.loading else "",
            )
            return report

    def warm_up(self) -> threading.Thread:
        """Does, on a daemon thread, what a new server's first uploads would otherwise wait for or
        meet (`WasmEngine.warm_up`): compiles the C SDK module that handler functions link to
        (`runtime/_sdk.py`, once per engine: ~12 ms of the first upload to a fresh server here; a
        disk-cache hit after a restart), and starts the worker of background compiles (whose start
        took a core for ~0.2 s a second after the first upload, in the middle of the next ones). A
        failure is logged: the first upload then compiles it, and says why if it cannot. Returns
        the thread."""

        def run() -> None:
            try:
                self._engine.warm_up()
            except Exception:  # noqa: BLE001 - a daemon's failure: logged, the upload retries
                if not self._closed:
                    log.exception("could not compile the SDK module ahead of the first upload")

        thread = threading.Thread(target=run, name="wasminfer-warm-up", daemon=True)
        thread.start()
        return thread

    def _load_functions(self, jobs: list[tuple[Host, FunctionVersion]], report: LoadReport,
                        progress: Progress) -> threading.Event:
        """Loads `jobs` on up to `LOAD_THREADS` daemon threads; the event is set when all are done."""
        done = threading.Event()
        pending = list(reversed(jobs))
        left = [len(jobs)]
        if not jobs:
            done.set()
            return done

        def work() -> None:
            while True:
                with self._lock:
                    if not pending:
                        return
                    host, fv = pending.pop()
                try:
                    self._load_function(host, fv, report, progress)
                except BaseException:  # a bug: never leave `start` waiting for it
                    log.exception("loading function %s/%s failed", fv.tenant, fv.name)
                with self._lock:
                    left[0] -= 1
                    if not left[0]:
                        done.set()

        for i in range(min(LOAD_THREADS, len(jobs))):
            threading.Thread(target=work, name=f"wasminfer-load-{i}", daemon=True).start()
        return done

    def _load_function(self, host: Host, fv: FunctionVersion, report: LoadReport, progress: Progress) -> None:
        key = (fv.tenant, fv.name)
        what = f"function {fv.tenant}/{fv.name} v{fv.version}"
        progress(f"deploying {what}")
        try:
            wasm = self.store.blobs.get(fv.sha256)
            fn = host.prepare_function(fv.name, wasm, Manifest.from_dict(fv.manifest))
        except (WasminferError, OSError) as exc:
            with self._lock:
                report.loading -= 1
                self._failed(report, what, exc)
                if self._load_states.get(key) == ("loading", None):
                    self._load_states[key] = ("failed", report.failures[-1].split(": ", 1)[1])
            return
        with self._lock:
            report.loading -= 1
            if self._load_states.get(key) != ("loading", None) or self._closed:
                host.discard_function(fn)  # deployed, rolled back or deleted since: that one stands
                return
            host.install_function(fn)
            del self._load_states[key]
            report.functions += 1
            report.from_cache += int(fn.compiled.from_cache)

    @staticmethod
    def _failed(report: LoadReport, what: str, exc: BaseException) -> None:
        message = exc.message if isinstance(exc, WasminferError) else str(exc)
        report.failures.append(f"{what}: {message}")
        log.error("could not load %s from the store: %s", what, message)

    def close(self) -> None:
        """Closes every host and the store. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._ready.clear()
            hosts = list(self._hosts.values())
            self._hosts.clear()
        for host in hosts:
            host.close()
        self._engine.close()
        self._blob_writers.shutdown(wait=True)  # uploads' blob writes in flight end before the store
        self.store.close()

    def __enter__(self) -> Platform:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_ready(self) -> None:
        if not self._ready.is_set():
            if self._closed:
                raise Unavailable("the server is shutting down")
            raise Unavailable("the server is starting: loading functions and models from the store")

    def _ensure_host(self, tenant: str) -> Host:
        host = self._hosts.get(tenant)
        if host is None:
            with self._lock:
                host = self._hosts.get(tenant)
                if host is None:
                    host = Host(cache_dir=self.cache_dir, log_capacity=self._log_capacity,
                                engine=self._engine, memory=self.memory.tenant(tenant))
                    self._hosts = {**self._hosts, tenant: host}  # copy-on-write: readers take no lock
        return host

    def host(self, tenant: str = DEFAULT_TENANT) -> Host:
        """The host serving `tenant`. Raises `KeyError` if the tenant has nothing deployed."""
        return self._hosts[tenant]

    def hosts(self) -> dict[str, Host]:
        """Every tenant's host (a snapshot)."""
        return dict(self._hosts)

    # --- auth ---------------------------------------------------------------------------------------
    def authenticate(self, key: str) -> Principal | None:
        """The principal of an API key (configured or stored), None if it is unknown or revoked."""
        return self.keys.authenticate(key)

    def add_key(self, scopes: Iterable[str], *, tenant: str = DEFAULT_TENANT) -> str:
        """Creates a stored API key and returns it (shown once). From then on keys are required.
        Raises `BadRequest` for an unknown scope, `InvalidName` for a bad tenant."""
        key = self.store.add_key(check_known_scopes(scopes), tenant=tenant)
        self.open_access = False
        return key

    # --- models -------------------------------------------------------------------------------------
    def put_model(
        self,
        name: str,
        data: bytes,
        *,
        options: Mapping[str, int | None] | None = None,
        tenant: str = DEFAULT_TENANT,
    ) -> dict[str, Any]:
        """Loads `data` as model `name` (ONNX Runtime validates it) with load `options` (threads and
        batching, see `ModelRegistry.load`; None values and missing ones take their defaults), then
        stores both as a new version.

        Returns the model's view with `created` (False when the bytes and options equal the latest
        version's). Raises `InvalidName`, `InvalidModel`, `BadRequest` (an option out of range, or
        batching asked of a model without a batch dimension); on a store failure the host goes back
        to the stored version (or drops the model) and the error propagates.
        """
        validate_name("tenant", tenant)
        validate_name("model", name)
        self._check_ready()
        with self._lock:
            host = self._ensure_host(tenant)
            info = host.deploy_model(name, data, **_load_options(options))
            try:
                rec = self.store.put_model(name, data, _model_info(info), tenant=tenant)
            except BaseException:
                self._restore_model(host, name, tenant)
                raise
        return {**self._model_view(rec, host), "created": rec.created}

    def patch_model(
        self, name: str, changes: Mapping[str, int | None], *, tenant: str = DEFAULT_TENANT
    ) -> dict[str, Any]:
        """Changes load options of model `name` (a None value: back to the default) without a new
        upload: its latest bytes are loaded again with the merged options and stored as a new
        version. Turning batching off (`max_batch_size` 0 or None) drops its other knobs.
        Raises `InvalidName`, `ModelNotFound`, `BadRequest`."""
        validate_name("model", name)
        self._check_ready()
        rec = self.store.get_model(name, tenant=tenant)
        merged = {**(rec.info.get("options") or {}), **changes}
        if (merged.get("max_batch_size") or 0) < 2:
            for knob in ("max_queue_delay_us", "max_concurrent_batches"):
                if knob not in changes:
                    merged.pop(knob, None)
        return self.put_model(name, self.store.blobs.get(rec.sha256), options=merged, tenant=tenant)

    def _restore_model(self, host: Host, name: str, tenant: str) -> None:
        try:
            rec = self.store.get_model(name, tenant=tenant)
            host.deploy_model(name, self.store.blobs.get(rec.sha256), **_stored_options(rec))
        except ModelNotFound:
            if not any(name in f.manifest.models for f in host.functions()):
                host.remove_model(name)
        except Exception:  # the original error matters more; this one is only logged
            log.exception("could not restore model %s/%s after a failed store write", tenant, name)

    def _model_view(self, rec: ModelRecord, host: Host | None) -> dict[str, Any]:
        view = rec.to_dict()
        view.update({k: v for k, v in rec.info.items() if k in ("inputs", "outputs", "metadata", "options")})
        if isinstance(view.get("options"), dict):  # what a stored version left out is at its default
            view["options"] = {**ADDED_LATER, **view["options"]}
        view["loaded"] = host is not None and rec.name in host.models
        if host is not None and rec.name in host.models:
            live = host.models.get(rec.name)
            view.setdefault("options", live.options())  # a version stored before options were kept
            view["load_seconds"] = round(live.load_seconds, 6)
            view["resident_bytes"] = live.resident_bytes
            view["run_plan"] = live.run_plan.to_dict() if live.run_plan else None
            view["users"] = sorted(f.name for f in host.functions() if rec.name in f.manifest.models)
            view["stats"] = host.models.stats(rec.name).to_dict()
        return view

    def list_models(self, *, tenant: str = DEFAULT_TENANT) -> list[dict[str, Any]]:
        """The latest version of every model of `tenant`, by name."""
        self._check_ready()
        host = self._hosts.get(tenant)
        return [self._model_view(rec, host) for rec in self.store.list_models(tenant=tenant)]

    def get_model(self, name: str, *, tenant: str = DEFAULT_TENANT) -> dict[str, Any]:
        """Raises `InvalidName`, `ModelNotFound`."""
        self._check_ready()
        rec = self.store.get_model(name, tenant=tenant)
        view = self._model_view(rec, self._hosts.get(tenant))
        view["versions"] = [
            {
                "version": r.version,
                "sha256": r.sha256,
                "size": r.size,
                "created_at": r.to_dict()["created_at"],
            }
            for r in self.store.list_model_versions(name, tenant=tenant)
        ]
        return view

    def delete_model(self, name: str, *, tenant: str = DEFAULT_TENANT) -> None:
        """Raises `InvalidName`, `ModelNotFound`, `Conflict` while a deployed or stored function's
        manifest names the model (then nothing changes)."""
        validate_name("model", name)
        self._check_ready()
        with self._lock:
            host = self._hosts.get(tenant)
            users = sorted(f.name for f in host.functions() if name in f.manifest.models) if host else []
            if users:
                raise Conflict(
                    f"model {name!r} is used by function(s) {', '.join(repr(u) for u in users)}: deploy "
                    "them without it in their manifest key 'models', or delete them, first"
                )
            self.store.delete_model(name, tenant=tenant)
            if host is not None and name in host.models:
                host.remove_model(name)

    # --- functions ----------------------------------------------------------------------------------
    def put_function(
        self,
        name: str,
        wasm: bytes,
        manifest: Manifest | Mapping[str, Any] | None = None,
        *,
        tenant: str = DEFAULT_TENANT,
    ) -> dict[str, Any]:
        """Validates, compiles and prewarms `wasm` in the host, then stores it as a new version.

        Returns the version's view with `created` (False if it equals the current version) and the
        detected `abi`. Raises `InvalidName`, `InvalidManifest`, `InvalidModule`, `ModelNotFound`
        (the manifest names a model this tenant has not deployed). A failed deploy leaves the
        previous version serving; a failed store write puts it back in the host.
        """
        validate_name("tenant", tenant)
        validate_name("function", name)
        m = manifest if isinstance(manifest, Manifest) else Manifest.from_dict(manifest or {})
        self._check_ready()
        # Compile and start the instances (the guest's `_initialize`, under its timeout) before taking
        # the deploy lock: a module slow to compile or to start holds up no other deploy.
        host = self._ensure_host(tenant)
        blob = _BlobAhead(self._blob_writers, self.store, wasm)
        try:
            fn = host.prepare_function(name, wasm, m, inspected=host.inspect(wasm))
        except BaseException:
            blob.discard()
            raise
        blob.wait()
        with self._lock:
            host.install_function(fn)
            self._load_states.pop((tenant, name), None)
            try:
                fv = self.store.put_function(name, wasm, fn.manifest.to_dict(), fn.abi, _module_info(fn),
                                             tenant=tenant)
            except BaseException:
                self._restore_function(host, name, tenant)
                blob.discard()
                raise
            return {**self._function_view(fv, host), "created": fv.created}

    def _restore_function(self, host: Host, name: str, tenant: str) -> None:
        try:
            fv = self.store.get_function(name, tenant=tenant)
            host.deploy_function(name, self.store.blobs.get(fv.sha256), Manifest.from_dict(fv.manifest))
        except FunctionNotFound:
            host.remove_function(name)
        except Exception:
            log.exception("could not restore function %s/%s after a failed store write", tenant, name)

    def _function_view(self, fv: FunctionVersion, host: Host | None) -> dict[str, Any]:
        view = fv.to_dict()
        fn = _deployed(host, fv.name)
        view["loaded"] = fn is not None and fn.version == fv.sha256
        loaded = ("ready" if fn is not None else "stopped", None)
        state, reason = self._load_states.get((fv.tenant, fv.name), loaded)
        view["state"] = state  # ready | loading | failed (at start: `load_error` says why) | stopped
        if reason is not None:
            view["load_error"] = reason
        if fn is not None:
            live = fn.describe()
            module = live["module"]
            if fv.tenant != DEFAULT_TENANT:
                # The compile cache is shared by every tenant: a hit on an upload would tell this
                # tenant that another one uploaded the same bytes (so would a first tier "optimised").
                # Only the operator's tenant sees them.
                module = {k: v for k, v in module.items() if k not in ("from_cache", "tier", "tier_error")}
            view.update(counters=live["counters"], instances=live["instances"], module=module)
        return view

    def list_functions(self, *, tenant: str = DEFAULT_TENANT) -> list[dict[str, Any]]:
        """The current version of every function of `tenant`, by name, with live counters."""
        self._check_ready()
        host = self._hosts.get(tenant)
        return [self._function_view(fv, host) for fv in self.store.list_functions(tenant=tenant)]

    def get_function(self, name: str, *, tenant: str = DEFAULT_TENANT) -> dict[str, Any]:
        """The current version, every version, counters and instances. Raises `FunctionNotFound`."""
        self._check_ready()
        versions = self.store.list_versions(name, tenant=tenant)
        current = next(v for v in versions if v.is_current)
        view = self._function_view(current, self._hosts.get(tenant))
        view["versions"] = [_version_summary(v) for v in versions]
        return view

    def versions(self, name: str, *, tenant: str = DEFAULT_TENANT) -> list[dict[str, Any]]:
        """Every version of `name`, oldest first. Raises `FunctionNotFound`."""
        self._check_ready()
        return [v.to_dict() for v in self.store.list_versions(name, tenant=tenant)]

    def delete_function(self, name: str, *, tenant: str = DEFAULT_TENANT) -> None:
        """Deletes every version and stops serving it. Raises `InvalidName`, `FunctionNotFound`."""
        self._check_ready()
        with self._lock:
            self.store.delete_function(name, tenant=tenant)
            self._load_states.pop((tenant, name), None)
            host = self._hosts.get(tenant)
            if _deployed(host, name) is not None:
                assert host is not None
                host.remove_function(name)

    def rollback(
        self, name: str, version: int | None = None, *, tenant: str = DEFAULT_TENANT
    ) -> dict[str, Any]:
        """Makes `version` (default: the one before the current) current, in the host first.

        Raises `BadRequest` (version < 1), `FunctionNotFound` (no such function or version),
        `Conflict` (no earlier version), and what deploying that version raises (e.g.
        `ModelNotFound` if a model it names was deleted since); then nothing changes.
        """
        self._check_ready()
        if version is not None and version < 1:
            raise BadRequest(f"a version is a positive integer, not {version}")
        versions = self.store.list_versions(name, tenant=tenant)
        current = next(v for v in versions if v.is_current)
        if version is None:
            earlier = [v for v in versions if v.version < current.version]
            if not earlier:
                raise Conflict(f"function {name!r} has no version before {current.version} to roll back to")
            target = earlier[-1]
        else:
            matching = [v for v in versions if v.version == version]
            if not matching:
                raise FunctionNotFound(name, str(version))
            target = matching[0]
        host = self._ensure_host(tenant)
        fn = None
        if target.version != current.version or _deployed(host, name) is None:
            # Started before the lock is taken, as in `put_function`.
            fn = host.prepare_function(name, self.store.blobs.get(target.sha256),
                                       Manifest.from_dict(target.manifest))
        with self._lock:
            if fn is not None:
                host.install_function(fn)
                self._load_states.pop((tenant, name), None)
            try:
                fv = self.store.rollback(name, target.version, tenant=tenant)
            except BaseException:
                self._restore_function(host, name, tenant)
                raise
            return self._function_view(fv, host)

    # --- invocations --------------------------------------------------------------------------------
    def invoke(
        self,
        name: str,
        body: bytes,
        content_type: str = "application/octet-stream",
        *,
        tenant: str = DEFAULT_TENANT,
        stream: OutputStream | None = None,
    ) -> InvokeResult:
        """Runs one request through function `name` of `tenant` (see `Host.invoke` for the errors and
        `stream`). Raises `Unavailable` before `start` has finished."""
        if not self._ready.is_set():
            self._check_ready()
        host = self._hosts.get(tenant)
        try:
            if host is None:
                raise FunctionNotFound(name)
            return host.invoke(name, body, content_type, stream=stream)
        except FunctionNotFound:
            self._raise_load_state(tenant, name)
            raise

    def _raise_load_state(self, tenant: str, name: str) -> None:
        """Raises `FunctionLoading` or `FunctionLoadFailed` for a stored function `start` has not
        loaded (yet); returns for any other."""
        state, reason = self._load_states.get((tenant, name), (None, None))
        if state == "loading":
            raise FunctionLoading(f"function {name!r} is still loading after a restart; retry")
        if state == "failed":
            raise FunctionLoadFailed(f"function {name!r} failed to load after a restart: {reason} "
                                     "(deploy it again to replace it)")

    # --- host replicas --------------------------------------------------------------------------------
    def deployed(self, name: str, *, tenant: str = DEFAULT_TENANT) -> DeployedFunction:
        """The function as this platform serves it (what the router reads: manifest, digest).
        Raises `FunctionNotFound`, `Unavailable` before `start` has finished."""
        if not self._ready.is_set():
            self._check_ready()
        host = self._hosts.get(tenant)
        try:
            if host is None:
                raise FunctionNotFound(name)
            return host.function(name)
        except FunctionNotFound:
            self._raise_load_state(tenant, name)
            raise

    def sync(self, name: str, deployment: str, *, tenant: str = DEFAULT_TENANT) -> None:
        """Makes this platform serve the `deployment` (a `deployment_digest`) of function `name`: if
        its copy is missing or differs, it reloads the function's current version, and the models
        its manifest names, from the store. How a host replica process learns of deploys made by
        the gateway's process: lazily, by the digest each routed request carries.

        Raises `FunctionNotFound` (deleted from the store meanwhile), and what a deploy raises.
        """
        fn = _deployed(self._hosts.get(tenant), name)
        if fn is not None and deployment_digest(fn) == deployment:
            return
        self._load_current(name, tenant, deployment)

    def refresh(self, name: str, *, tenant: str = DEFAULT_TENANT) -> None:
        """Makes this platform serve what the store holds now for function `name`: its current
        version and the models its manifest names, reloaded only where they differ. How a replica
        process that takes its own connections follows deploys made by another process (after the
        store's change mark moved, `store.changes`).

        Raises `FunctionNotFound` when the store has no such function (a copy this platform still
        holds is dropped first), and what a deploy raises."""
        try:
            self._load_current(name, tenant)
        except FunctionNotFound:
            with self._lock:
                host = self._hosts.get(tenant)
                if _deployed(host, name) is not None:
                    assert host is not None
                    host.remove_function(name)
            raise

    def _load_current(self, name: str, tenant: str, deployment: str | None = None) -> None:
        """`sync` and `refresh`: the store's current version of `name` and its models, loaded where
        this platform's copy differs (or, with `deployment`, unless the copy has that digest)."""
        with self._lock:
            self._check_ready()
            host = self._ensure_host(tenant)
            fn = _deployed(host, name)
            if deployment is not None and fn is not None and deployment_digest(fn) == deployment:
                return
            fv = self.store.get_function(name, tenant=tenant)
            manifest = Manifest.from_dict(fv.manifest)
            changed = False
            for model in manifest.models:
                rec = self.store.get_model(model, tenant=tenant)
                stored = rec.info.get("options") or {}
                if model not in host.models or model_digest(host.models.get(model)) != model_digest(
                    rec.sha256, stored
                ):
                    host.deploy_model(model, self.store.blobs.get(rec.sha256), **_load_options(stored))
                    changed = True
        if fn is None or fn.version != fv.sha256 or fn.manifest != manifest:
            # Started outside the lock, as in `put_function`; installed if still the current version.
            prepared = host.prepare_function(name, self.store.blobs.get(fv.sha256), manifest)
            with self._lock:
                now = self.store.get_function(name, tenant=tenant)
                if now.sha256 != fv.sha256 or Manifest.from_dict(now.manifest) != manifest:
                    host.discard_function(prepared)
                    return
                host.install_function(prepared)
            changed = True
        if changed:
            log.info("replica: synced %s/%s to version %d from the store", tenant, name, fv.version)

    def logs(
        self, name: str, n: int = 200, since: float | None = None, *, tenant: str = DEFAULT_TENANT
    ) -> list[LogLine]:
        """The last `n` log lines of `name` newer than `since` (Unix time). Raises `FunctionNotFound`."""
        self._check_ready()
        host = self._hosts.get(tenant)
        if _deployed(host, name) is None:
            self.store.get_function(name, tenant=tenant)  # raises FunctionNotFound if it does not exist
            return []  # stored but not loaded (it failed to load at start: see the report)
        assert host is not None
        return host.logs(name, n, since)

    def memory_view(self, tenant: str = DEFAULT_TENANT) -> dict[str, Any]:
        """The host's memory budget and what every tenant reserves together, and `tenant`'s own
        quota and reservations (`TenantMemory.stats`)."""
        snap = self.memory.snapshot()
        own = snap["tenants"].get(tenant) or self.memory.tenant(tenant).stats()
        return {"budget_bytes": snap["budget_bytes"], "used_bytes": snap["used_bytes"], "tenant": own}

    def stats(self) -> dict[str, dict[str, Any]]:
        """`Host.stats()` of every tenant's host, by tenant (for metrics)."""
        return {tenant: host.stats() for tenant, host in self._hosts.items()}


def _deployed(host: Host | None, name: str) -> DeployedFunction | None:
    if host is None:
        return None
    try:
        return host.function(name)
    except FunctionNotFound:
        return None


def _version_summary(v: FunctionVersion) -> dict[str, Any]:
    d = v.to_dict()
    return {k: d[k] for k in ("version", "sha256", "size", "abi", "created_at", "is_current")}
