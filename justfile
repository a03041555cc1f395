# wasminfer tasks. `just --list` shows them all.

set shell := ["bash", "-euo", "pipefail", "-c"]

python := env_var_or_default("PYTHON", "python")
data := env_var_or_default("WASMINFER_DATA", ".wasminfer")

# Run the whole test suite (what CI runs).
test *ARGS:
    {{python}} -m pytest -q -n 2 {{ARGS}}

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

# HTTP gateway benchmark: invocations/s and latency over loopback vs in-process.
bench-gateway:
    {{python}} bench/gateway.py
