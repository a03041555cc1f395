"""How a guest call, an instantiation or a compile fails, as both boundaries (`_wasm.py` for core
modules, `_component.py` for components) report it, and wasmtime's error text made short."""

from __future__ import annotations


class WasmTrap(Exception):
    """The guest trapped. `kind` is one of: timeout, stack_overflow, unreachable, memory, host, other."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


class WasmLinkError(Exception):
    """A module cannot be compiled, linked or instantiated (bad bytes, unknown imports, limits)."""


class GuestFault(Exception):
    """Raised by a host import to trap the guest; the message becomes the trap's message."""


class Interrupted(GuestFault):
    """Ends a guest call from the host side: `kind` is "timeout" (the call's deadline passed while the
    guest ran or slept in a host call) or "cancelled" (`CallState.cancel`). The call then raises
    `WasmTrap` of that kind."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class WasmExit(Exception):
    """The guest called WASI `proc_exit(status)` (wasmtime reports it as an error with an exit status)."""

    def __init__(self, status: int) -> None:
        super().__init__(f"exited with status {status}")
        self.status = status


def first_line(text: str) -> str:
    """The informative part of a wasmtime error: what follows 'Caused by:', without backtraces."""
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    if "Caused by:" in lines:
        lines = lines[lines.index("Caused by:") + 1:]
    lines = [ln for ln in lines if not ln.startswith(("error while executing", "wasm backtrace"))
             and not ln[:1].isdigit()]
    return "; ".join(lines[:3]) if lines else "invalid module"
