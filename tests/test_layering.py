"""The package layering, read from the source with ``ast`` (nothing is imported).

    fedsms (library, no Flower)  <-  fedsms_flower (shared Flower side)  <-  fedsms_server, fedsms_client

- ``fedsms`` imports no Flower and none of the Flower-side packages at module level (the
  ``simulate`` verb imports ``fedsms_flower`` lazily), and never the server or client package.
- ``fedsms_flower`` imports neither app package at module level (it names them as strings
  or imports them inside a function).
- ``fedsms_server`` and ``fedsms_client`` never import each other, not even lazily.
- The module-level import graph of the four packages has no cycle. Module level means
  outside any function body; imports under ``if TYPE_CHECKING:`` count (a type-only
  cycle still ties two modules together).
"""

from __future__ import annotations

import ast
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("fedsms", "fedsms_flower", "fedsms_server", "fedsms_client")
FLOWER_SIDE = {"flwr", "fedsms_flower", "fedsms_server", "fedsms_client"}


@dataclass
class Module:
    name: str
    path: Path
    is_package: bool
    top_level: set[str] = field(default_factory=set)  # imported outside any function body
    anywhere: set[str] = field(default_factory=set)  # every import, lazy ones included


def package_dirs() -> dict[str, Path]:
    """Where each installed package lives, as pyproject.toml maps it."""
    mapping = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    assert set(PACKAGES) <= set(mapping), f"pyproject.toml maps {sorted(mapping)}, expected {PACKAGES}"
    return {name: ROOT / mapping[name] for name in PACKAGES}


def discover() -> dict[str, Module]:
    modules = {}
    for package, folder in package_dirs().items():
        for path in sorted(folder.rglob("*.py")):
            parts = [package, *path.relative_to(folder).with_suffix("").parts]
            is_package = parts[-1] == "__init__"
            if is_package:
                parts.pop()
            modules[".".join(parts)] = Module(".".join(parts), path, is_package)
    for module in modules.values():
        read_imports(module, modules)
    return modules


def read_imports(module: Module, modules: dict[str, Module]) -> None:
    tree = ast.parse(module.path.read_text(), filename=str(module.path))
    package = module.name if module.is_package else module.name.rpartition(".")[0]

    def visit(node: ast.AST, in_function: bool) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            in_function = True
        targets = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            # `from pkg import sub` imports the submodule pkg.sub when there is one
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        for target in targets:
            module.anywhere.add(target)
            if not in_function:
                module.top_level.add(target)
        for child in ast.iter_child_nodes(node):
            visit(child, in_function)

    visit(tree, False)


def root(name: str) -> str:
    return name.partition(".")[0]


def internal(name: str, modules: dict[str, Module]) -> str | None:
    """The module of the four packages that an import of ``name`` loads (its longest known prefix)."""
    parts = name.split(".")
    while parts:
        if ".".join(parts) in modules:
            return ".".join(parts)
        parts.pop()
    return None


def cycles(modules: dict[str, Module]) -> list[list[str]]:
    """Strongly connected components of the module-level import graph with more than one
    module (or a module importing itself), each sorted; Tarjan's algorithm."""
    graph = {name: sorted({t for i in m.top_level if (t := internal(i, modules))}) for name, m in modules.items()}
    index, low, on_stack, stack, found = {}, {}, set(), [], []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph[v]:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return found


@pytest.fixture(scope="module")
def modules() -> dict[str, Module]:
    return discover()


def in_package(modules: dict[str, Module], package: str) -> list[Module]:
    return [m for m in modules.values() if root(m.name) == package]


def offending(modules: list[Module], imports: str, roots: set[str]) -> dict[str, list[str]]:
    """Per module, its ``imports`` ("top_level" or "anywhere") that land in one of ``roots``."""
    found = {m.name: sorted(i for i in getattr(m, imports) if root(i) in roots) for m in modules}
    return {name: hits for name, hits in found.items() if hits}


def test_the_walk_sees_every_package_and_real_edges(modules):
    for package in PACKAGES:
        assert package in modules and len(in_package(modules, package)) >= 2, package
    assert "fedsms_flower.records" in modules["fedsms_server.strategy"].top_level
    assert "fedsms_flower.records" in modules["fedsms_client.app"].top_level
    assert "fedsms_flower" in {root(i) for i in modules["fedsms.cli"].anywhere}  # the lazy simulate import


def test_the_library_imports_no_flower_side_at_module_level(modules):
    library = in_package(modules, "fedsms")
    leaks = offending(library, "top_level", FLOWER_SIDE)
    assert not leaks, f"fedsms modules import Flower-side code at module level: {leaks}"
    apps = offending(library, "anywhere", {"fedsms_server", "fedsms_client"})
    assert not apps, f"fedsms modules import an app package: {apps}"


def test_the_shared_flower_package_imports_no_app_at_module_level(modules):
    leaks = offending(in_package(modules, "fedsms_flower"), "top_level", {"fedsms_server", "fedsms_client"})
    assert not leaks, f"fedsms_flower imports an app package at module level: {leaks}"


@pytest.mark.parametrize("package, other", [("fedsms_server", "fedsms_client"), ("fedsms_client", "fedsms_server")])
def test_server_and_client_never_import_each_other(modules, package, other):
    leaks = offending(in_package(modules, package), "anywhere", {other})
    assert not leaks, f"{package} imports {other}: {leaks}"


def test_no_import_cycles(modules):
    found = cycles(modules)
    assert not found, "import cycles: " + "; ".join(" <-> ".join(c) for c in found)
