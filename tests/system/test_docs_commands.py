"""Every command the docs show (```console blocks, `# ` = as root) runs, in order, in a real systemd.

The container is the one of tests/system/test_systemd_service.py (tests/system/container_vm.py): istio-vm
installed with `packaging/install`, the pilot-agent double as the proxy. A command must exit 0 unless its
line ends with `# exit N`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import ROOT
from tests.system.container_vm import Vm, agent_mode, why_no_container

DOCS = ROOT / "docs"
pytestmark = [
    pytest.mark.systemd,
    pytest.mark.root,
    pytest.mark.skipif(bool(why_no_container()), reason=why_no_container() or "-"),
]


@dataclass(frozen=True)
class DocCommand:
    where: str  # file:line
    command: str
    status: int


def doc_commands(path: Path) -> list[DocCommand]:
    found, in_block = [], False
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if line.startswith("```"):
            in_block = line.strip() == "```console" and not in_block
            continue
        if in_block and line.startswith("# "):
            command, _, comment = line[2:].partition("  # ")
            expected = re.match(r"exit (\d+)", comment)
            found.append(DocCommand(f"{path.name}:{number}", command.strip(), int(expected[1]) if expected else 0))
    return found


def test_the_docs_show_commands() -> None:
    commands = [c for doc in sorted(DOCS.glob("*.md")) for c in doc_commands(doc)]
    assert len(commands) >= 10
    assert any(c.status == 1 for c in commands)


def test_every_documented_command_runs_in_a_real_systemd(vm: Vm) -> None:
    agent_mode(vm)
    for doc in sorted(DOCS.glob("*.md")):
        for command in doc_commands(doc):
            done = vm.c.run(["sh", "-c", command.command], check=False, timeout=120)
            assert done.returncode == command.status, (
                f"{command.where}: `{command.command}` exited {done.returncode}, not {command.status}:\n"
                f"{done.stdout[-2000:]}{done.stderr[-2000:]}")
