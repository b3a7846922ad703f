"""The pure core imports no effect modules: it can be tested with plain values."""

from __future__ import annotations

import ast

import pytest

from tests.helpers import ROOT

PACKAGE = ROOT / "istio_vm"
PURE = ["config/envfile", "config/checks", "config/settings", "config/render", "errors", "iptables/plan",
        "iptables/rules", "iptables/explain", "iptables/dot", "config/start_args", "service/proxy_command",
        "iptables/found", "iptables/saved", "iptables/restore_input", "service/exits", "service/machine"]
# The supervisor and exits name signals (SIGTERM is a number to send or to decode) but never send one.
ALLOWED = {"service/machine": {"signal"}, "service/exits": {"signal"}}
FORBIDDEN = {"subprocess", "socket", "signal", "psutil", "systemd", "ctypes", "urllib", "http"}


@pytest.mark.parametrize("module", PURE)
def test_pure_module_imports_no_effects(module: str) -> None:
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert not imported & (FORBIDDEN - ALLOWED.get(module, set()))
    calls = {f"{n.func.value.id}.{n.func.attr}" for n in ast.walk(tree) if isinstance(n, ast.Call)
             and isinstance(n.func, ast.Attribute) and isinstance(n.func.value, ast.Name)}
    os_calls = {c for c in calls if c.startswith("os.")}
    assert {c for c in os_calls if not c.startswith("os.W")} <= {"os.fspath"}  # os.WIFEXITED & co. decode
    assert not {c for c in calls if c.startswith("signal.") and c != "signal.Signals"}
