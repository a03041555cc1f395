"""Invoking functions: the wasmtime engine, instance pools, limits and the guest ABIs."""

from __future__ import annotations

from wasminfer.manifest import Manifest
from wasminfer.runtime._engine import blocked_ns
from wasminfer.runtime._malloc import trim as release_freed_memory
from wasminfer.runtime.host import DeployedFunction, Host, InvokeResult, ModuleInfo
from wasminfer.runtime.logs import LogBuffer, LogLine
from wasminfer.runtime.pool import GrowthPolicy
from wasminfer.runtime.streams import OutputStream

__all__ = [
    "DeployedFunction", "GrowthPolicy", "Host", "InvokeResult", "LogBuffer", "LogLine", "Manifest",
    "ModuleInfo", "OutputStream", "blocked_ns", "release_freed_memory",
]
