"""The C SDK module in the runtime: a function built against it ("wasminfer_sdk_v1",
docs/sdk-module.md) runs as two instances in one store, the SDK's and its own.

A C function's module used to carry the whole SDK (printf, JSON, CBOR, malloc: ~17 of digits' ~19 KB
of code), compiled again for every new function before its first answer. Built with `sdk="module"`
(`toolchain.build`'s default for handler modules) it imports those calls, and the memory, from the
SDK module, which the host compiles once per engine (`WasmEngine.sdk`) from the bytes it ships
(`locations.SDK_MODULE_WASM`, rebuilt from guest-sdk/c/sdk_module.c by `toolchain.build_sdk_module`).

An instance of such a function (`instantiate`, from `_wasm.WasmInstance._start`):
1. the SDK's instance, from its `InstancePre` (its imports are the host's, resolved once);
2. its `_initialize` (whose first constructor moves the SDK's stack off the function's), under the
   instance's start deadline like any start code;
3. its memory grown to the function's declared minimum, when the SDK's initial 256 KiB do not
   hold it;
4. the function's instance, with its imports taken one by one: the SDK's exports by name from the
   instance of step 1, the memory, and anything else (WASI, host imports) from the engine's linker.
   An `InstancePre` cannot hold step 1's exports (they belong to one store), hence one
   `wasmtime_instance_new` per instance.
Such instances never take a slot of the instance pool (`_pooling.py`, opt-in): its engine's copy
would need the SDK's copy too, and a slot holds one instance's memory and table.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from typing import Any

import wasmtime
from wasmtime import _ffi as ffi

from wasminfer.runtime._engine import DLL, ExternInfo, held

#: The import module of the SDK's calls (guest-sdk/c/wasminfer.h, WASMINFER_SDK_MODULE_NAME).
SDK_MODULE = "wasminfer_sdk_v1"
#: The function's memory import: the SDK's memory (zig's name for an imported memory).
MEMORY_IMPORT = ("env", "memory")
#: The SDK's exports run once per instance before the function's (its `_initialize` also moves its
#: stack off the function's, sdk_module.c).
SDK_STARTS = ("_initialize",)

_EXTERN_SIZE = ctypes.sizeof(ffi.wasmtime_extern_t)

# The instantiation's C API calls, which `_wasm.py` uses too (see there why through the C API).
# (context, *instance, name, len, *item): a lookup that runs no guest code, so it keeps the GIL.
export_get = held("wasmtime_instance_export_get", ctypes.c_bool, ctypes.c_void_p, ctypes.c_void_p,
                  ctypes.c_char_p, ctypes.c_size_t, ctypes.c_void_p)
_linker_get = held("wasmtime_linker_get", ctypes.c_bool, ctypes.c_void_p, ctypes.c_void_p,
                   ctypes.c_char_p, ctypes.c_size_t, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_void_p)
_memory_size = held("wasmtime_memory_size", ctypes.c_uint64, ctypes.c_void_p, ctypes.c_void_p)
_memory_grow = held("wasmtime_memory_grow", ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                    ctypes.c_uint64, ctypes.c_void_p)
# These run guest code (start code, data segments): they release the GIL like every guest call.
# (instance_pre, context, *instance, **trap) -> error or NULL
pre_instantiate = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                                   ctypes.c_void_p)(("wasmtime_instance_pre_instantiate", DLL))
# (context, *module, *imports, n, *instance, **trap) -> error or NULL
_instance_new = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                                 ctypes.c_size_t, ctypes.c_void_p,
                                 ctypes.c_void_p)(("wasmtime_instance_new", DLL))
_func_call = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                              ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t,
                              ctypes.c_void_p)(("wasmtime_func_call", DLL))


def from_sdk(imp: ExternInfo) -> bool:
    """Whether an import of a module built against the SDK module is met by it: one of its calls,
    or its memory."""
    return imp.module == SDK_MODULE or (imp.module, imp.name) == MEMORY_IMPORT


def imports_sdk(imports: Sequence[ExternInfo]) -> bool:
    """Whether a module with these imports is built against the SDK module."""
    return any(imp.module == SDK_MODULE for imp in imports)


def unknown_sdk_imports(imports: Sequence[ExternInfo], sdk_exports: dict[str, ExternInfo]) -> list[str]:
    """The imports from the SDK module (and of its memory) that it does not provide as imported, as
    `module.name` strings."""
    out = []
    for imp in filter(from_sdk, imports):
        if imp.module == SDK_MODULE:
            ext = sdk_exports.get(imp.name)
            met = (ext is not None and ext.kind == "func" and ext.params == imp.params
                   and ext.results == imp.results and imp.name not in SDK_STARTS)
        else:
            met = imp.kind == "memory"
        if not met:
            out.append(f"{imp.module}.{imp.name}")
    return out


class Plan:
    """How a function module's imports are met in each new store: one entry per import, in order."""

    __slots__ = ("min_pages", "steps")

    def __init__(self, imports: Sequence[ExternInfo]) -> None:
        #: The function's memory minimum, in pages: the SDK's memory is grown to it.
        self.min_pages = 0
        #: (kind, module, name): kind 0 an SDK export, 1 the memory, 2 the linker's item.
        self.steps: list[tuple[int, bytes, bytes]] = []
        for imp in imports:
            if imp.module == SDK_MODULE:
                kind = 0
            elif (imp.module, imp.name) == MEMORY_IMPORT:
                kind = 1
                self.min_pages = imp.min_pages
            else:
                kind = 2
            self.steps.append((kind, imp.module.encode(), imp.name.encode()))


def _check(error: int | None, trap: Any) -> None:
    if error:
        raise wasmtime.WasmtimeError._from_ptr(ctypes.cast(error, ctypes.POINTER(ffi.wasmtime_error_t)))
    if trap.value:
        raise wasmtime.Trap._from_ptr(ctypes.cast(trap, ctypes.POINTER(ffi.wasm_trap_t)))


def instantiate(ctx: int, sdk_pre: wasmtime.InstancePre, module: wasmtime.Module, plan: Plan,
                linker: wasmtime.Linker, instance: Any) -> None:
    """Makes the SDK's instance and the function's (into `instance`, a `wasmtime_instance_t`) in the
    store of `ctx`. Raises `wasmtime.Trap` (start code trapped or timed out) or
    `wasmtime.WasmtimeError` (an import missing or of another type, memory past the limit)."""
    trap = ctypes.c_void_p()
    trap_ref = ctypes.addressof(trap)
    sdk = ffi.wasmtime_instance_t()
    sdk_ref = ctypes.addressof(sdk)
    _check(pre_instantiate(sdk_pre.ptr(), ctx, sdk_ref, trap_ref), trap)
    found = (ffi.wasmtime_extern_t * (1 + len(SDK_STARTS)))()
    base = ctypes.addressof(found)
    for i, name in enumerate((b"memory", *(s.encode() for s in SDK_STARTS))):
        if not export_get(ctx, sdk_ref, name, len(name), base + i * _EXTERN_SIZE):
            raise wasmtime.WasmtimeError(f"the SDK module exports no {name.decode()}")
    for i in range(1, 1 + len(SDK_STARTS)):
        _check(_func_call(ctx, ctypes.addressof(found[i].of.func), None, 0, None, 0, trap_ref), trap)
    memory = ctypes.addressof(found[0].of.memory)
    pages = int(_memory_size(ctx, memory))
    if plan.min_pages > pages:
        prev = ctypes.c_uint64()
        _check(_memory_grow(ctx, memory, plan.min_pages - pages, ctypes.addressof(prev)), trap)
    imports = (ffi.wasmtime_extern_t * len(plan.steps))()
    at = ctypes.addressof(imports)
    linker_ptr = ctypes.cast(linker.ptr(), ctypes.c_void_p).value
    for i, (kind, mod, name) in enumerate(plan.steps):
        slot = at + i * _EXTERN_SIZE
        if kind == 1:
            ctypes.memmove(slot, base, _EXTERN_SIZE)
            continue
        ok = (export_get(ctx, sdk_ref, name, len(name), slot) if kind == 0
              else _linker_get(linker_ptr, ctx, mod, len(mod), name, len(name), slot))
        if not ok:
            raise wasmtime.WasmtimeError(f"unknown import {mod.decode()}.{name.decode()}")
    module_ptr = ctypes.cast(module.ptr(), ctypes.c_void_p).value
    _check(_instance_new(ctx, module_ptr, at, len(plan.steps), ctypes.addressof(instance), trap_ref), trap)
