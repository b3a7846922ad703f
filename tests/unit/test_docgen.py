"""Generated files stay in sync with istio_vm/config/settings.py (regenerate: python -m tools.docgen)."""

from __future__ import annotations

import re

import pytest

from istio_vm.config.envfile import evaluate
from istio_vm.config.settings import SETTINGS
from tools import docgen


@pytest.mark.parametrize("path", list(docgen.GENERATED), ids=lambda p: p.name)
def test_generated_file_is_up_to_date(path) -> None:
    assert path.read_text(encoding="utf-8") == docgen.GENERATED[path](), (
        f"{path} is stale: run `.venv/bin/python -m tools.docgen`")


def test_every_setting_is_documented() -> None:
    text = docgen.configuration_md()
    for setting in SETTINGS:
        assert f"`{setting.variable}`" in text
        assert setting.doc


def test_example_sidecar_env_is_all_comments_and_loads_to_nothing() -> None:
    text = docgen.example_sidecar_env()
    assignments, problems = evaluate(text, "sidecar.env", {})
    assert (assignments, problems) == ([], [])
    uncommented = [s[1:] for s in text.splitlines() if re.match(r"#[A-Z_][A-Z0-9_]*=", s)]
    assignments, problems = evaluate("\n".join(uncommented) + "\n", "sidecar.env", {})
    assert problems == []
    assert {a.name for a in assignments} >= {s.variable for s in SETTINGS if s.name != "ISTIO_SIDECAR_CONFIG"}


def test_svg_diagrams_are_rendered_from_the_current_dot_files() -> None:
    for dot_path in docgen.IMG.glob("*.dot"):
        svg = dot_path.with_suffix(".svg").read_text(encoding="utf-8")
        assert docgen.dot_hash(dot_path.read_text(encoding="utf-8")) in svg, (
            f"{dot_path.with_suffix('.svg')} is stale: run `.venv/bin/python -m tools.docgen`")


def test_iptables_md_shows_the_reference_restore_input_exactly() -> None:
    text = (docgen.ROOT / "docs" / "iptables.md").read_text(encoding="utf-8")
    reference = (docgen.ROOT / "tests" / "data" / "reference-vm" / "expected-v4.restore").read_text()
    assert "```\n" + reference + "```" in text
    assert "img/reference-vm.svg" in text
    assert "-j TPROXY --tproxy-mark 1337/0xffffffff --on-port 15006" in text
