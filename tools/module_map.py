"""The package's module map, read from its folders' __init__.py docstrings ("Pure side:" / "Edge side:").

The docstrings are the source: tests/unit/test_boundaries.py holds the code to them, and docgen
writes the map into CONTRIBUTING.md from them.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "istio_vm"
FOLDERS = ("", "config", "iptables", "service")  # the package itself, then the three wings
_ENTRY = re.compile(r"^ {4}(\w+) {2,}(\S.*)$", re.MULTILINE)


@dataclass(frozen=True, slots=True)
class FolderMap:
    folder: str  # "" for the package itself
    title: str  # the docstring's first line
    pure: dict[str, str]  # module -> what it holds, in the docstring's order
    edge: dict[str, str]


def folder_map(folder: str) -> FolderMap:
    doc = ast.get_docstring(ast.parse((PACKAGE / folder / "__init__.py").read_text(encoding="utf-8"))) or ""
    pure_text, _, edge_text = doc.partition("\nEdge side")
    _, _, pure_text = pure_text.partition("\nPure side")
    return FolderMap(folder, doc.split("\n", 1)[0], dict(_ENTRY.findall(pure_text)), dict(_ENTRY.findall(edge_text)))


def markdown() -> str:
    """The map as a code block: each folder with its title, then its modules, pure first."""
    lines = ["```"]
    for folder in FOLDERS:
        found = folder_map(folder)
        lines.append(f"istio_vm/{folder + '/' if folder else ''}  {found.title}")
        for side, modules in (("pure", found.pure), ("edge", found.edge)):
            lines += [f"  {name + '.py':<20} {side}  {what}" for name, what in modules.items()]
        lines.append("")
    lines[-1] = "```"
    return "\n".join(lines) + "\n"
