"""What each command imports, in a fresh interpreter: start-up time is part of every command.

`--help` loads argparse and nothing else of weight; `iptables plan` the config and iptables wings but no
supervisor, process or network module (and python-dotenv's lexer without the package's loading API);
`istio-start init` and the iptables commands none of the supervisor stack. docs/benchmarks.md measures
what these sets cost (`python -m benchmarks.cli_startup`).
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

from tests.helpers import EXAMPLES, ROOT

PROBE = """
import contextlib, io, sys
{setup}
with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):
    {code}
print(sorted(sys.modules))
"""
SUPERVISOR = {"istio_vm.service.loop", "istio_vm.service.machine", "istio_vm.service.processes",
              "istio_vm.service.proxy_admin", "istio_vm.service.notify", "psutil", "http.client", "systemd"}
DOTENV_LOADING_API = {"dotenv", "dotenv.main", "pathlib", "tempfile", "urllib.parse"}


def loaded(code: str, setup: str = "", env: dict[str, str] | None = None) -> set[str]:
    done = subprocess.run([sys.executable, "-c", PROBE.format(setup=setup, code=code)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    return set(ast.literal_eval(done.stdout))


def env_files(tmp_path: Path, extra: str = "") -> list[str]:
    sidecar, cluster = tmp_path / "sidecar.env", tmp_path / "cluster.env"
    sidecar.write_text("")
    cluster.write_text((EXAMPLES / "cluster.env").read_text() + extra)
    for path in (tmp_path, sidecar, cluster):
        path.chmod(0o755 if path.is_dir() else 0o644)
    return ["--sidecar-env", str(sidecar), "--cluster-env", str(cluster)]


def test_help_loads_argparse_and_the_parser_only() -> None:
    modules = loaded("main(['--help'])", "from istio_vm.cli import main")
    assert {m for m in modules if m.startswith("istio_vm")} == {"istio_vm", "istio_vm.cli", "istio_vm.defaults"}
    assert not modules & {"logging", "dataclasses", "typing", "dotenv.parser", "subprocess", "json"}
    assert not modules & {"shutil", "bz2", "lzma"}  # argparse's width without shutil (cli._HelpFormatter)


def test_iptables_plan_loads_neither_the_supervisor_nor_the_network_nor_dotenvs_loading_api(tmp_path: Path) -> None:
    # With the workload IP and the IPv6 choice set, nothing is derived from the interfaces.
    argv = env_files(tmp_path, "ISTIO_SVC_IP=10.0.0.5\nENABLE_INBOUND_IPV6=false\nPOD_NAME=vm-1\n")
    env = {**os.environ, "PROXY_UID": str(os.geteuid())}
    modules = loaded(f"main({[*argv, 'iptables', 'plan']!r})", "from istio_vm.cli import main", env)
    assert "istio_vm.iptables.plan" in modules
    assert "dotenv.parser" in modules  # the lexer, loaded from its file
    assert not modules & DOTENV_LOADING_API
    assert not modules & SUPERVISOR
    assert not modules & {"socket", "ctypes", "subprocess", "json", "istio_vm.iptables.dot", "shutil"}
    # The records of the config and iptables wings are NamedTuples: dataclasses (with inspect, ast, dis) and
    # the code generation of each frozen dataclass were ~14 ms of every command (docs/benchmarks.md).
    assert not modules & {"dataclasses", "inspect"}
    assert "logging" not in modules  # nothing was logged (istio_vm/loggers.py)


def test_config_loads_no_logging_when_it_has_nothing_to_say(tmp_path: Path) -> None:
    argv = env_files(tmp_path, "ISTIO_SVC_IP=10.0.0.5\nENABLE_INBOUND_IPV6=false\nPOD_NAME=vm-1\n")
    env = {**os.environ, "PROXY_UID": str(os.geteuid())}
    for command in (["config"], ["config", "--check"], ["config", "--json"]):
        modules = loaded(f"main({[*argv, *command]!r})", "from istio_vm.cli import main", env)
        assert "istio_vm.config.render" in modules or command == ["config", "--check"]
        assert not modules & {"logging", "socket", "ctypes", "subprocess"}, command


def test_no_module_imports_logging_at_its_top_level() -> None:
    # Modules log through istio_vm/loggers.py, which imports logging at the first record: a module-level
    # `import logging` would load it for every command that imports the module.
    for path in sorted((ROOT / "istio_vm").rglob("*.py")):
        top_level = ast.parse(path.read_text()).body
        imported = {alias.name for node in top_level if isinstance(node, ast.Import) for alias in node.names}
        imported |= {node.module for node in top_level if isinstance(node, ast.ImportFrom) and node.module}
        assert "logging" not in imported, path


def test_a_derived_address_still_reads_the_interfaces(tmp_path: Path) -> None:
    env = {**os.environ, "PROXY_UID": str(os.geteuid())}
    modules = loaded(f"main({[*env_files(tmp_path), 'iptables', 'plan']!r})", "from istio_vm.cli import main", env)
    assert "ctypes" in modules  # the reference cluster.env leaves ISTIO_SVC_IP to be derived
    assert "socket" not in modules  # libc's inet_ntop writes the addresses (config/load.py)


def test_istio_start_init_and_the_iptables_commands_load_no_supervisor() -> None:
    modules = loaded("pass", "import istio_vm.cli, istio_vm.service.start, istio_vm.iptables.commands")
    assert not modules & SUPERVISOR
    assert not modules & DOTENV_LOADING_API
    assert not modules & {"dataclasses", "inspect"}  # the iptables wing's records are NamedTuples too


def test_the_supervisor_stack_defers_what_only_runs_after_the_spawn() -> None:
    # http.client (with ssl and email) serves the first probe and psutil the first exit: imported then, so
    # that their cost overlaps the proxy's start rather than delaying its spawn.
    modules = loaded("pass", "import istio_vm.service.start, istio_vm.service.loop")
    assert "istio_vm.service.proxy_admin" in modules
    assert not modules & {"http.client", "ssl", "email.parser", "psutil"}


def test_the_start_spawns_the_proxy_before_importing_the_iptables_wing_or_the_loop() -> None:
    # service/start.py: what runs before epoch 0's spawn, and what the loop itself loads afterwards (the
    # capture helper's module, with the apply engine, only for a policy that follows the proxy).
    before_spawn = loaded("pass", "import istio_vm.cli, istio_vm.config.load, istio_vm.service.start, "
                          "istio_vm.service.privileges, istio_vm.service.processes, istio_vm.service.proxy_command")
    assert not before_spawn & {"istio_vm.iptables.apply", "istio_vm.iptables.commands", "istio_vm.service.loop",
                               "istio_vm.service.machine", *SUPERVISOR - {"istio_vm.service.processes"}}
    assert not before_spawn & {"dataclasses", "inspect"}
    assert not before_spawn & {"istio_vm.iptables.rules", "istio_vm.iptables.saved", "tempfile", "socket"}
    loop = loaded("pass", "import istio_vm.service.loop")
    assert not loop & {"istio_vm.iptables.apply", "istio_vm.service.capture_helper", "subprocess"}
