"""The Ray backend against a real two-node Ray cluster on this machine (`ray.cluster_utils.Cluster`):
replicas placed on both nodes (one opens the gateway's data folder, the other gets functions and
models through Ray's object store), load spread over them, a killed actor replaced while requests
keep succeeding, a scale-down that drains without a failed request, a lost node, and
`wasminfer serve --ray`.

Ray binds to the machine's external interface whatever it is told, and tests may send traffic only
to loopback. So the cluster runs inside a network namespace with nothing but `lo` up: as root,
`test_in_a_loopback_only_network_namespace` re-runs this module under `unshare -n` (with a private
`RAY_TMPDIR`, so the cluster's address file does not replace the one of another Ray on this
machine), and the cluster tests run only there (elsewhere they skip, saying so). Everything marked
`ray` skips where Ray is not installed; `.ci/run` installs it.
"""

from __future__ import annotations

import asyncio
import collections
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import wasmtime

from wasminfer.errors import BadRequest, GuestError, Unavailable
from wasminfer.manifest import Manifest
from wasminfer.models.codec import decode_tensors, encode_tensors
from wasminfer.replicas import Fleet, Replica
from wasminfer.scaling import ScalingConfig
from wasminfer.service import Platform

ROOT = Path(__file__).resolve().parents[1]

# A guest that spins for the iteration count its body holds (u32 LE), then answers "ok".
SPIN_WAT = r"""
(module
  (import "wasminfer" "output" (func $output (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 16) "ok")
  (data (i32.const 32) "text/plain")
  (func (export "wasminfer_abi_v1"))
  (func (export "wasminfer_alloc") (param i32) (result i32) (i32.const 1024))
  (func (export "wasminfer_handle") (param $b i32) (param $bl i32) (param $c i32) (param $cl i32) (result i32)
    (local $n i32)
    (local.set $n (i32.load (local.get $b)))
    (block $done
      (loop $spin
        (br_if $done (i32.eqz (local.get $n)))
        (local.set $n (i32.sub (local.get $n) (i32.const 1)))
        (br $spin)))
    (drop (call $output (i32.const 16) (i32.const 2) (i32.const 32) (i32.const 10)))
    (i32.const 0)))
"""

A = np.arange(6, dtype=np.float32).reshape(2, 3)
INFER_BODY = b"i" + encode_tensors({"a": A, "b": A})  # hostile.wat's `i`: y = a + b by model "add"
FAST = dict(  # small windows: these tests watch the fleet act within seconds
    replica_tick_s=0.2,
    replica_up_window_s=0.4,
    replica_down_window_s=0.6,
    replica_up_queue_ms=1000.0,  # only min_replicas (or a lost replica) adds one here
    replica_up_cpu=50.0,
    replica_down_queue_ms=500.0,  # and anything under that is calm (a Ray hop is ~1-3 ms)
    replica_down_cpu=40.0,
    ray_num_cpus=1.0,
    ray_start_timeout_s=60.0,
)
SLOW_S = 30.0  # one HTTP answer from a gateway connecting to Ray on a loaded machine (httpx's 5 s was hit)
TEST_S = 200.0  # every wait below has its own bound; this one holds whatever a test forgot
CLOSE_S = 90.0  # draining and stopping a fleet (an actor's close: 30 s, then it is killed)


def _loopback_only() -> bool:
    """Whether this process' network namespace has no interface but `lo`."""
    return [name for _, name in socket.if_nameindex()] == ["lo"]


def _unshare() -> list[str] | None:
    """The command that makes a network namespace here: as root, or as this user's root in a user
    namespace of its own; None where neither can."""
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return None
    if os.geteuid() == 0:
        return ["unshare", "--net"]
    command = ["unshare", "--user", "--map-root-user", "--net"]
    probe = subprocess.run([*command, "true"], capture_output=True, check=False)
    return command if probe.returncode == 0 else None


# --- outside: re-run this module where only loopback exists -------------------------------------------
_OUTER = "test_in_a_loopback_only_network_namespace"
INNER_TEST_S = 240  # the longest cluster test takes ~35 s alone, ~4x that on a loaded machine
INNER_STACKS_S = 180
INNER_RUN_S = 840


@pytest.mark.ray
@pytest.mark.timeout(900)
def test_in_a_loopback_only_network_namespace() -> None:
    pytest.importorskip("ray")
    if _loopback_only():
        pytest.skip("already in a loopback-only network namespace: the cluster tests run here directly")
    unshare = _unshare()
    if unshare is None:
        pytest.skip(
            "the Ray cluster tests need a network namespace with only loopback up (unshare -n as root, "
            "or unshare -rn where user namespaces are allowed): Ray binds to the external interface "
            "otherwise"
        )
    ray_tmp = tempfile.mkdtemp(prefix="wir-")  # short: Ray's unix sockets live under it
    env = {**os.environ, "RAY_TMPDIR": ray_tmp, "RAY_USAGE_STATS_ENABLED": "0"}
    # A test that outlives INNER_TEST_S fails with its traceback; one stuck where no signal reaches
    # it (inside Ray's C++ calls) has every thread's stack written out at INNER_STACKS_S and the run
    # is killed at INNER_RUN_S, its output shown.
    command = [
        *unshare, "--", "sh", "-c", 'ip link set lo up && exec "$@"', "sh",
        sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
        "-m", "ray", "-k", f"not {_OUTER}", "--durations=0", f"--timeout={INNER_TEST_S}",
        "-o", f"faulthandler_timeout={INNER_STACKS_S}",
    ]  # fmt: skip
    started = time.monotonic()
    # A session of its own: at the bound, everything the run started goes with it.
    proc = subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=INNER_RUN_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        raise AssertionError(
            f"the Ray cluster tests did not end within {INNER_RUN_S} s; their output:\n{output[-15000:]}"
        ) from None
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert proc.returncode == 0, "the Ray cluster tests failed in their namespace:\n" + output[-15000:]
    # An inner run that skipped or deselected its tests exits 0 too: every cluster test must have run.
    inner = [name for name, f in globals().items() if name.startswith("test_") and name != _OUTER
             and any(m.name == "ray" for m in getattr(f, "pytestmark", []))]
    summary = re.search(r"^=* ?(\d+) passed(.*) in [\d.]+s", output, re.MULTILINE)
    assert summary is not None, "no pytest summary from the namespace run:\n" + output[-3000:]
    assert int(summary.group(1)) == len(inner) and "skipped" not in summary.group(2), summary.group(0)
    print(f"Ray cluster tests in a loopback-only namespace: {time.monotonic() - started:.1f} s")
    print(output[-3000:])


# --- inside: a two-node cluster on loopback -------------------------------------------------------
@pytest.fixture(scope="module")
def cluster() -> Iterator[Any]:
    ray = pytest.importorskip("ray")
    if not _loopback_only():
        pytest.skip(
            "runs inside a loopback-only network namespace: test_in_a_loopback_only_network_namespace"
        )
    from ray.cluster_utils import Cluster

    node = {"num_cpus": 4, "node_ip_address": "127.0.0.1"}
    # A lost node is declared dead after 3 missed health checks 0.5 s apart (Ray's default: 5 x 3 s).
    health = {"health_check_period_ms": 500, "health_check_failure_threshold": 3}
    c = Cluster(
        initialize_head=True, head_node_args={**node, "include_dashboard": False, "_system_config": health}
    )
    c.add_node(**node)
    c.wait_for_nodes()
    ray.init(address=c.address, log_to_driver=False, configure_logging=False)
    try:
        yield c
    finally:
        ray.shutdown()
        c.shutdown()


@pytest.fixture(scope="module")
def platform(
    tmp_path_factory: pytest.TempPathFactory, add_model: bytes, hostile_wasm: bytes
) -> Iterator[Platform]:
    p = Platform(tmp_path_factory.mktemp("ray") / "data")
    p.start()
    p.put_model("add", add_model)
    base = Manifest(models=("add",), memory_mb=4, timeout_ms=5000, max_instances=16)
    p.put_function("again", hostile_wasm, base.replace(idempotent=True))
    p.put_function("once", hostile_wasm, base)
    p.put_function("spin", bytes(wasmtime.wat2wasm(SPIN_WAT)), Manifest(memory_mb=1, max_instances=16))
    yield p
    p.close()


def run(platform: Platform, main: Callable[[Fleet], Awaitable[None]], **options: Any) -> None:
    """Runs `main` with a fleet of Ray replicas (`options`: scaling keys), closed whatever happens."""

    async def go() -> None:
        config = ScalingConfig.from_mapping({"backend": "ray", "primary_replica": False, **FAST, **options})
        fleet = Fleet(platform, config, threads=8)
        try:
            # A wait that never ends fails here, with the await it was stuck in (the cancellation's
            # traceback), rather than holding the whole run.
            async with asyncio.timeout(TEST_S):
                await main(fleet)
        finally:
            async with asyncio.timeout(CLOSE_S):
                await fleet.aclose()

    asyncio.run(go())


async def until(condition: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:g} s: {what}")
        await asyncio.sleep(0.05)


def served_by(result: Any) -> str:
    return str(result.invocation_id).split(".")[0]


class Load:
    """`concurrency` closed loops of one request until `stop()`: who answered, and what failed."""

    def __init__(self, fleet: Fleet, name: str, body: bytes, concurrency: int) -> None:
        self.fleet, self.name, self.body = fleet, name, body
        self.by_replica: collections.Counter[str] = collections.Counter()
        self.failures: list[Exception] = []
        self._running = True
        self._tasks = [asyncio.create_task(self._loop()) for _ in range(concurrency)]

    async def _loop(self) -> None:
        while self._running:
            try:
                result = await self.fleet.invoke("default", self.name, self.body, "application/octet-stream")
                self.by_replica[served_by(result)] += 1
            except Exception as exc:  # what the test looks at
                self.failures.append(exc)
                await asyncio.sleep(0.01)

    @property
    def total(self) -> int:
        return sum(self.by_replica.values())

    async def stop(self) -> None:
        self._running = False
        await asyncio.gather(*self._tasks)


def listening_and_connected() -> list[tuple[str, str, str]]:
    """(state, local, peer) of every TCP and UDP socket of this namespace."""
    rows = []
    for proto in ("-t", "-u"):
        out = subprocess.run(["ss", "-anH", proto], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            parts = line.split()
            if len(parts) >= 5:
                rows.append((parts[0], parts[3], parts[4]))
    return rows


def is_loopback(address: str) -> bool:
    host = address.rsplit(":", 1)[0].strip("[]")
    return host.startswith("127.") or host == "::1" or host.startswith("::ffff:127.")


def leaves_loopback(state: str, local: str, peer: str) -> bool:
    """Whether a socket listens on, or talks to, anything but loopback (a listening socket's peer is
    `*`: no address)."""
    return not is_loopback(local) or not (peer.endswith(":*") or is_loopback(peer))


# --- the cluster tests -----------------------------------------------------------------------------------
@pytest.mark.ray
def test_replicas_on_both_nodes_spread_the_load_and_stay_on_loopback(
    cluster: Any, platform: Platform
) -> None:
    async def main(fleet: Fleet) -> None:
        await fleet.start()
        await until(lambda: len(fleet._serving) == 2, "two Ray replicas serving")
        replicas = list(fleet._serving)
        assert {r.kind for r in replicas} == {"ray"}
        assert len({r.handle.node for r in replicas}) == 2, "SPREAD places one actor per node"
        # The one on the gateway's node opens its data folder; the other gets blobs through Ray.
        assert sorted(r.handle.shared_store for r in replicas) == [False, True]

        # A function with a model: each loads both by its own path (compiling takes a while here,
        # so that happens before the load is measured).
        for r in replicas:
            result = await r.backend.route(r, "default", "once", _digest(platform, "once"), INFER_BODY, "t")
            np.testing.assert_array_equal(decode_tensors(result.body)["y"], A + A)
            r.warm.add(("default", "once"))
        load = Load(fleet, "once", INFER_BODY, 8)
        await until(lambda: load.total >= 300, "300 requests", 60)
        await load.stop()
        assert load.failures == []
        assert set(load.by_replica) == {r.id for r in replicas}
        # least-outstanding routing follows each replica's speed: on a shared 2-core machine one node
        # may be much slower, so "spread" means every replica takes a real share, not an equal one
        assert min(load.by_replica.values()) >= 0.1 * load.total, load.by_replica
        result = await fleet.invoke("default", "once", INFER_BODY, "application/cbor")
        np.testing.assert_array_equal(decode_tensors(result.body)["y"], A + A)

        # Nothing of the cluster (GCS, raylets, workers, the actors' connections) left loopback.
        sockets = listening_and_connected()
        assert sockets, "ss saw no socket at all"
        outside = [s for s in sockets if leaves_loopback(*s)]
        assert outside == [], outside
        addresses = subprocess.run(["ip", "-o", "addr"], capture_output=True, text=True).stdout
        assert all(line.split()[1] == "lo" for line in addresses.splitlines()), addresses

    run(platform, main, min_replicas=2, max_replicas=2)


@pytest.mark.ray
def test_a_redeploy_reaches_replicas_on_both_paths(
    cluster: Any, platform: Platform, hostile_wasm: bytes
) -> None:
    async def main(fleet: Fleet) -> None:
        await fleet.start()
        await until(lambda: len(fleet._serving) == 2, "two Ray replicas serving")
        for r in fleet._serving:  # each loads the function, by its own path
            result = await r.backend.route(r, "default", "once", _digest(platform, "once"), b"c", "t")
            assert served_by(result) == r.id
        platform.put_function(
            "once", hostile_wasm, platform.deployed("once").manifest.replace(max_instances=12)
        )
        digest = _digest(platform, "once")
        for r in fleet._serving:
            result = await r.backend.route(r, "default", "once", digest, b"ehlo", "t")
            assert result.body == b"ehlo"
            stats = await r.backend.stats(r)
            assert stats.alive and "default/once" in stats.functions
            # What the guest fails with comes back as the error it is, from either path.
            with pytest.raises(GuestError, match="bad things happened"):
                await r.backend.route(r, "default", "once", digest, b"s", "t")
        assert [r.handle.synced for r in fleet._serving if not r.handle.shared_store] == [
            {("default", "once"): digest}
        ]

    run(platform, main, min_replicas=2, max_replicas=2)


@pytest.mark.ray
def test_a_replica_no_node_can_place_fails_to_start_naming_the_knob(cluster: Any, platform: Platform) -> None:
    async def main(fleet: Fleet) -> None:
        assert fleet.backend is not None
        with pytest.raises(Unavailable, match="ray_num_cpus"):
            await fleet.backend.start()

    run(platform, main, min_replicas=1, max_replicas=1, ray_num_cpus=64.0, ray_start_timeout_s=1.0)


@pytest.mark.ray
def test_a_blob_that_never_arrives_fails_the_sync_clearly_instead_of_holding_a_thread(
    cluster: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What an actor on another node waits for (a function's bytes from Ray's object store) has a
    bound: a blob that does not come is a 503 to retry, and one that is lost says so."""
    import ray

    from wasminfer.replicas import ray_backend

    monkeypatch.setattr(ray_backend, "FETCH_TIMEOUT_S", 0.5)

    @ray.remote(num_cpus=0)
    def never() -> bytes:
        threading.Event().wait()
        return b""

    ref = never.remote()
    try:
        with pytest.raises(Unavailable, match=r"the function 'f' did not arrive from Ray's object store "
                                              r"within 0\.5 s; retry") as info:
            ray_backend._fetch(ref, "function 'f'")
        assert info.value.status == 503
    finally:
        ray.cancel(ref, force=True)
    with pytest.raises(Unavailable, match="the function 'f' could not be fetched from Ray's object store: "):
        ray_backend._fetch(ref, "function 'f'")
    ok = ray.put(b"\0asm")
    assert ray_backend._fetch(ok, "function 'f'") == b"\0asm"


async def _await(ref: Any) -> Any:
    """An ObjectRef as a coroutine (what `asyncio.wait_for` takes)."""
    return await ref


def _digest(platform: Platform, name: str) -> str:
    from wasminfer.service import deployment_digest

    return deployment_digest(platform.deployed(name))


@pytest.mark.ray
def test_a_killed_actor_is_replaced_while_requests_keep_succeeding(cluster: Any, platform: Platform) -> None:
    functions_before = [(f.name, f.sha256) for f in platform.store.list_functions()]

    async def main(fleet: Fleet) -> None:
        await fleet.start()
        await until(lambda: len(fleet._serving) == 2, "two Ray replicas serving")

        # An idempotent function: a request lost with the actor is sent once more, elsewhere.
        load = Load(fleet, "again", b"echo", 6)
        await until(lambda: load.total >= 100, "100 requests before the kill")
        originals = set(fleet._serving)
        victim = fleet._serving[0]
        os.kill(victim.pid or 0, signal.SIGKILL)
        await until(
            lambda: len(fleet._serving) == 2 and victim not in fleet._serving, "a replacement serving", 60
        )
        after = load.total
        await until(lambda: load.total >= after + 100, "100 requests after the replacement")
        await load.stop()
        assert load.failures == [], load.failures[:3]
        (replacement,) = set(fleet._serving) - originals
        assert load.by_replica[replacement.id] > 0, load.by_replica
        reasons = [d.reason for d in fleet.decisions.recent()]
        assert any(f"replica {victim.id} exited" in r for r in reasons), reasons

        # Not idempotent: what was in flight on the lost actor fails with a clear, retryable 503.
        load = Load(fleet, "once", b"echo", 6)
        await until(lambda: load.total >= 100, "100 requests before the second kill")
        victim = fleet._serving[0]
        os.kill(victim.pid or 0, signal.SIGKILL)
        await until(
            lambda: len(fleet._serving) == 2 and victim not in fleet._serving, "a second replacement", 60
        )
        after = load.total
        await until(lambda: load.total >= after + 100, "100 requests after the second replacement")
        await load.stop()
        for exc in load.failures:
            assert isinstance(exc, Unavailable) and exc.status == 503, repr(exc)
            assert victim.id in exc.message and "retry" in exc.message and "idempotent" in exc.message
        assert len(load.failures) <= 8, load.failures  # at most what was in flight on it

    run(platform, main, min_replicas=2, max_replicas=2)
    assert [(f.name, f.sha256) for f in platform.store.list_functions()] == functions_before


@pytest.mark.ray
def test_scale_down_drains_without_a_failed_request(cluster: Any, platform: Platform) -> None:
    import ray

    async def main(fleet: Fleet) -> None:
        # Three replicas to begin with (the test does what a saturated fleet would have done).
        assert fleet.backend is not None
        for replica in await asyncio.gather(*(fleet.backend.start() for _ in range(3))):
            fleet._serve(replica)
        replicas = list(fleet._serving)
        await fleet.start()
        spin = struct.pack("<I", 2_000_000)  # a few ms of Wasm each: requests are in flight at every drain
        load = Load(fleet, "spin", spin, 6)
        await until(lambda: len(fleet._serving) == 1, "scaled down to one replica (calm, min_replicas 1)", 60)
        await until(lambda: len(fleet.replicas) == 1, "the drained replicas stopped")
        await load.stop()
        assert load.failures == [], load.failures[:3]
        assert len(load.by_replica) >= 2, "the drained replicas served requests before they left"
        drained = [r for r in replicas if r not in fleet._serving]
        assert len(drained) == 2 and all(r.state == "stopped" for r in drained)
        reasons = [d.reason for d in fleet.decisions.recent()]
        assert sum("draining" in r for r in reasons) == 2, reasons
        for r in drained:  # their actors are gone
            with pytest.raises(ray.exceptions.RayActorError):
                await asyncio.wait_for(_await(r.handle.handle.ready.remote()), 30)

    run(platform, main, min_replicas=1, max_replicas=3)


@pytest.mark.ray
def test_serve_with_ray_runs_replicas_as_actors(
    cluster: Any, tmp_path: Path, add_model: bytes, hostile_wasm: bytes
) -> None:
    import httpx
    import ray

    from wasminfer.client import Client

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = (tmp_path / "serve.log").open("wb")
    cpus = ray.cluster_resources()["CPU"]

    def free_cpus() -> float:
        return float(ray.available_resources().get("CPU", 0))

    _wait(lambda: free_cpus() == cpus, "the earlier tests' actors gone")
    command = [
        sys.executable, "-m", "wasminfer", "serve", "--data", str(tmp_path / "data"), "--port", str(port),
        "--ray", cluster.address, "--min-replicas", "2", "--max-replicas", "2",
        "--scaling", "primary_replica=false", "--scaling", "replica_tick_s=0.2", "--log-level", "warning",
    ]  # fmt: skip
    server = subprocess.Popen(command, stdout=log, stderr=log, cwd=ROOT)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert server.poll() is None, (tmp_path / "serve.log").read_text()
            try:
                if httpx.get(f"{url}/readyz", timeout=SLOW_S).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not become ready"
            time.sleep(0.1)
        with Client(url) as client:
            client.put_model("add", add_model)
            client.put_function("again", hostile_wasm, {"models": ["add"], "idempotent": True})
            _wait(lambda: len(ray_replicas(url)) == 2, "two Ray replicas", 90)
            ids = {client.invoke("again", b"echo").invocation_id.split(".")[0] for _ in range(20)}
        assert ids and all(i.startswith("ray-") for i in ids), ids
        _wait(lambda: free_cpus() == cpus - 2, "two actors of one CPU each")
    finally:
        server.send_signal(signal.SIGTERM)
        code = server.wait(timeout=60)
        log.close()
    assert code == 0, (tmp_path / "serve.log").read_text()
    _wait(lambda: free_cpus() == cpus, "the server's actors gone with it")


def _wait(condition: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout:g} s: {what}"
        time.sleep(0.05)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.mark.ray
def test_serve_with_ray_local_starts_a_private_ray_beside_a_running_cluster(
    cluster: Any, tmp_path: Path, add_model: bytes, hostile_wasm: bytes
) -> None:
    """docs/ray.md: `--ray local` is "a private one-node Ray started by the gateway": its actor
    serves, and nothing lands on the cluster already running here, though `$RAY_ADDRESS` names it
    (`ray.init()` without an address would join that one)."""
    import ray

    from wasminfer.client import Client

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = tmp_path / "serve.log"
    cpus = ray.cluster_resources()["CPU"]

    def free_cpus() -> float:
        return float(ray.available_resources().get("CPU", 0))

    _wait(lambda: free_cpus() == cpus, "the earlier tests' actors gone")
    command = [
        sys.executable, "-m", "wasminfer", "serve", "--data", str(tmp_path / "data"), "--port", str(port),
        "--ray", "local", "--min-replicas", "1", "--max-replicas", "1",
        "--scaling", "primary_replica=false", "--scaling", "replica_tick_s=0.2", "--log-level", "warning",
    ]  # fmt: skip
    with log_path.open("wb") as log:
        env = {**os.environ, "RAY_ADDRESS": cluster.address}
        server = subprocess.Popen(command, stdout=log, stderr=log, cwd=ROOT, env=env)
    try:
        _wait(lambda: server.poll() is None and _ready(url), "the server ready", 60)
        with Client(url) as client:
            client.put_model("add", add_model)
            client.put_function("again", hostile_wasm, {"models": ["add"], "idempotent": True})
            _wait(lambda: [r["state"] for r in ray_replicas(url)] == ["serving"], "a Ray replica", 90)
            ids = {client.invoke("again", b"echo").invocation_id.split(".")[0] for _ in range(10)}
        assert ids and all(i.startswith("ray-") for i in ids), ids
        assert free_cpus() == cpus  # the actor is on the gateway's own Ray, not on this cluster
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            # Its own Ray stops with it (raylet, GCS, workers): on 2 busy cores that took over 60 s once.
            code = server.wait(timeout=150)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
            tail = log_path.read_text()[-5000:]
            raise AssertionError(f"the gateway took over 150 s to stop:\n{tail}") from None
    assert code == 0, log_path.read_text()


def ray_replicas(url: str) -> list[dict[str, Any]]:
    """The Ray replicas `GET /v1/scaling` lists."""
    import httpx

    replicas = httpx.get(f"{url}/v1/scaling", timeout=SLOW_S).json()["replicas"]
    return [r for r in replicas if r["kind"] == "ray"]


def _ready(url: str) -> bool:
    import httpx

    try:
        return httpx.get(f"{url}/readyz", timeout=SLOW_S).status_code == 200
    except httpx.TransportError:
        return False


@pytest.mark.ray
def test_a_lost_node_loses_its_replica_and_the_fleet_replaces_it(cluster: Any, platform: Platform) -> None:
    """Last: the cluster keeps one node after it."""

    async def main(fleet: Fleet) -> None:
        await fleet.start()
        await until(lambda: len(fleet._serving) == 2, "two Ray replicas serving")
        remote = next(r for r in fleet._serving if not r.handle.shared_store)
        load = Load(fleet, "again", INFER_BODY, 4)
        await until(lambda: load.total >= 50, "50 requests before the node goes")
        worker_node = next(n for n in cluster.list_all_nodes() if not n.head)
        cluster.remove_node(worker_node, allow_graceful=False)
        await until(
            lambda: len(fleet._serving) == 2 and remote not in fleet._serving, "a replacement on the head", 90
        )
        after = load.total
        await until(lambda: load.total >= after + 50, "50 requests after")
        await load.stop()
        assert load.failures == [], load.failures[:3]
        assert all(r.handle.shared_store for r in fleet._serving)  # the gateway's node is the one left

    run(platform, main, min_replicas=2, max_replicas=2)


# --- without a cluster -----------------------------------------------------------------------------
def test_serve_with_ray_and_no_replica_beyond_this_process_is_refused(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from wasminfer.cli import app

    result = CliRunner().invoke(app, ["serve", "--data", str(tmp_path), "--ray", "auto"])
    assert isinstance(result.exception, BadRequest), result.output
    assert "--max-replicas" in result.exception.message


def test_the_fleet_picks_the_ray_backend_without_connecting(tmp_path: Path) -> None:
    with Platform(tmp_path / "data") as p:
        fleet = Fleet(p, ScalingConfig(backend="ray", max_replicas=3, ray_address="127.0.0.1:1"))
        assert fleet.backend is not None and fleet.backend.kind == "ray"
        assert isinstance(fleet._serving[0], Replica) and fleet._serving[0].holds_all  # the primary serves


def test_idempotent_is_a_manifest_key() -> None:
    assert Manifest.from_dict({"idempotent": "true"}).idempotent is True
    assert Manifest().idempotent is False
