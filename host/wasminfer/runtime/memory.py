"""Memory budgets: a host-wide budget and a per-tenant quota over what instances and models hold.

Every instance is counted **at its limit**: `memory_mb` is reserved when the instance is created
(before instantiation) and released when it is destroyed. Counting what an instance holds (measured
after each call) would be closer to the truth, but an instance grows its linear memory with
`memory.grow` in the middle of a call without asking the host, so N instances may all grow to their
limit at once between two measurements: the sum could pass the budget before anything notices.
Counted at the limit, the sum of what instances may hold can never pass it; the price is that an
instance of a function with `memory_mb=256` that touches 2 MiB counts as 256 MiB (a tenant gets
density by asking for what its function needs).

A model counts at an estimate made from its size (`MODEL_OVERHEAD` times its bytes, measured: an
ONNX Runtime session holds its weights once, ~1.1x the file), reserved before it loads.

A `MemoryBudget` is the process' budget; `budget.tenant(name)` is one tenant's `TenantMemory`, which
its `Host` reserves from. When a reservation does not fit, the tenant's own idle instances are
reclaimed first (through the `reclaimer` the host sets; never another tenant's); then the refusal is
`MemoryQuotaExceeded` (429: the tenant's own quota; its busy instances free room as calls finish) or
`HostMemoryExhausted` (507: every tenant's reservations together fill the host's budget).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import psutil

from wasminfer.errors import (
    BadRequest,
    HostMemoryExhausted,
    InvalidManifest,
    MemoryQuotaExceeded,
    PayloadTooLarge,
)
from wasminfer.manifest import Manifest

MiB = 1 << 20
#: Default host budget: this fraction of the machine's RAM. The rest is the process itself (Python,
#: wasmtime's compiled code, ONNX Runtime's working memory during runs) and the machine's other work.
BUDGET_FRACTION = 0.5
#: Default quota of each tenant: this fraction of the host budget (two tenants can fill it).
TENANT_FRACTION = 0.5
#: What a loaded model is counted at, per byte of the model (rounded up to whole MiB).
MODEL_OVERHEAD = 1.25
#: The refusals a reservation raises.
MEMORY_REFUSALS = (MemoryQuotaExceeded, HostMemoryExhausted)

KINDS = ("instances", "models", "decoders")


def total_ram_bytes() -> int:
    return int(psutil.virtual_memory().total)


def model_bytes(size: int) -> int:
    """What a model of `size` bytes is counted at."""
    return -(-int(size * MODEL_OVERHEAD) // MiB) * MiB


@dataclass(frozen=True)
class MemorySettings:
    """The host budget and the per-tenant quota, in MiB. `MemorySettings.from_env()` sizes the
    defaults from this machine's RAM and reads the `WASMINFER_*` overrides."""

    budget_mb: int
    tenant_quota_mb: int

    def __post_init__(self) -> None:
        for key in ("budget_mb", "tenant_quota_mb"):
            value = getattr(self, key)
            if type(value) is not int or value < 1:
                raise BadRequest(f"memory: {key} must be a whole number of MiB, at least 1, not {value!r}")
        ram_mb = total_ram_bytes() // MiB
        if self.budget_mb > ram_mb:
            raise BadRequest(
                f"memory: budget_mb {self.budget_mb} is more than this machine's RAM ({ram_mb} MiB)"
            )
        if self.tenant_quota_mb > self.budget_mb:
            raise BadRequest(
                f"memory: tenant_quota_mb {self.tenant_quota_mb} is more than the host's budget_mb "
                f"{self.budget_mb}"
            )

    @classmethod
    def defaults(cls) -> MemorySettings:
        budget = max(1, int(total_ram_bytes() * BUDGET_FRACTION) // MiB)
        return cls(budget, max(1, int(budget * TENANT_FRACTION)))

    @classmethod
    def from_env(
        cls, env: Mapping[str, str] | None = None, *, budget_mb: int | None = None,
        tenant_quota_mb: int | None = None,
    ) -> MemorySettings:
        """Defaults (`BUDGET_FRACTION` of RAM, `TENANT_FRACTION` of that), then
        `WASMINFER_MEMORY_BUDGET_MB` and `WASMINFER_TENANT_MEMORY_MB`, then the keywords that are
        not None. A budget given without a quota gets the default fraction of it as its quota.
        Raises `BadRequest` naming the setting for a value that is not a whole number of MiB, less
        than 1, a budget beyond the machine's RAM, or a quota beyond the budget."""
        env = os.environ if env is None else env
        given: dict[str, int] = {}
        for var, key in (("WASMINFER_MEMORY_BUDGET_MB", "budget_mb"),
                         ("WASMINFER_TENANT_MEMORY_MB", "tenant_quota_mb")):
            raw = env.get(var, "").strip()
            if raw:
                try:
                    given[key] = int(raw)
                except ValueError:
                    raise BadRequest(f"{var}={raw!r:.40} is not a whole number of MiB") from None
        for key, value in (("budget_mb", budget_mb), ("tenant_quota_mb", tenant_quota_mb)):
            if value is not None:
                given[key] = value
        budget = given.get("budget_mb", cls.defaults().budget_mb)
        quota = given.get("tenant_quota_mb", max(1, int(budget * TENANT_FRACTION)))
        return cls(budget, quota)

    def to_dict(self) -> dict[str, int]:
        return {"budget_mb": self.budget_mb, "tenant_quota_mb": self.tenant_quota_mb}


class Reservation:
    """Bytes held against a tenant's quota and the host's budget until `release()` (idempotent)."""

    __slots__ = ("_account", "nbytes", "kind", "_released")

    def __init__(self, account: TenantMemory, nbytes: int, kind: str) -> None:
        self._account = account
        self.nbytes = nbytes
        self.kind = kind
        self._released = False

    def release(self) -> None:
        self._account._release(self)

    def resize(self, nbytes: int) -> None:
        """Holds `nbytes` from now on, unchecked: for a caller that gives back at least as much
        at once (a model replaced by one that reserved its growth)."""
        self._account._resize(self, nbytes)


class MemoryBudget:
    """The process' memory budget, shared by the accounts of every tenant. Thread-safe."""

    def __init__(self, budget_bytes: int, tenant_quota_bytes: int) -> None:
        self.budget_bytes = budget_bytes
        self.tenant_quota_bytes = tenant_quota_bytes
        self.used_bytes = 0
        self._lock = threading.Lock()
        self._tenants: dict[str, TenantMemory] = {}

    @classmethod
    def from_settings(cls, settings: MemorySettings) -> MemoryBudget:
        return cls(settings.budget_mb * MiB, settings.tenant_quota_mb * MiB)

    @classmethod
    def unlimited(cls) -> MemoryBudget:
        """No budget at all (a `Host` on its own: tests, benchmarks, embedding)."""
        return cls(1 << 62, 1 << 62)

    def tenant(self, name: str) -> TenantMemory:
        """The account of tenant `name` (made at the first call)."""
        with self._lock:
            account = self._tenants.get(name)
            if account is None:
                account = self._tenants[name] = TenantMemory(self, name, self.tenant_quota_bytes)
            return account

    def snapshot(self) -> dict[str, Any]:
        """The budget, what is reserved, and every tenant's account (`TenantMemory.stats`)."""
        with self._lock:
            tenants = dict(self._tenants)
            used = self.used_bytes
        return {"budget_bytes": self.budget_bytes, "used_bytes": used,
                "tenants": {name: t.stats() for name, t in sorted(tenants.items())}}


class TenantMemory:
    """One tenant's share of a `MemoryBudget`: what it has reserved, by kind, against its quota."""

    def __init__(self, budget: MemoryBudget, tenant: str, quota_bytes: int) -> None:
        self.budget = budget
        self.tenant = tenant
        self.quota_bytes = quota_bytes
        self.used = dict.fromkeys(KINDS, 0)
        self.refusals = {"tenant": 0, "host": 0}
        self.reclaimed_bytes = 0
        #: Frees at least the given bytes of this tenant's idle instances if it can; returns what it
        #: freed (set by the tenant's `Host`).
        self.reclaimer: Callable[[int], int] | None = None

    @property
    def used_bytes(self) -> int:
        return sum(self.used.values())

    def check_fits(self, nbytes: int) -> bool:
        """Whether `nbytes` could ever be reserved (the quota, with nothing else held)."""
        return nbytes <= min(self.quota_bytes, self.budget.budget_bytes)

    def available_bytes(self) -> int:
        """What could be reserved now without reclaiming anything."""
        budget = self.budget
        with budget._lock:
            return max(0, min(self.quota_bytes - self.used_bytes, budget.budget_bytes - budget.used_bytes))

    def check_deploy(self, manifest: Manifest, count: int) -> None:
        """Raises `InvalidManifest` naming the keys if `count` instances of the function (what a
        deploy pre-warms) could never fit in the quota, even with nothing else held."""
        need = count * (manifest.memory_mb << 20)
        if self.check_fits(need):
            return
        limit = min(self.quota_bytes, self.budget.budget_bytes)
        if count == 1:
            asked = f"manifest key 'memory_mb' ({manifest.memory_mb})"
        else:
            asked = (f"manifest keys 'prewarm_instances' ({manifest.prewarm_instances}), 'min_instances' "
                     f"({manifest.min_instances}) and 'memory_mb' ({manifest.memory_mb}) ask for {count} "
                     f"instances of {manifest.memory_mb} MiB at deploy ({_mib(need)} MiB), which")
        raise InvalidManifest(
            f"{asked} is more than the tenant's memory quota of {_mib(limit)} MiB on this server; "
            "lower them"
        )

    def reserve_model(self, name: str, nbytes: int, held: int = 0) -> Reservation:
        """Reserves what model `name` is counted at (`model_bytes`) beyond the `held` bytes of the
        version it replaces (replacing a model needs no room for both). Raises `PayloadTooLarge` if
        it could never fit, else what `reserve` raises."""
        if not self.check_fits(nbytes):
            raise PayloadTooLarge(
                f"model {name!r} would be counted at {_mib(nbytes)} MiB once loaded ({MODEL_OVERHEAD}x "
                f"its size), more than the tenant's memory quota of "
                f"{_mib(min(self.quota_bytes, self.budget.budget_bytes))} MiB on this server"
            )
        return self.reserve(max(0, nbytes - held), "models", f"model {name!r}")

    def reserve(self, nbytes: int, kind: str, what: str, *, reclaim: bool = True) -> Reservation:
        """Reserves `nbytes` of `kind` ("instances" or "models") for `what` (named in the refusal,
        e.g. "an instance of function 'f' (manifest key 'memory_mb' 64)").

        If it does not fit and `reclaim`, the tenant's idle instances are reclaimed first. Raises
        `MemoryQuotaExceeded` when the tenant's quota is what does not fit, `HostMemoryExhausted`
        when the host's budget is.
        """
        shortfall = self._try(nbytes, kind)
        if shortfall is None:
            return Reservation(self, nbytes, kind)
        if reclaim and self.reclaimer is not None:
            freed = self.reclaimer(shortfall[1])
            with self.budget._lock:
                self.reclaimed_bytes += freed
            if freed:
                shortfall = self._try(nbytes, kind)
                if shortfall is None:
                    return Reservation(self, nbytes, kind)
        limit, _ = shortfall
        with self.budget._lock:
            self.refusals[limit] += 1
            used, by_kind = self.used_bytes, dict(self.used)
            host_used = self.budget.used_bytes
        if limit == "tenant":
            raise MemoryQuotaExceeded(
                f"the tenant's memory quota is full: {_mib(used)} of {_mib(self.quota_bytes)} MiB "
                f"reserved (instances {_mib(by_kind['instances'])} MiB, models {_mib(by_kind['models'])} "
                f"MiB); {what} needs {_mib(nbytes)} MiB more. Retry when calls finish, or lower "
                "'memory_mb', 'max_instances' or 'prewarm_instances' of the tenant's functions"
            )
        raise HostMemoryExhausted(
            f"the host's memory budget is full: {_mib(host_used)} of {_mib(self.budget.budget_bytes)} "
            f"MiB reserved by every tenant together; {what} needs {_mib(nbytes)} MiB. Retry later"
        )

    def _try(self, nbytes: int, kind: str) -> tuple[str, int] | None:
        """Takes `nbytes` if they fit; else `(limit, shortfall)`, the limit that refused (the
        tenant's own first) and how many bytes it is short."""
        budget = self.budget
        with budget._lock:
            over_tenant = self.used_bytes + nbytes - self.quota_bytes
            over_host = budget.used_bytes + nbytes - budget.budget_bytes
            if over_tenant <= 0 and over_host <= 0:
                self.used[kind] += nbytes
                budget.used_bytes += nbytes
                return None
        return ("tenant", over_tenant) if over_tenant > 0 else ("host", over_host)

    def _release(self, reservation: Reservation) -> None:
        with self.budget._lock:
            if reservation._released:
                return
            reservation._released = True
            self.used[reservation.kind] -= reservation.nbytes
            self.budget.used_bytes -= reservation.nbytes

    def _resize(self, reservation: Reservation, nbytes: int) -> None:
        with self.budget._lock:
            if reservation._released:
                return
            delta = nbytes - reservation.nbytes
            reservation.nbytes = nbytes
            self.used[reservation.kind] += delta
            self.budget.used_bytes += delta

    def stats(self) -> dict[str, Any]:
        with self.budget._lock:
            return {
                "quota_bytes": self.quota_bytes,
                "used_bytes": self.used_bytes,
                **{f"{kind}_bytes": n for kind, n in self.used.items()},
                "refusals": dict(self.refusals),
                "reclaimed_bytes": self.reclaimed_bytes,
            }


def _mib(n: int) -> str:
    return f"{n / MiB:.0f}" if n % MiB == 0 else f"{n / MiB:.1f}"


__all__ = [
    "MEMORY_REFUSALS",
    "MemoryBudget",
    "MemorySettings",
    "Reservation",
    "TenantMemory",
    "model_bytes",
]
