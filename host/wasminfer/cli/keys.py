"""`wasminfer key add|ls|revoke`: API keys in a data folder's store (the server need not run)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from wasminfer.cli.common import DEFAULT_DATA, err, key_app, out


@key_app.command("add")
def key_add(
    scope: Annotated[list[str], typer.Option(help="admin, invoke or read; repeatable.")],
    tenant: Annotated[str, typer.Option(help="The tenant the key acts for.")] = "default",
    data: Annotated[Path, typer.Option(help="Data folder.")] = DEFAULT_DATA,
) -> None:
    """Create an API key in the store and print it (shown once). A server started without keys
    requires them after its next restart."""
    from wasminfer.store import Store
    from wasminfer.store.keys import check_known_scopes

    with Store(data) as store:
        plaintext = store.add_key(check_known_scopes(scope), tenant=tenant)
    out.print(plaintext, highlight=False)


@key_app.command("ls")
def key_ls(
    tenant: Annotated[str, typer.Option(help="The tenant.")] = "default",
    data: Annotated[Path, typer.Option(help="Data folder.")] = DEFAULT_DATA,
) -> None:
    """List a tenant's stored keys (ids and scopes, never secrets)."""
    from wasminfer.store import Store

    with Store(data) as store:
        keys = store.list_keys(tenant=tenant)
    for k in keys:
        out.print(f"{k.id}  {'+'.join(k.scopes)}  {k.created_at:.0f}{'  revoked' if k.revoked else ''}")


@key_app.command("revoke")
def key_revoke(
    key_id: Annotated[str, typer.Argument(help="The key's id (the hex part after 'wik_').")],
    tenant: Annotated[str, typer.Option(help="The tenant.")] = "default",
    data: Annotated[Path, typer.Option(help="Data folder.")] = DEFAULT_DATA,
) -> None:
    """Revoke a stored key (takes effect at once, also on a running server)."""
    from wasminfer.store import Store

    with Store(data) as store:
        store.revoke_key(key_id, tenant=tenant)
    err.print(f"revoked {key_id}")
