"""The Ray backend: host replicas as Ray actors across a Ray cluster (`wasminfer serve --ray`).

Each actor (`HostActor`) is a whole host, like a local worker process: a `Platform` with its own
pools, its own instance autoscaler and one ONNX Runtime session per model. The gateway runs beside
the cluster's head as a Ray driver; the fleet (routing, admission, draining, the replica autoscaler)
is the same as for every backend, and Ray's own autoscaler (or KubeRay) adds the machines the
actors ask for. Nothing of Ray is imported until this backend is used: the single-machine path
never pays for it (an actor call costs ~1 ms, more than the whole HTTP overhead of a request).

How a function reaches an actor — from the durable store, never re-uploaded per actor:

- an actor on the gateway's own Ray node opens the gateway's data folder (SQLite in WAL mode and
  the blob store are safe for several processes) and reloads a function, and its models, from it
  when a request carries a deployment digest it does not hold (`Platform.sync`, as a worker does);
- an actor on any other node keeps a private data folder. The gateway reads the function's current
  version and its models' blobs from its store and puts each blob in Ray's object store once (by
  sha256, shared by every actor and every deployment that uses it); a request the actor is not
  synced for carries the object refs, and the actor fetches the bytes (Ray moves an object to a
  node once) and deploys them into its private platform.

A new actor loads the functions the fleet warms it with before it takes requests.

Failures: an actor runs with `max_restarts=0` — the fleet, not Ray, replaces a lost replica (it
learns of it at its next tick, and the replacement is warmed like any new replica). A request in
flight on an actor that dies (its process, its node) fails with `Unavailable` (503, "retry"), or,
when the function's manifest says `idempotent`, is sent once more to another replica. A request
routed to an actor already known dead never reached it, and goes elsewhere. The store is only ever
written by the gateway: losing an actor loses nothing stored.

Over 500 lines and one concept: replicas as Ray actors, the actor (`HostActor`) and the backend
that starts, feeds and calls it being the two ends of one protocol.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import shutil
import signal
import socket
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio.to_thread

from wasminfer.digests import deployment_digest, model_digest
from wasminfer.errors import (
    LostWithIdempotentRequest,
    NotDelivered,
    Unavailable,
    WasminferError,
    error_from_dict,
)
from wasminfer.manifest import Manifest
from wasminfer.replicas.base import Replica, ReplicaBackend, ReplicaStats, WarmSpec
from wasminfer.runtime import InvokeResult
from wasminfer.scaling import ScalingConfig
from wasminfer.service import Platform

log = logging.getLogger("wasminfer.replicas")

_CONTROL = "control"  # the actor's concurrency group for stats, warm-up and close: never behind invocations
_NEED_BUNDLE = "need-bundle"  # an actor's answer: "send me the function's blobs with this request"
#: How long an actor waits for a blob from Ray's object store. A blob within the upload limits moves
#: between nodes in seconds; past this the transfer is broken, and a thread stuck in `ray.get` would
#: hold the actor's sync lock (every later deploy on it) for good.
FETCH_TIMEOUT_S = 60.0

#: What the gateway sends an actor on another node with a request it may not be synced for:
#: {"function": (sha256, manifest, ref), "models": [(name, sha256, ref, options), …]} (refs into Ray's
#: object store).
Bundle = dict[str, Any]


@dataclass
class _Actor:
    handle: Any  # ray.actor.ActorHandle
    node: str = ""  # the Ray node id it was placed on
    host: str = ""
    shared_store: bool = False  # it opened the gateway's data folder (else: blobs via the object store)
    synced: dict[tuple[str, str], str] = field(default_factory=dict)  # (tenant, name) -> deployment
    lost: str | None = None  # why the gateway knows it is gone


class RayBackend(ReplicaBackend):
    """Host replicas as Ray actors. Connects to Ray at the first `start` (`address`: "auto", a GCS
    address host:port, "ray://…" for Ray Client, or "local" to start a private one-node Ray here);
    a driver connection made by someone else (`ray.init` before) is used as it is and left open."""

    kind = "ray"

    def __init__(
        self,
        platform: Platform,
        config: ScalingConfig | None = None,
        *,
        threads: int = 64,
        address: str | None = None,
        log_level: str = "warning",
    ) -> None:
        self.platform = platform
        self.config = config = config or ScalingConfig()
        self.address = address if address is not None else config.ray_address
        self.threads = threads
        self.log_level = log_level
        self.data_dir = Path(platform.data_dir).resolve()
        self._ids = itertools.count(1)
        self._connected = False
        self._owns_ray = False
        self._node = ""  # the gateway's Ray node id ("" under Ray Client: every actor is remote)
        self._actor_class: Any = None
        self._connect_lock = threading.Lock()
        self._blobs: dict[str, Any] = {}  # sha256 -> ObjectRef in Ray's object store
        self._bundles: dict[tuple[str, str], tuple[str, Bundle]] = {}  # key -> (deployment, bundle)
        self._blob_lock = threading.Lock()

    # --- connecting ---------------------------------------------------------------------------------
    def _connect(self) -> None:
        with self._connect_lock:
            if self._connected:
                return
            try:
                import ray
            except ImportError:
                raise Unavailable("the Ray replica backend needs Ray: pip install 'wasminfer[ray]'") from None
            if not ray.is_initialized():
                # Ray's core worker installs abseil's failure-signal handler in the driver, and that
                # one takes SIGTERM too: it prints a stack and kills the process by the signal, so the
                # gateway's graceful shutdown (uvicorn's SIGTERM handler) never runs.
                os.environ.setdefault("RAY_DISABLE_FAILURE_SIGNAL_HANDLER", "1")
                try:
                    ray.init(
                        # Ray's own "local": a new instance; None would join $RAY_ADDRESS or the
                        # cluster last started on this machine
                        address=self.address,
                        namespace=self.config.ray_namespace,
                        log_to_driver=False,
                        configure_logging=False,
                    )
                except (ConnectionError, RuntimeError, ValueError) as exc:
                    raise Unavailable(
                        f"cannot connect to the Ray cluster at {self.address!r}: {exc}"
                    ) from None
                self._owns_ray = True
            try:  # under Ray Client the driver is on no node: the data folder is on no node either
                client = self.address.startswith("ray://")
                self._node = "" if client else ray.get_runtime_context().get_node_id() or ""
            except Exception:
                self._node = ""
            # Stats, warm-up and close have threads of their own: never queued behind invocations.
            self._actor_class = ray.remote(concurrency_groups={_CONTROL: 2})(HostActor)  # type: ignore[call-overload]
            self._connected = True
            log.info("connected to Ray (%s); the gateway is on node %s", self.address, self._node[:8] or "-")

    # --- the interface ------------------------------------------------------------------------------
    async def start(self, warm: Sequence[WarmSpec] = ()) -> Replica:
        await anyio.to_thread.run_sync(self._connect)  # first: says how to install Ray if it is missing
        if self._owns_ray:  # a driver connection someone else made is theirs, signals included
            _take_back_signals()
        import ray

        cfg = self.config
        rid = f"ray-{next(self._ids)}"
        handle = self._actor_class.options(
            num_cpus=cfg.ray_num_cpus,
            max_concurrency=self.threads,
            max_restarts=0,
            scheduling_strategy="SPREAD" if cfg.ray_spread else "DEFAULT",
        ).remote(rid, str(self.data_dir), self._node, cfg.instance_options(), self.log_level)
        actor = _Actor(handle)
        replica = Replica(rid, self, handle=actor, capacity=self.threads + cfg.host_max_queue)
        try:
            try:
                info = await asyncio.wait_for(
                    _await(handle.ready.options(concurrency_group=_CONTROL).remote()), cfg.ray_start_timeout_s
                )
            except TimeoutError:
                actor.lost = "not placed"
                raise Unavailable(
                    f"replica {rid} was not placed on a Ray node within {cfg.ray_start_timeout_s:g} s "
                    f"(scaling key 'ray_start_timeout_s'): no node has {cfg.ray_num_cpus:g} CPU free "
                    "(scaling key 'ray_num_cpus'); Ray's autoscaler may still be adding one"
                ) from None
            except ray.exceptions.RayError as exc:
                actor.lost = "failed to start"
                raise Unavailable(f"replica {rid} failed to start on Ray: {_first_line(exc)}") from None
            actor.node, actor.host, actor.shared_store = info["node"], info["host"], info["shared_store"]
            replica.pid = info["pid"]
            if warm:
                try:
                    await self._warm(replica, warm)
                except ray.exceptions.RayError as exc:
                    actor.lost = _first_line(exc)
                    raise Unavailable(
                        f"replica {rid} was lost while loading its functions: {actor.lost}"
                    ) from None
        except BaseException:
            await self.stop(replica)
            raise
        log.info(
            "replica %s serving: a Ray actor on node %s (%s, pid %d), %s",
            rid,
            actor.node[:8],
            actor.host,
            replica.pid,
            "on the gateway's data folder" if actor.shared_store else "functions through Ray's object store",
        )
        return replica

    async def _warm(self, replica: Replica, warm: Sequence[WarmSpec]) -> None:
        actor: _Actor = replica.handle
        items = []
        for tenant, name, deployment in warm:
            try:
                bundle = None if actor.shared_store else await self._bundle(tenant, name, deployment)
            except WasminferError as exc:  # deleted meanwhile
                log.warning("replica %s: not warming %s/%s: %s", replica.id, tenant, name, exc.message)
                continue
            items.append((tenant, name, deployment, bundle))
        limit = self.config.ray_start_timeout_s
        try:
            outcome: dict[str, str] = await asyncio.wait_for(
                _await(actor.handle.warm.options(concurrency_group=_CONTROL).remote(items)), limit
            )
        except TimeoutError:
            # Never a replica that is neither serving nor gone: the fleet would count it as
            # starting for good and start no other.
            actor.lost = "did not load its functions in time"
            raise Unavailable(
                f"replica {replica.id} did not load the {len(items)} function(s) it was warmed with "
                f"within {limit:g} s (scaling key 'ray_start_timeout_s')"
            ) from None
        for tenant, name, deployment, _ in items:
            if outcome.get(f"{tenant}/{name}") == "ok":
                replica.warm.add((tenant, name))
                actor.synced[tenant, name] = deployment
        failed = {k: v for k, v in outcome.items() if v != "ok"}
        if failed:
            log.warning("replica %s could not load every function routed to it: %s", replica.id, failed)

    async def stop(self, replica: Replica) -> None:
        import ray

        actor: _Actor = replica.handle
        if actor.lost is None:
            try:  # the fleet drained it: close its platform (pools, sessions, a private folder)
                await asyncio.wait_for(
                    _await(actor.handle.close.options(concurrency_group=_CONTROL).remote()), 30
                )
            except (TimeoutError, ray.exceptions.RayError) as exc:
                log.warning("replica %s did not close cleanly: %s", replica.id, _first_line(exc))
        await anyio.to_thread.run_sync(lambda: ray.kill(actor.handle, no_restart=True))
        actor.lost = actor.lost or "stopped"

    async def route(
        self, replica: Replica, tenant: str, name: str, deployment: str, body: bytes, content_type: str
    ) -> InvokeResult:
        import ray

        actor: _Actor = replica.handle
        if actor.lost is not None:
            raise NotDelivered(f"replica {replica.id} is gone ({actor.lost}); retry")
        key = (tenant, name)
        bundle = None
        if not actor.shared_store and actor.synced.get(key) != deployment:
            bundle = await self._bundle(tenant, name, deployment)
        patience = self._patience_s(tenant, name)
        for attempt in (1, 2):
            call = actor.handle.invoke.remote(tenant, name, deployment, body, content_type, bundle)
            try:
                async with asyncio.timeout(patience):  # no task of its own, unlike wait_for: ~50 µs less
                    out = await call
            except TimeoutError:
                # The replica answers every request within the function's own timeout; past this
                # much more, the hop is broken. Never hold a request (and a drain) forever.
                raise Unavailable(
                    f"replica {replica.id} did not answer within {patience:g} s (twice the function's "
                    "timeout_ms, plus 30 s); retry"
                ) from None
            except ray.exceptions.RayTaskError as exc:  # a bug in the actor's own code
                log.error("replica %s failed on %s/%s: %s", replica.id, tenant, name, exc)
                raise WasminferError("internal server error (in a Ray replica)") from None
            except ray.exceptions.RayError as exc:
                raise self._lost(replica, exc, tenant, name) from None
            if out == _NEED_BUNDLE and attempt == 1:  # its copy changed under the gateway's feet
                bundle = await self._bundle(tenant, name, deployment, fresh=True)
                continue
            break
        if isinstance(out, tuple):
            if not actor.shared_store:
                actor.synced[key] = deployment
            body, ctype, queue_us, start_us, run_us, infer_us, cold, invocation = out
            return InvokeResult(
                body, ctype, queue_us, start_us, run_us, infer_us, cold, f"{replica.id}.{invocation}"
            )
        if isinstance(out, dict):
            raise error_from_dict(out)
        raise Unavailable(f"replica {replica.id} could not load function {name!r} from the store; retry")

    def _lost(self, replica: Replica, exc: Exception, tenant: str, name: str) -> WasminferError:
        import ray

        actor: _Actor = replica.handle
        what = _first_line(exc)
        if not isinstance(exc, getattr(ray.exceptions, "ActorUnavailableError", ())):
            actor.lost = what  # dead for good (max_restarts=0): the next tick replaces it
        where = f"replica {replica.id} (a Ray actor on {actor.host or 'a node'})"
        if self._idempotent(tenant, name):
            log.warning("%s was lost with a request of idempotent %s/%s: sent again", where, tenant, name)
            return LostWithIdempotentRequest(f"{where} was lost while running the request: {what}; retry")
        return Unavailable(
            f"{where} was lost while running the request (it may or may not have run): {what}; retry, "
            "or mark the function idempotent (manifest key 'idempotent') to have it retried once"
        )

    def _patience_s(self, tenant: str, name: str) -> float:
        try:
            return 2 * self.platform.deployed(name, tenant=tenant).manifest.timeout_ms / 1000 + 30
        except WasminferError:
            return 60.0

    def _idempotent(self, tenant: str, name: str) -> bool:
        try:
            return self.platform.deployed(name, tenant=tenant).manifest.idempotent
        except WasminferError:
            return False

    async def stats(self, replica: Replica) -> ReplicaStats:
        import ray

        actor: _Actor = replica.handle
        if actor.lost is not None:
            return ReplicaStats(alive=False)
        try:
            data = await asyncio.wait_for(
                _await(actor.handle.stats.options(concurrency_group=_CONTROL).remote()), 5.0
            )
        except TimeoutError:  # busy (or unreachable for now): keep the last reading
            return ReplicaStats(cpu=replica.stats.cpu, functions=replica.stats.functions)
        except ray.exceptions.RayError as exc:
            if isinstance(exc, getattr(ray.exceptions, "ActorUnavailableError", ())):
                return ReplicaStats(cpu=replica.stats.cpu, functions=replica.stats.functions)
            actor.lost = _first_line(exc)
            log.warning("replica %s is gone: %s", replica.id, actor.lost)
            return ReplicaStats(alive=False)
        return ReplicaStats(cpu=data["cpu"], functions=data["functions"], decisions=data["decisions"])

    async def aclose(self) -> None:
        with self._blob_lock:
            self._blobs.clear()  # the gateway owns these objects: dropping the refs frees them
            self._bundles.clear()
        if self._owns_ray:
            import ray

            await anyio.to_thread.run_sync(ray.shutdown)
            self._owns_ray = self._connected = False

    # --- functions through Ray's object store -------------------------------------------------------
    async def _bundle(self, tenant: str, name: str, deployment: str, *, fresh: bool = False) -> Bundle:
        cached = self._bundles.get((tenant, name))
        if cached is not None and cached[0] == deployment and not fresh:
            return cached[1]
        bundle = await anyio.to_thread.run_sync(self._make_bundle, tenant, name)
        self._bundles[tenant, name] = (deployment, bundle)
        return bundle

    def _make_bundle(self, tenant: str, name: str) -> Bundle:
        """The current version of a function and its models, as refs into Ray's object store (each
        blob put there once). Raises `FunctionNotFound`, `ModelNotFound` (deleted meanwhile)."""
        store = self.platform.store
        fv = store.get_function(name, tenant=tenant)
        models = []
        for model in Manifest.from_dict(fv.manifest).models:
            rec = store.get_model(model, tenant=tenant)
            models.append((model, rec.sha256, self._blob(rec.sha256), rec.info.get("options") or {}))
        bundle = {"function": (fv.sha256, fv.manifest, self._blob(fv.sha256)), "models": models}
        self._forget_unused_blobs()
        return bundle

    def _blob(self, sha256: str) -> Any:
        with self._blob_lock:
            ref = self._blobs.get(sha256)
        if ref is None:
            import ray

            ref = ray.put(self.platform.store.blobs.get(sha256))
            with self._blob_lock:
                ref = self._blobs.setdefault(sha256, ref)
        return ref

    def _forget_unused_blobs(self) -> None:
        """Drops the blobs no cached bundle names any more (older versions): Ray frees them once no
        actor holds them either."""
        with self._blob_lock:
            used = {sha for _, b in self._bundles.values() for sha in _bundle_shas(b)}
            if len(self._blobs) > len(used) + 16:
                for sha in set(self._blobs) - used:
                    del self._blobs[sha]


def _bundle_shas(bundle: Bundle) -> list[str]:
    return [bundle["function"][0], *(sha for _, sha, *_ in bundle["models"])]


async def _await(ref: Any) -> Any:
    """An ObjectRef as a coroutine (what `asyncio.wait_for` and the type checker want)."""
    return await ref


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:300]


# --- the actor ------------------------------------------------------------------------------------
class HostActor:
    """One host replica inside a Ray actor (a threaded actor: invocations run on its threads, where
    wasmtime and ONNX Runtime release the GIL). Methods answer errors users can cause as data
    (their wire form, `WasminferError.to_dict`), never as exceptions: Ray would wrap them."""

    def __init__(
        self, replica_id: str, data_dir: str, gateway_node: str, instance_options: list[str], log_level: str
    ) -> None:
        import psutil
        import ray

        from wasminfer.replicas.instances import InstanceController
        from wasminfer.scaling import DecisionLog

        logging.basicConfig(
            level=log_level.upper(), format=f"[{replica_id}] %(levelname)s %(name)s: %(message)s"
        )
        self.id = replica_id
        self.node = ray.get_runtime_context().get_node_id()
        # The gateway's folder only where it is this machine's: another node with the same path
        # would open (and create) an empty store.
        self.shared_store = (
            bool(gateway_node) and self.node == gateway_node and (Path(data_dir) / "store.db").is_file()
        )
        self._private = (
            None if self.shared_store else Path(tempfile.mkdtemp(prefix=f"wasminfer-{replica_id}-"))
        )
        self.platform = Platform(data_dir if self._private is None else self._private)
        config = ScalingConfig.from_options(instance_options)
        self.instances = InstanceController(
            self.platform, config.instance_policy(), DecisionLog(), replica_id
        )
        self.platform.start(load=False)
        self.instances.start()
        self._process = psutil.Process()
        self._process.cpu_percent(None)  # the first reading only starts the measurement
        self._sync_lock = threading.Lock()

    def ready(self) -> dict[str, Any]:
        return {
            "node": self.node,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "shared_store": self.shared_store,
        }

    def ping(self, body: bytes) -> bytes:
        """A bare round trip (what `bench/ray.py` measures the hop with)."""
        return body

    def invoke(
        self, tenant: str, name: str, deployment: str, body: bytes, content_type: str, bundle: Bundle | None
    ) -> tuple[Any, ...] | dict[str, Any] | str:
        """The result as a plain tuple (the fields of `InvokeResult`): Ray pickles a dataclass by
        looking its class up on every call, a measurable part of the hop."""
        try:
            if deployment and not self._sync(tenant, name, deployment, bundle):
                return _NEED_BUNDLE
            result = self.platform.invoke(name, body, content_type, tenant=tenant)
        except WasminferError as exc:
            return exc.to_dict()
        except Exception:
            log.exception("unexpected error invoking %s/%s", tenant, name)
            return WasminferError("internal server error").to_dict()
        r = result
        return (r.body, r.content_type, r.queue_us, r.start_us, r.run_us, r.infer_us, r.cold, r.invocation_id)

    def warm(self, items: list[tuple[str, str, str, Bundle | None]]) -> dict[str, str]:
        outcome = {}
        for tenant, name, deployment, bundle in items:
            try:
                ok = self._sync(tenant, name, deployment, bundle)
                outcome[f"{tenant}/{name}"] = "ok" if ok else "its blobs were not sent"
            except WasminferError as exc:
                outcome[f"{tenant}/{name}"] = f"{exc.code}: {exc.message}"
        return outcome

    def _sync(self, tenant: str, name: str, deployment: str, bundle: Bundle | None) -> bool:
        """Makes this host serve `deployment` of the function; False if that needs the bundle it
        was not given."""
        if self.shared_store:
            self.platform.sync(name, deployment, tenant=tenant)
            return True
        if self._current(tenant, name) == deployment:
            return True
        if bundle is None:
            return False
        with self._sync_lock:
            if self._current(tenant, name) == deployment:
                return True
            platform = self.platform
            for model, sha, ref, options in bundle["models"]:
                host = platform.hosts().get(tenant)
                if (
                    host is None
                    or model not in host.models
                    or model_digest(host.models.get(model)) != model_digest(sha, options)
                ):
                    platform.put_model(model, _fetch(ref, f"model {model!r}"), options=options, tenant=tenant)
            _, manifest, ref = bundle["function"]
            wasm = _fetch(ref, f"function {name!r}")
            platform.put_function(name, wasm, Manifest.from_dict(manifest), tenant=tenant)
            log.info("synced %s/%s from Ray's object store", tenant, name)
        return True

    def _current(self, tenant: str, name: str) -> str | None:
        try:
            return deployment_digest(self.platform.deployed(name, tenant=tenant))
        except WasminferError:
            return None

    def stats(self) -> dict[str, Any]:
        from wasminfer.replicas.instances import instance_stats

        return {
            "cpu": self._process.cpu_percent(None) / 100,
            "functions": instance_stats(self.platform, self.instances),
            "decisions": [d.to_dict() for d in self.instances.decisions.recent(50)],
        }

    def close(self) -> None:
        self.instances.close()
        self.platform.close()
        if self._private is not None:
            shutil.rmtree(self._private, ignore_errors=True)


def _fetch(ref: Any, what: str) -> bytes:
    """A blob from Ray's object store, inside an actor. Raises `Unavailable` if it does not come
    within `FETCH_TIMEOUT_S` or is lost (its owner, the gateway, went away)."""
    import ray

    try:
        data: bytes = ray.get(ref, timeout=FETCH_TIMEOUT_S)
    except ray.exceptions.GetTimeoutError:
        raise Unavailable(
            f"the {what} did not arrive from Ray's object store within {FETCH_TIMEOUT_S:g} s; retry"
        ) from None
    except ray.exceptions.RayError as exc:
        raise Unavailable(
            f"the {what} could not be fetched from Ray's object store: {_first_line(exc)}; retry"
        ) from None
    return data


def _take_back_signals() -> None:
    """Ray's core worker installs abseil's failure-signal handler in the process that connects, and
    it takes SIGTERM and SIGINT over: it prints a stack and kills the process by the signal, so the
    gateway's graceful shutdown (uvicorn's handlers) never runs. Installed again, Python's own
    handlers (whatever Python-level ones were set) get them back. Only the main thread may."""
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in (signal.SIGTERM, signal.SIGINT):
        handler = signal.getsignal(sig)
        if handler is not None:
            signal.signal(sig, handler)
