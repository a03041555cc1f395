"""API keys as the platform checks them, and who a request acts as.

Two kinds of key: configured ones (`ConfiguredKey`, given on the command line or in
`WASMINFER_API_KEYS`, never stored; `parse_keys`) and stored ones (`store/keys.py` for their format
and hash, `Store.add_key` / `Store.verify_key`). `KeyRing.authenticate` tries both and answers with
a `Principal`: a tenant and the scopes its key grants.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable
from dataclasses import dataclass

from wasminfer.errors import BadRequest
from wasminfer.store import DEFAULT_TENANT, Store, validate_name
from wasminfer.store.keys import check_known_scopes, hash_key

__all__ = ["ConfiguredKey", "KeyRing", "Principal", "parse_keys"]


@dataclass(frozen=True)
class Principal:
    """Who a request acts as: a tenant and the scopes its key grants."""

    tenant: str
    scopes: frozenset[str]
    key_id: str | None = None  # the store key's public id, None for a configured key or open access

    def allows(self, scope: str) -> bool:
        return "admin" in self.scopes or scope in self.scopes


@dataclass(frozen=True)
class ConfiguredKey:
    """An API key given on the command line or in `WASMINFER_API_KEYS` (never stored)."""

    key: str
    scopes: frozenset[str]
    tenant: str = DEFAULT_TENANT

    def __repr__(self) -> str:  # never print the secret
        return f"ConfiguredKey(key='…', scopes={sorted(self.scopes)}, tenant={self.tenant!r})"


def parse_keys(specs: str | Iterable[str]) -> list[ConfiguredKey]:
    """Parses `key:scope1+scope2[:tenant]` entries (a comma-separated string, or several).

    Raises `BadRequest` naming the bad entry (without the secret) for a missing key, an unknown
    scope or an invalid tenant name.
    """
    entries = [specs] if isinstance(specs, str) else list(specs)
    keys: list[ConfiguredKey] = []
    for n, entry in enumerate(e.strip() for text in entries for e in text.split(",")):
        if not entry:
            continue
        parts = entry.split(":")
        if len(parts) not in (2, 3) or not parts[0] or not parts[1]:
            raise BadRequest(f"API key entry {n + 1}: expected KEY:SCOPE[+SCOPE…][:TENANT]")
        try:
            scopes = check_known_scopes(s for s in parts[1].split("+") if s)
        except BadRequest as exc:
            raise BadRequest(f"API key entry {n + 1}: {exc.message}") from None
        tenant = parts[2] if len(parts) == 3 else DEFAULT_TENANT
        keys.append(ConfiguredKey(parts[0], scopes, validate_name("tenant", tenant)))
    return keys


class KeyRing:
    """The configured keys and the store's keys, looked up by a key's hash."""

    def __init__(self, store: Store, keys: Iterable[ConfiguredKey] = ()) -> None:
        self.store = store
        self._configured = {hash_key(k.key): k for k in keys}

    def any_key(self) -> bool:
        """Whether any key exists, configured or stored (with none, access is open)."""
        return bool(self._configured) or self.store.has_keys()

    def authenticate(self, key: str) -> Principal | None:
        """The principal of an API key (configured or stored), None if it is unknown or revoked."""
        configured = self._configured.get(hash_key(key))
        if configured is not None and hmac.compare_digest(configured.key, key):
            return Principal(configured.tenant, configured.scopes)
        found = self.store.verify_key(key)
        if found is None:
            return None
        tenant, scopes = found
        return Principal(tenant, frozenset(scopes), key_id=key.split("_")[1])
