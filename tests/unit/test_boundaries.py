"""Purity is structural: every module sits on the pure or the edge side of its folder's map, and the
pure ones, imported in a fresh interpreter, load nothing that touches the host, transitively.

Each package folder's __init__.py docstring maps its modules ("Pure side:" and "Edge side:"); these
tests hold the code to that map, so the map cannot go stale and a new module must be placed. The
wings are layered too: config imports nothing of iptables or service, iptables nothing of service.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from collections import deque
from collections.abc import Iterable, Iterator
from functools import cache
from pathlib import Path

import pytest

from tests.helpers import ROOT
from tools import module_map

PACKAGE = ROOT / "istio_vm"
FOLDERS = list(module_map.FOLDERS)
# What touches the host: processes, sockets, file locks, C calls, the proxy's admin, and the two
# libraries of the edge (the env-file lexer and systemd's C extension).
FORBIDDEN = frozenset({"subprocess", "ctypes", "socket", "selectors", "fcntl", "psutil", "systemd", "dotenv"})
LAYERS = {"config": {"iptables", "service"}, "iptables": {"service"}}  # wing -> wings it must not import


def module_name(folder: str, name: str) -> str:
    return ".".join(part for part in ("istio_vm", folder, name) if part)


@cache
def folder_map(folder: str) -> tuple[frozenset[str], frozenset[str]]:
    """(pure, edge) module names of a folder, as its __init__.py docstring maps them."""
    found = module_map.folder_map(folder)
    return frozenset(found.pure), frozenset(found.edge)


def pure_modules() -> list[str]:
    return sorted(module_name(folder, name) for folder in FOLDERS for name in folder_map(folder)[0])


def edge_modules() -> frozenset[str]:
    return frozenset(module_name(folder, name) for folder in FOLDERS for name in folder_map(folder)[1])


@cache
def loaded_by(module: str) -> frozenset[str]:
    """Every module in sys.modules after importing `module` alone in a fresh interpreter, and the top-level
    package of each (envfile loads dotenv.parser without running dotenv/__init__.py)."""
    code = f"import importlib, json, sys; importlib.import_module({module!r}); print(json.dumps(sorted(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          check=False)
    assert done.returncode == 0, done.stderr
    names = json.loads(done.stdout)
    return frozenset(names) | {name.split(".")[0] for name in names}


def _path_of(module: str) -> Path:
    base = PACKAGE.parent / module.replace(".", "/")
    return base / "__init__.py" if base.is_dir() else base.with_suffix(".py")


def _module_level_imports(path: Path) -> set[str]:
    """The modules a module imports when it is imported (not in function bodies, not under
    TYPE_CHECKING); `from a import b` counts as a.b only where the package has such a module."""
    def walk(nodes: Iterable[ast.AST]) -> Iterator[str]:
        for node in nodes:
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
                continue
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                yield from walk(node.orelse)
            elif isinstance(node, ast.Import):
                yield from (alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module:
                yield node.module
                yield from (f"{node.module}.{alias.name}" for alias in node.names
                            if node.module.startswith("istio_vm") and _path_of(f"{node.module}.{alias.name}").exists())
            else:
                yield from walk(ast.iter_child_nodes(node))

    return set(walk(ast.parse(path.read_text()).body))


def why(module: str, offender: str) -> str:
    """The import chain, through the package's own modules, from `module` to one that imports `offender`."""
    queue, seen = deque([[module]]), {module}
    while queue:
        chain = queue.popleft()
        imports = _module_level_imports(_path_of(chain[-1]))
        direct = sorted(i for i in imports if i == offender or i.startswith(offender + "."))
        if direct:
            return " -> ".join([*chain, direct[0]])
        for name in sorted(imports):
            if name.startswith("istio_vm") and name not in seen and _path_of(name).exists():
                seen.add(name)
                queue.append([*chain, name])
        stdlib = sorted(i for i in imports if i.split(".")[0] in sys.stdlib_module_names and offender in loaded_by(i))
        if stdlib:
            return " -> ".join([*chain, stdlib[0], f"(which loads {offender})"])
    return f"{module} -> ... -> {offender}"


@pytest.mark.parametrize("folder", FOLDERS)
def test_every_module_is_on_one_side_of_its_folders_map(folder: str) -> None:
    pure, edge = folder_map(folder)
    present = {p.stem for p in (PACKAGE / folder).glob("*.py") if p.name != "__init__.py"}
    assert pure, f"istio_vm/{folder}/__init__.py has no 'Pure side' map"
    assert not pure & edge, f"on both sides of the map: {sorted(pure & edge)}"
    assert pure | edge == present, (f"istio_vm/{folder}/__init__.py maps {sorted(pure | edge - present)} that do not "
                                    f"exist and misses {sorted(present - pure - edge)}")


def test_package_init_files_define_nothing() -> None:
    for folder in FOLDERS[1:]:
        body = ast.parse((PACKAGE / folder / "__init__.py").read_text()).body
        assert len(body) == 1, f"istio_vm/{folder}/__init__.py: a docstring and nothing else"
        assert isinstance(body[0], ast.Expr), f"istio_vm/{folder}/__init__.py: a docstring and nothing else"


@pytest.mark.parametrize("module", pure_modules())
def test_pure_module_loads_nothing_that_touches_the_host(module: str) -> None:
    loaded = loaded_by(module)
    touching = sorted(m for m in FORBIDDEN if m in loaded)
    if touching:  # name the chain to the import that does it, not to what that import loads in turn
        chains = sorted((why(module, m) for m in touching), key=lambda chain: ("which loads" in chain, len(chain)))
        pytest.fail(f"{module} loads {touching}: {chains[0]}")
    edge = sorted(loaded & edge_modules())
    assert not edge, f"{module} loads the edge module {edge[0]}: {why(module, edge[0])}"


@pytest.mark.parametrize("module", sorted(
    module_name(wing, path.stem) for wing in LAYERS for path in (PACKAGE / wing).glob("*.py")))
def test_wings_are_layered(module: str) -> None:
    wing = module.split(".")[1]
    for lower in LAYERS[wing]:
        above = sorted(m for m in loaded_by(module) if m.startswith(f"istio_vm.{lower}"))
        assert not above, f"{module} ({wing}) loads {above[0]}: {why(module, above[0])}"


def test_no_two_functions_classes_or_constants_of_the_package_share_a_name() -> None:
    """A name means one thing: two `Rule`s or two `LOCK_FILE`s make a reader look twice."""
    places: dict[str, list[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.parse(path.read_text()).body:
            names = [node.name] if isinstance(node, ast.FunctionDef | ast.ClassDef) else [
                target.id for target in getattr(node, "targets", []) if isinstance(target, ast.Name)
                and target.id.isupper()]
            for name in names:
                places.setdefault(name, []).append(str(path.relative_to(ROOT)))
    shared = {name: where for name, where in places.items() if len(where) > 1}
    assert not shared, f"names defined in more than one module: {shared}"


KEYWORD_ONLY = frozenset({"Capture", "Agent", "Supervision", "Config"})  # NamedTuples of many same-typed fields


def _python_files() -> Iterator[Path]:
    for top in ("istio_vm", "tests", "testbed", "benchmarks", "tools"):
        yield from sorted((ROOT / top).rglob("*.py"))


def test_the_wide_config_records_are_built_by_keyword() -> None:
    # They were kw_only dataclasses; as NamedTuples positional arguments would be accepted, and a swap of two
    # of Capture's nineteen strings would type-check. Every call names its fields (`_replace` does too).
    offenders = []
    for path in _python_files():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call) and node.args:
                name = node.func.id if isinstance(node.func, ast.Name) else (
                    node.func.attr if isinstance(node.func, ast.Attribute) else "")
                if name in KEYWORD_ONLY:
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}: {name}(...) with positional arguments")
    assert not offenders, "\n".join(offenders)
