"""API keys on a real server, through the `wasminfer` command: keys configured with `serve --key`
and `$WASMINFER_API_KEYS` (SECURITY.md, "Keys"), given to the CLI with `--key` and `$WASMINFER_KEY`.
A wrong or missing key is 401, a key without the scope 403, a tenant's key sees only its tenant,
and "configured keys (`--key`, `WASMINFER_API_KEYS`) are never stored".
"""

from __future__ import annotations

import hashlib
import secrets
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from live_server import last_line, live_server, one_line, wasminfer

# One worker runs the module (`--dist loadgroup`, as `just test` runs): one server, not one per worker.
pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("e2e_keys")]


@dataclass
class Keyed:
    url: str
    data: Path
    work: Path
    admin: str  # --key ADMIN:admin
    read: str  # --key READ:read
    invoke: str  # WASMINFER_API_KEYS: INVOKE:invoke,...
    acme: str  # ...,ACME:admin:acme (another tenant)

    def cli(self, *args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
        return wasminfer(*args, url=self.url, cwd=self.work, **kwargs)

    def configured(self) -> list[str]:
        return [self.admin, self.read, self.invoke, self.acme]


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, add_model: bytes, hostile_wasm: bytes
) -> Iterator[Keyed]:
    root = tmp_path_factory.mktemp("keys")
    work = root / "work"
    work.mkdir()
    (work / "add.onnx").write_bytes(add_model)
    (work / "hostile.wasm").write_bytes(hostile_wasm)
    admin, read, invoke, acme = (f"{role}-{secrets.token_hex(16)}" for role in ("adm", "rd", "inv", "acme"))
    env = {"WASMINFER_API_KEYS": f"{invoke}:invoke,{acme}:admin:acme"}
    with live_server(root / "data", root / "serve.log", "--key", f"{admin}:admin", "--key", f"{read}:read",
                     env=env) as (url, _):
        assert "OPEN ACCESS" not in (root / "serve.log").read_text()
        keyed = Keyed(url, root / "data", work, admin, read, invoke, acme)
        keyed.cli("deploy", "model", "add", "add.onnx", "--key", admin)
        keyed.cli("deploy", "function", "hostile.wasm", "--models", "add", "--memory-mb", "4", "--key", admin)
        yield keyed


def test_a_key_by_flag_deploys_and_a_key_by_environment_invokes(server: Keyed) -> None:
    """`serve --key KEY:admin` with `wasminfer deploy ... --key KEY`; `WASMINFER_API_KEYS` on the
    server with `$WASMINFER_KEY` for the CLI (cli.py: `--key` is also `$WASMINFER_KEY`)."""
    deployed = last_line(server.cli("deploy", "function", "hostile.wasm", "--name", "echo", "--key",
                                    server.admin).stderr)
    assert deployed.startswith("echo: deployed version 1 (handler ABI")
    out = server.cli("invoke", "echo", key=server.invoke, stdin="ehello by the environment's key")
    assert out.stdout == "ehello by the environment's key"
    # an async job with the invoke key: stored, run, and its output returned to the same key
    job = server.cli("invoke", "echo", "--async", "--wait", key=server.invoke, stdin="eas a job")
    assert job.stdout == "eas a job"


def test_a_wrong_or_missing_key_is_refused_with_401(server: Keyed) -> None:
    wrong = server.cli("ls", "--key", "not-" + server.admin, status=1)
    assert one_line(wrong.stderr) == "error: unauthorized: invalid or revoked API key"
    missing = server.cli("ls", status=1)
    assert one_line(missing.stderr) == (
        "error: unauthorized: an API key is required: send 'Authorization: Bearer KEY'")
    r = httpx.get(f"{server.url}/v1/functions", headers={"authorization": "Bearer not-" + server.admin})
    assert (r.status_code, r.json()["error"]["code"]) == (401, "unauthorized")
    assert r.headers["www-authenticate"].lower().startswith("bearer")


def test_a_read_key_reads_but_cannot_deploy_or_invoke(server: Keyed) -> None:
    """SECURITY.md: a `read` key may "list and read T's functions ... and models", not "change
    anything, invoke": 403, and nothing is stored."""
    listed = server.cli("ls", "--key", server.read).stdout
    assert "hostile" in listed and "add" in listed
    refused = server.cli("deploy", "function", "hostile.wasm", "--name", "sneaky", "--key", server.read,
                         status=1)
    assert one_line(refused.stderr) == (
        "error: forbidden: this API key lacks the 'admin' scope needed for PUT /v1/functions/sneaky "
        "(it has: read)")
    invoke = server.cli("invoke", "hostile", "--key", server.read, stdin="e", status=1)
    assert one_line(invoke.stderr).startswith("error: forbidden: this API key lacks the 'invoke' scope")
    r = httpx.get(f"{server.url}/v1/functions/sneaky", headers={"authorization": f"Bearer {server.admin}"})
    assert (r.status_code, r.json()["error"]["code"]) == (404, "function_not_found")


def test_a_tenants_key_sees_only_its_tenant(server: Keyed) -> None:
    """`KEY:SCOPE:TENANT` (serve --help): the key acts for that tenant; the default tenant's
    function is not there for it (404, as for a name that does not exist)."""
    listed = server.cli("ls", key=server.acme).stdout
    assert "hostile" not in listed
    missing = server.cli("invoke", "hostile", key=server.acme, stdin="e", status=1)
    assert one_line(missing.stderr) == "error: function_not_found: function 'hostile' does not exist"


def test_configured_keys_are_never_stored(server: Keyed) -> None:
    """SECURITY.md: "Configured keys (`--key`, `WASMINFER_API_KEYS`) are never stored" (a stored
    key is kept as its sha256): after every configured key was used, to deploy, read, invoke and run a
    job, no file of the data folder holds any of them, nor its sha256 (hex or raw), and the store
    lists no key."""
    for key in server.configured():
        r = httpx.get(f"{server.url}/v1/functions", headers={"authorization": f"Bearer {key}"})
        assert r.status_code in (200, 403), r.text  # known to the server: used, not refused
    server.cli("invoke", "hostile", "--async", "--wait", key=server.invoke, stdin="ea job's row")
    files = [f for f in server.data.rglob("*") if f.is_file()]
    assert any(f.name.endswith(".db-wal") or f.suffix == ".db" for f in files), [f.name for f in files]
    for key in server.configured():
        digest = hashlib.sha256(key.encode())
        forms = [key.encode(), digest.hexdigest().encode(), digest.digest()]
        for f in files:
            content = f.read_bytes()
            assert not any(form in content for form in forms), f"{f} holds a configured key ({key[:4]}…)"
    for tenant in ("default", "acme"):
        assert server.cli("key", "ls", "--tenant", tenant, "--data", str(server.data)).stdout == ""
