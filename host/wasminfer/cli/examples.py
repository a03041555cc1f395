"""`serve --examples`: the example functions and their models deployed into the store, and a
`curl` line per example with a request body that works."""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING

from wasminfer.cli.common import build_with_progress, err, out, spinner

if TYPE_CHECKING:
    from wasminfer.service import Platform



def deploy_examples(platform: Platform) -> None:
    """Deploys every example (and its models) the store does not hold yet. An example that cannot be
    made here (a missing optional package, a failed build, a module this host refuses) is skipped
    with a warning: the others still serve."""
    from wasminfer.examples import EXAMPLES
    from wasminfer.manifest import Manifest
    from wasminfer.store import DEFAULT_TENANT

    tenant = DEFAULT_TENANT
    stored_models = {m["name"] for m in platform.list_models(tenant=tenant)}
    stored_functions = {f["name"] for f in platform.list_functions(tenant=tenant)}
    for ex in EXAMPLES:
        if ex.name in stored_functions:
            err.print(f"example {ex.name}: already deployed")
            continue
        try:
            for model in ex.models:
                if model.name not in stored_models:
                    with spinner(f"model {model.name}") as progress:
                        progress("making the ONNX model")
                        data = model.make()
                        progress(f"loading {len(data)} bytes")
                        platform.put_model(model.name, data, options=model.options, tenant=tenant)
                    stored_models.add(model.name)
            wasm = ex.upload(build_with_progress)
            view = platform.put_function(ex.name, wasm, Manifest.from_dict(ex.manifest()), tenant=tenant)
        except (ImportError, FileNotFoundError) as exc:
            err.print(
                f"[yellow]example {ex.name} skipped:[/yellow] {exc} (pip install 'wasminfer[examples]')",
                markup=True,
                highlight=False,
            )
            continue
        except Exception as exc:  # a failed build, a module this host refuses, a bug: the rest still serve
            text = str(exc).strip()
            first_line = text.splitlines()[0] if text else ""
            err.print(
                f"[yellow]example {ex.name} skipped:[/yellow] {type(exc).__name__}: {first_line}",
                highlight=False,
            )
            continue
        err.print(f"example {ex.name}: deployed version {view['version']} ({view['abi']} ABI)")


def print_example_requests(platform: Platform, host: str, port: int) -> None:
    """One curl line per deployed example, with a request body that works."""
    base = f"http://{host}:{port}"
    auth = "" if platform.open_access else ' -H "authorization: Bearer $WASMINFER_KEY"'
    deployed = {f["name"] for f in platform.list_functions()}
    lines = []
    if "digits" in deployed:
        from wasminfer.examples import digits_split

        pixels = [int(v) for v in digits_split()[1][0]]
        body = json.dumps({"pixels": pixels}, separators=(",", ":"))
        lines.append(
            f"curl -s {base}/v1/functions/digits/invoke{auth} -H 'content-type: application/json' -d '{body}'"
        )
    if "image-classify" in deployed:
        sample = platform.data_dir.resolve() / "examples" / "text.ppm"
        sample.parent.mkdir(parents=True, exist_ok=True)
        sample.write_bytes(sample_ppm())
        lines.append(
            f"curl -s {base}/v1/functions/image-classify/invoke{auth} "
            f"-H 'content-type: image/x-portable-pixmap' --data-binary @{sample}"
        )
    if "text-classify" in deployed:
        lines.append(
            f"curl -s {base}/v1/functions/text-classify/invoke{auth} -H 'content-type: text/plain' "
            "-d 'the team scored twice in the second half'"
        )
    if lines:
        err.print("[bold]Try:[/bold]")
        for line in lines:
            out.print(line, soft_wrap=True, highlight=False, markup=False)
        sys.stdout.flush()


def sample_ppm(width: int = 96, height: int = 64) -> bytes:
    """A small binary PPM: dark bars like lines of text on white."""
    rows = []
    for y in range(height):
        ink = 8 <= y % 16 < 13 and y < 56
        rows.append(
            bytes(
                (30 if ink and 6 <= x < 90 - (y // 16) * 14 else 250) for x in range(width) for _ in range(3)
            )
        )
    return f"P6\n{width} {height}\n255\n".encode() + b"".join(rows)
