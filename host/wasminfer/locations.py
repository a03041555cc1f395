"""Where wasminfer's own files are on this machine: the per-machine cache (guest builds, the Python
runtime) and the guest SDK. A leaf module: the CLI's toolchain and the runtime both ask it."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["SDK_MODULE_WASM", "cache_root", "guest_sdk_path"]

#: The C SDK module the host ships and links into functions built against it ("wasminfer_sdk_v1",
#: built from guest-sdk/c/sdk_module.c by `toolchain.build_sdk_module`; docs/sdk-module.md).
SDK_MODULE_WASM = Path(__file__).resolve().parent / "runtime" / "wasminfer_sdk_v1.wasm"


def cache_root() -> Path:
    """`$WASMINFER_CACHE`, else `~/.cache/wasminfer`: what one machine builds once and every server
    and test session of it reuses."""
    root = os.environ.get("WASMINFER_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "wasminfer"


def guest_sdk_path() -> Path:
    """The `guest-sdk` folder: `$WASMINFER_GUEST_SDK`, else the one in this package's source tree
    (not checked: `toolchain.guest_sdk_dir` says what is missing)."""
    env = os.environ.get("WASMINFER_GUEST_SDK")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "guest-sdk"
