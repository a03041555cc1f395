"""The structure drawn from the imports of host/wasminfer: no arrow from a lower layer to a higher one.

Every `import` and `from … import` of every module counts, at module level, inside functions and
under `if TYPE_CHECKING:` alike (read with `ast`, nothing is imported). The layers, lowest first:

    leaves   errors.py, syntax.py, _fs.py, manifest.py, model_options.py, parsing.py, and the package
             root (`wasminfer/__init__.py`: `__version__`): facts every layer may use; a leaf imports
             only leaves
    store    store/
    models   models/
    runtime  runtime/
    service  service.py with api_keys.py and digests.py
    jobs     jobs/: it invokes through `Platform`, so it sits above service; nothing below the gateway
             imports it (replicas/ and scaling/ do not, and neither imports it from them)
    replicas scaling/ and replicas/ (replicas use scaling's policies: one layer)
    gateway  gateway/
    outside  cli/, __main__.py, client.py, and what only the CLI uses: toolchain.py, examples.py

A module may import its own layer and those below it. Besides: nothing but the outside layer
imports client.py (so nothing under replicas/ does), gateway/ never imports wasmtime or
onnxruntime, starlette is imported only under gateway/, models/ never imports wasmtime.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "host" / "wasminfer"

LEAVES = frozenset({
    "wasminfer", "wasminfer.errors", "wasminfer.syntax", "wasminfer._fs", "wasminfer.manifest",
    "wasminfer.model_options", "wasminfer.parsing",
    "wasminfer.locations",  # where the machine's cache and the guest SDK are
    "wasminfer.pysource",  # a Python function's files as one zip: pure, the gateway and runtime use it
    "wasminfer.sniff",  # what an upload's bytes are, for a client that did not say: pure, the gateway's
    "wasminfer.params",  # the one description of a manifest key or model option (type, range, help)
    "wasminfer.shares",  # the fair-share arithmetic, applied by jobs' workers and replicas' threads alike
})
#: (layer, the modules and packages in it), lowest first.
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("leaves", tuple(sorted(LEAVES))),
    ("store", ("wasminfer.store",)),
    ("models", ("wasminfer.models",)),
    ("runtime", ("wasminfer.runtime",)),
    ("service", ("wasminfer.service", "wasminfer.api_keys", "wasminfer.digests")),
    ("jobs", ("wasminfer.jobs",)),
    ("replicas", ("wasminfer.scaling", "wasminfer.replicas")),
    ("gateway", ("wasminfer.gateway",)),
    ("outside", ("wasminfer.cli", "wasminfer.__main__", "wasminfer.client", "wasminfer.toolchain",
                 "wasminfer.examples")),
)
#: Third-party packages a part of the tree never imports: (module prefix, package).
FORBIDDEN = (
    ("wasminfer.gateway", "wasmtime"),
    ("wasminfer.gateway", "onnxruntime"),
    ("wasminfer.models", "wasmtime"),
)
#: Only these import starlette.
STARLETTE_USERS = ("wasminfer.gateway",)
#: Only these import client.py.
CLIENT_USERS = ("wasminfer.cli", "wasminfer.__main__")

#: Arrows that break a rule and are known, each with the reason; every one must still exist (an
#: arrow that went away is taken off this list). Only in code of others' scope (gateway/, cli.py,
#: models/) may a broken rule wait here; elsewhere the code is fixed.
ALLOWED: dict[tuple[str, str], str] = {
    # The package root's `__getattr__` hands users `wasminfer.Client`, importing client.py only when
    # that attribute is read; `from wasminfer import __version__` (jobs, gateway) never reaches it.
    ("wasminfer", "wasminfer.client"): "the public `wasminfer.Client`, imported on first use",
}


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def import_graph(root: Path) -> dict[str, set[str]]:
    """`module -> the names it imports`: modules of the tree by their dotted name (a name imported
    from a module counts as that module, and as the submodule if there is one by that name), other
    packages by their top-level name."""
    paths = {_module_name(p, root): p for p in sorted(root.rglob("*.py"))}
    graph: dict[str, set[str]] = {}
    for name, path in paths.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join(up + ([node.module] if node.module else []))
                targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
            else:
                continue
            for target in targets:
                if target in paths:
                    found.add(target)
                elif not target.startswith(root.name + ".") and target != root.name:
                    found.add(target.split(".")[0])
        found.discard(name)
        graph[name] = found
    return graph


def _within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def layer_of(module: str) -> int | None:
    """The index in `LAYERS` of the layer `module` belongs to, None if none claims it."""
    if module in LEAVES:
        return 0
    for rank, (_, members) in enumerate(LAYERS[1:], start=1):
        if any(_within(module, m) for m in members):
            return rank
    return None


def violations(graph: dict[str, set[str]]) -> dict[tuple[str, str], str]:
    """Every arrow that breaks a rule of the module docstring, with the rule it breaks."""
    found: dict[tuple[str, str], str] = {}
    for module, targets in graph.items():
        rank = layer_of(module)
        for target in targets:
            if target.startswith("wasminfer"):
                trank = layer_of(target)
                if rank is not None and trank is not None and trank > rank:
                    found[(module, target)] = (f"{LAYERS[rank][0]} imports the higher layer "
                                               f"{LAYERS[trank][0]}")
                if target == "wasminfer.client" and not module.startswith(CLIENT_USERS):
                    found[(module, target)] = "imports client.py"
                continue
            for prefix, package in FORBIDDEN:
                if target == package and _within(module, prefix):
                    found[(module, target)] = f"{prefix} imports {package}"
            if target == "starlette" and not any(_within(module, p) for p in STARLETTE_USERS):
                found[(module, target)] = "imports starlette outside gateway/"
    return found


# --- the tree as it is ------------------------------------------------------------------------------
def test_every_module_has_a_layer() -> None:
    graph = import_graph(PACKAGE)
    assert "wasminfer.runtime._wasm" in graph and "wasminfer.gateway.app" in graph
    assert [m for m in graph if layer_of(m) is None] == []


def test_no_arrow_breaks_a_rule_but_the_listed_ones() -> None:
    broken = violations(import_graph(PACKAGE))
    assert {arrow: rule for arrow, rule in broken.items() if arrow not in ALLOWED} == {}
    # The allow-list holds only arrows that still exist.
    assert sorted(set(ALLOWED) - set(broken)) == []


def test_the_layering_of_the_design_holds() -> None:
    graph = import_graph(PACKAGE)
    # The arrows the design draws exist (the graph is read, not empty) ...
    assert "wasminfer.service" in graph["wasminfer.replicas.fleet"]
    assert "wasminfer.runtime" in graph["wasminfer.service"]
    assert "wasminfer.models" in graph["wasminfer.runtime.handler"]
    assert "wasminfer.store" in graph["wasminfer.jobs.store"]
    assert "wasmtime" in graph["wasminfer.runtime._wasm"]
    # ... and the ones it forbids do not.
    assert not any(t == "wasminfer.client" for m, ts in graph.items() if _within(m, "wasminfer.replicas")
                   for t in ts)
    gateway = [rank for rank, (name, _) in enumerate(LAYERS) if name == "gateway"][0]
    below_gateway = [m for m in graph if (layer_of(m) or 0) < gateway and not _within(m, "wasminfer.jobs")]
    assert [m for m in below_gateway if any(_within(t, "wasminfer.jobs") for t in graph[m])] == []


# --- the checker itself -----------------------------------------------------------------------------
def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "wasminfer"
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return root


def test_an_upward_import_inside_a_function_is_found(tmp_path: Path) -> None:
    root = _tree(tmp_path, {
        "__init__.py": "",
        "service.py": "from wasminfer.store import Store\n",
        "store/__init__.py": "from .store import Store\n",
        "store/store.py": "class Store:\n    def platform(self):\n        from ..service import Platform\n",
    })
    graph = import_graph(root)
    assert graph["wasminfer.store.store"] == {"wasminfer.service"}
    assert violations(graph) == {("wasminfer.store.store", "wasminfer.service"):
                                 "store imports the higher layer service"}


def test_forbidden_packages_and_client_imports_are_found(tmp_path: Path) -> None:
    root = _tree(tmp_path, {
        "__init__.py": "",
        "client.py": "import httpx\n",
        "replicas/__init__.py": "",
        "replicas/local.py": "from wasminfer import client\n",
        "gateway/__init__.py": "",
        "gateway/app.py": "import starlette.routing\nimport wasmtime\n",
        "models/registry.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import wasmtime\n",
        "runtime/host.py": "from starlette.requests import Request\n",
    })
    assert violations(import_graph(root)) == {
        ("wasminfer.replicas.local", "wasminfer.client"): "imports client.py",
        ("wasminfer.gateway.app", "wasmtime"): "wasminfer.gateway imports wasmtime",
        ("wasminfer.models.registry", "wasmtime"): "wasminfer.models imports wasmtime",
        ("wasminfer.runtime.host", "starlette"): "imports starlette outside gateway/",
    }
