"""The container-per-function baseline: one server process per function, OpenFaaS-style.

    python bench/suite/baseline_server.py WORKLOAD MODEL.onnx (--port N | --fd N)

Starlette + uvicorn (uvloop and httptools when installed, as wasminfer's gateway gets them), the
function's own ONNX Runtime session loaded at start, and the workload's numpy pre/post-processing
(`workloads.Workload.handler`) behind `POST /invoke`. The endpoint reads the body on the event loop
and computes on anyio's worker threads (as Starlette runs a sync endpoint, and as wasminfer's
gateway runs invocations), so concurrent requests overlap in ONNX Runtime, which releases the GIL;
the session has wasminfer's registry options (one intra-op thread, sequential execution).

No container runtime is involved: no image pull, no namespace or cgroup setup, no container
network. It is therefore a generous baseline — a real container adds its own start time and memory.

`--fd` serves on a listening socket the parent made (inherited), so the parent can send the first
request the moment it starts the process: the kernel queues the connection until uvicorn accepts,
and the time to the first answer includes no polling.
"""

from __future__ import annotations

import argparse
import socket
import sys
from pathlib import Path

import anyio.to_thread
import uvicorn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/: the `suite` package

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from suite import workloads  # noqa: E402


def create_app(workload: workloads.Workload, model: Path) -> Starlette:
    handle = workload.handler(workloads.session(model))

    async def invoke(request: Request) -> Response:
        body = await request.body()
        ctype = request.headers.get("content-type", "application/octet-stream")
        try:
            answer = await anyio.to_thread.run_sync(handle, body, ctype)
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
            return PlainTextResponse(f"bad request: {exc}", status_code=400)
        return Response(answer, media_type="application/json")

    return Starlette(routes=[Route("/invoke", invoke, methods=["POST"])])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("workload", choices=sorted(workloads.WORKLOADS))
    ap.add_argument("model", type=Path)
    where = ap.add_mutually_exclusive_group(required=True)
    where.add_argument("--port", type=int)
    where.add_argument("--fd", type=int, help="an inherited listening socket")
    args = ap.parse_args()
    app = create_app(workloads.WORKLOADS[args.workload], args.model)
    if args.fd is not None:
        sock = socket.socket(fileno=args.fd)
        config = uvicorn.Config(app, fd=sock.fileno(), log_level="warning", access_log=False)
    else:
        config = uvicorn.Config(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False)
    uvicorn.Server(config).run()
    sys.exit(0)


if __name__ == "__main__":
    main()
