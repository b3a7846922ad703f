"""The env-file corpus: istio-vm's loader assigns exactly what bash's `set -a; . FILE` assigns.

Each directory of tests/data/envfiles (but `reject`) is a case: `sidecar.env` and `cluster.env`
(either may be missing) and `environ.json`, the process environment. bash runs istio-start.sh 1.9's
own lines (`ISTIO_SIDECAR_CONFIG=${ISTIO_SIDECAR_CONFIG:-...}; [[ -r ... ]] && . ...`, then the same
for cluster.env) under `env -i`, with the two paths set to ./sidecar.env and ./cluster.env in the
case directory; `config.load` reads the same files through the same variables.
"""

from __future__ import annotations

import json
import random
import subprocess
from pathlib import Path

import pytest

from istio_vm.config.envfile import evaluate
from istio_vm.config.host import Host
from istio_vm.config.load import load
from istio_vm.config.sources import Sources
from tests.helpers import DATA, EXAMPLES, EveryUser

CORPUS = DATA / "envfiles"
CASES = sorted(p for p in CORPUS.iterdir() if p.is_dir() and p.name != "reject")
RESOLV_CONF = str(EXAMPLES / "resolv.conf")
BASH_OWN = frozenset({"PWD", "SHLVL", "_"})  # what bash adds to its own environment
PATHS = {"ISTIO_SIDECAR_CONFIG": "./sidecar.env", "ISTIO_CLUSTER_CONFIG": "./cluster.env"}
ISTIO_START = """set -a
ISTIO_SIDECAR_CONFIG=${ISTIO_SIDECAR_CONFIG:-./var/lib/istio/envoy/sidecar.env}
if [[ -r ${ISTIO_SIDECAR_CONFIG} ]]; then
  . "$ISTIO_SIDECAR_CONFIG"
fi
ISTIO_CLUSTER_CONFIG=${ISTIO_CLUSTER_CONFIG:-./var/lib/istio/envoy/cluster.env}
if [[ -r ${ISTIO_CLUSTER_CONFIG} ]]; then
  . "$ISTIO_CLUSTER_CONFIG"
fi
exec /usr/bin/env -0
"""


HOST = Host(hostname="vm-1.example.com", euid=1000, users=EveryUser())


def environ_of(case: Path) -> dict[str, str]:
    path = case / "environ.json"
    environ: dict[str, str] = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    assert all(isinstance(v, str) for v in environ.values()), path
    assert not PATHS.keys() & environ.keys(), f"{path}: the test sets {sorted(PATHS)} itself"
    return environ | PATHS


def bash_environment(case: Path, environ: dict[str, str]) -> dict[str, str]:
    """What bash exports after sourcing the case's files as istio-start.sh did."""
    result = subprocess.run(
        ["/usr/bin/env", "-i", *(f"{k}={v}" for k, v in environ.items()), "/bin/bash", "-c", ISTIO_START],
        cwd=case, capture_output=True, check=False, timeout=30,
    )
    assert (result.returncode, result.stderr.decode()) == (0, ""), f"bash did not read {case.name} cleanly"
    entries = result.stdout.decode("utf-8").split("\0")
    assert entries.pop() == ""
    exported = dict(entry.split("=", 1) for entry in entries)
    return {k: v for k, v in exported.items() if k not in BASH_OWN}


def test_corpus_is_large_enough() -> None:
    assert len(CASES) >= 30


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_loader_agrees_with_bash(case: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    environ = environ_of(case)
    expected = bash_environment(case, environ)
    monkeypatch.chdir(case)
    config = load(Sources(resolv_conf=RESOLV_CONF), environ, HOST)
    actual = dict(config.environment)
    assert actual == expected
    assert list(config.files) == [p for p in (actual["ISTIO_SIDECAR_CONFIG"], actual["ISTIO_CLUSTER_CONFIG"])
                                  if (case / p).exists()]


# Random files from tricky pieces (seeded, so the same every run): whatever the loader accepts, bash
# must read the same way. Only accepted files reach bash, so it never runs a command of its own.
PIECES = ["a", " ", "\t", "#", " #", "=", "*", "~", ":", "$", "${E}", "${EMPTY:-d e}", "${X:-~}", "${A}",
          "\\\\", '\\"', "\\q", "\n", "'", '"', "é", "\u00a0", "{", "}", ",", "/", "!", "?", "[x]", "$%", "$ ",
          ":~", "~/", "\\", "\\$", "$'", "\\n", "-", "@", "^", "&", ";", "|", "(", ")", "${B:-}", "$(id)", "`"]
NAMES = ["A", "B", "_a", "E", "EMPTY", "HOME", "X", "if"]


def random_line(r: random.Random) -> str:
    kind = r.random()
    if kind < 0.1:
        return r.choice(["", " ", "# " + r.choice(PIECES), "export " + r.choice(NAMES) + r.choice(["", " # c"])])
    inner = "".join(r.choice(PIECES) for _ in range(r.randint(0, 5)))
    quote = r.choice(["'", '"', ""])
    value = quote + inner.replace(quote, "") + quote if quote else inner.replace("\n", "")
    tail = r.choice(["", "", " ", " # c", "\t#c", "#c", " x", "x", ";"])
    return r.choice(["", "", "export ", " "]) + r.choice(NAMES) + "=" + value + tail


def test_random_files_agree_with_bash(tmp_path: Path) -> None:
    r = random.Random(1337)
    environ = {"HOME": "/home/vm", "E": "e", "EMPTY": "", "PATH": "/usr/bin:/bin"}
    compared = 0
    for _ in range(800):
        text = "\n".join(random_line(r) for _ in range(r.randint(1, 3))) + r.choice(["\n", ""])
        env = dict(environ)
        if evaluate(text, "s.env", env)[1]:
            continue
        (tmp_path / "sidecar.env").write_text(text, encoding="utf-8")
        assert bash_environment(tmp_path, environ | PATHS) == env | PATHS, text
        compared += 1
    assert compared > 100  # the generator still produces enough accepted files
