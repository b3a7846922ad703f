"""Inputs are checked before they are read, and error output is bounded (docs/security.md).

Env files and resolv.conf that are FIFOs, devices, sockets, directories, dangling symlinks or huge,
expansion bombs, secrets behind a symlink, a log directory the proxy cannot write: each is one line
naming the file, exit 78, fast; and `clean` still gets its settings.
"""

from __future__ import annotations

import os
import socket
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from istio_vm import cli
from istio_vm.config.envfile import MAX_VALUE, evaluate
from istio_vm.config.host import Host
from istio_vm.config.load import load, read_resolv_conf
from istio_vm.config.model import Shell
from istio_vm.config.sources import MAX_ENV_LINES, MAX_FILE_BYTES, Sources, read_shell
from istio_vm.errors import MAX_PROBLEMS_SHOWN, ConfigError, Problem
from istio_vm.iptables.commands import CleanSettings
from tests.helpers import EXAMPLES, EveryUser, alarm_after, fake_host

HOST = Host(hostname="vm-1", euid=os.geteuid(), users=EveryUser())
RESOLV_CONF = str(EXAMPLES / "resolv.conf")
MISSING = "/nonexistent/sidecar.env"


@pytest.fixture(autouse=True)
def deadline() -> Iterator[None]:
    """A read that blocks (a FIFO) fails the test after 5 s instead of hanging the suite."""
    with alarm_after(5, TimeoutError("blocked reading a configuration file")):
        yield


def load_problems(cluster: Path | str, environ: dict[str, str] | None = None) -> list[Problem]:
    with pytest.raises(ConfigError) as raised:
        load(Sources(sidecar_env=MISSING, cluster_env=str(cluster), resolv_conf=RESOLV_CONF), environ or {}, HOST)
    return list(raised.value.problems)


def fifo(tmp_path: Path) -> Path:
    path = tmp_path / "cluster.env"
    os.mkfifo(path)
    return path


def symlink_to(target: str, tmp_path: Path) -> Path:
    path = tmp_path / "cluster.env"
    path.symlink_to(target)
    return path


def directory(tmp_path: Path) -> Path:
    path = tmp_path / "cluster.env"
    path.mkdir()
    return path


def unix_socket(tmp_path: Path) -> Path:
    path = tmp_path / "cluster.env"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(path))
    return path


def huge_sparse(tmp_path: Path) -> Path:
    path = tmp_path / "cluster.env"
    with path.open("wb") as f:
        f.truncate(8 << 30)  # 8 GiB of holes: no disk, but read() would return every byte
    return path


def one_byte_too_many(tmp_path: Path) -> Path:
    path = tmp_path / "cluster.env"
    path.write_text("A=1\n" + "#" * (MAX_FILE_BYTES - 4) + "\n")
    return path


KINDS = {
    "fifo": (fifo, "not a regular file (a FIFO)"),
    "dev-zero": (lambda p: symlink_to("/dev/zero", p), "not a regular file (a character device)"),
    "dev-tty": (lambda p: symlink_to("/dev/tty", p), "not a regular file (a character device)"),
    "directory": (directory, "not a regular file (a directory)"),
    "socket": (unix_socket, "not a regular file (a socket)"),
    "dangling": (lambda p: symlink_to("/nonexistent/cluster.env", p), "a symlink to '/nonexistent/cluster.env', "
                 "which does not exist"),
    "huge": (huge_sparse, "larger than 384 KiB"),
    "just-too-big": (one_byte_too_many, "larger than 384 KiB"),
}


@pytest.mark.parametrize("kind", KINDS)
def test_an_env_file_that_is_not_a_small_regular_file_is_one_problem(kind: str, tmp_path: Path) -> None:
    make, reason = KINDS[kind]
    path = make(tmp_path)
    [problem] = load_problems(path)
    assert str(problem) == f"{path}: {reason}" or str(problem).startswith(f"{path}: {reason}")


@pytest.mark.parametrize("kind", ["fifo", "dev-zero", "dangling", "huge"])
def test_the_resolv_conf_is_checked_the_same_way(kind: str, tmp_path: Path) -> None:
    make, reason = KINDS[kind]
    resolv = read_resolv_conf(str(make(tmp_path)))
    assert resolv.error is not None
    assert resolv.error.startswith(reason)


def test_an_env_file_of_too_many_lines_is_one_problem(tmp_path: Path) -> None:
    path = tmp_path / "cluster.env"
    path.write_text("A=1\n" * (MAX_ENV_LINES + 1))
    [problem] = load_problems(path)
    assert str(problem).startswith(f"{path}: {MAX_ENV_LINES + 1} lines: more than the {MAX_ENV_LINES}")
    path.write_text("A=1\n" * MAX_ENV_LINES)
    load(Sources(sidecar_env=MISSING, cluster_env=str(path), resolv_conf=RESOLV_CONF), {}, HOST)


def test_dev_null_is_an_empty_env_file(tmp_path: Path) -> None:
    config = load(Sources(sidecar_env="/dev/null", cluster_env=MISSING, resolv_conf=RESOLV_CONF), {}, HOST)
    assert config.files == ("/dev/null",)


@pytest.mark.parametrize("kind", KINDS)
def test_clean_gets_its_settings_from_a_broken_env_file(kind: str, tmp_path: Path) -> None:
    """The unit's ExecStopPost: whatever the env file became, clean runs (with the defaults)."""
    path = KINDS[kind][0](tmp_path)
    shell = read_shell(Sources(sidecar_env=MISSING, cluster_env=str(path)), {}, os.geteuid())
    settings = CleanSettings.from_shell(shell)
    assert (settings.custom, settings.run_dir, settings.dry_run) == (False, "/run/istio-vm", False)


def test_an_expansion_bomb_is_refused_before_it_is_built() -> None:
    text = "A=xxxxxxxxxxxxxxxx\n" + "A=${A}${A}${A}${A}\n" * 40  # 16 * 4**40 characters, if built
    env: dict[str, str] = {}
    assignments, problems = evaluate(text, "b.env", env)
    assert len(env["A"]) <= MAX_VALUE
    assert problems
    assert all("more than the kernel passes to a process" in p.message for p in problems)
    assert problems[0].where == f"b.env:{len(assignments) + 1}"


def test_many_values_that_add_up_are_refused_too() -> None:
    value = "y" * (MAX_VALUE - 1)
    text = "".join(f"V{i}='{value}'\n" for i in range(20))
    assignments, problems = evaluate(text, "m.env", {})
    assert 0 < len(assignments) < 20
    assert "(with the values before it)" in problems[0].message


def test_a_file_others_may_not_read_is_never_echoed(tmp_path: Path) -> None:
    """A symlink to /etc/shadow (or any secret) as an env file: its lines are refused, never shown."""
    secret = tmp_path / "secret"
    secret.write_text("root:$y$j9T$SECRETHASH:19000:0:99999:7:::\nTOKEN=$(cat /x)\n")
    secret.chmod(0o640)
    problems = load_problems(symlink_to(str(secret), tmp_path))
    assert [p.where for p in problems] == [f"{tmp_path}/cluster.env:1", f"{tmp_path}/cluster.env:2"]
    text = "\n".join(str(p) for p in problems)
    assert "SECRETHASH" not in text
    assert "cat /x" not in text
    assert "not readable by others" in text
    secret.chmod(0o644)
    assert "SECRETHASH" in str(load_problems(tmp_path / "cluster.env")[0])  # readable by all: shown


def test_error_output_is_bounded(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    env = tmp_path / "cluster.env"
    env.write_text("bad line\n" * 5000 + "ENVOY_PORT='" + "9" * 200_000 + "'\n")
    status = cli.main(["--sidecar-env", MISSING, "--cluster-env", str(env), "config"])
    err = capsys.readouterr().err.splitlines()
    errors = [line for line in err if line.startswith("istio-vm: config error:")]
    assert status == 78
    assert len(errors) == MAX_PROBLEMS_SHOWN + 1
    assert errors[-1] == "istio-vm: config error: ... and 4981 more problems (fix the ones above first)"
    assert max(len(line) for line in err) < 600


def test_one_huge_value_is_shown_cut(tmp_path: Path) -> None:
    env = tmp_path / "cluster.env"
    env.write_text("ENVOY_PORT='" + "9" * 100_000 + "'\n")
    [problem] = load_problems(env)
    assert problem.value is not None
    assert len(problem.value) == 100_000
    assert len(str(problem)) < 300
    assert "(100000 characters)" in str(problem)


def test_control_characters_in_names_of_files_stay_on_one_line(tmp_path: Path) -> None:
    env = tmp_path / "a\nb\u2028.env"
    env.write_text("ENVOY_PORT=0\n")
    [problem] = load_problems(env)
    assert "\n" not in str(problem)
    assert "\u2028" not in str(problem)
    assert "a\\x0ab\\u2028.env:1: ENVOY_PORT='0'" in str(problem)


# ---- ISTIO_LOG_DIR, ISTIO_LOG_TARGET=files ---------------------------------------------------------

def problems_loading(env: Path, text: str) -> list[Problem]:
    """Load `text` as cluster.env with the reference VM's users (istio-proxy is uid 997)."""
    env.write_text(text)
    try:
        load(Sources(sidecar_env=MISSING, cluster_env=str(env), resolv_conf=RESOLV_CONF), {}, fake_host())
    except ConfigError as e:
        return list(e.problems)
    return []


def log_dir_problems(log_dir: Path, exec_user: str = "istio-proxy") -> list[Problem]:
    """With the files target."""
    return problems_loading(log_dir.parent / "c.env",
                            f"ISTIO_LOG_TARGET=files\nISTIO_LOG_DIR={log_dir}\nEXEC_USER={exec_user}\n")


def test_a_log_dir_the_proxy_can_write_is_fine(tmp_path: Path) -> None:
    (tmp_path / "log").mkdir(mode=0o777)
    (tmp_path / "log").chmod(0o777)
    assert log_dir_problems(tmp_path / "log") == []


@pytest.mark.parametrize(("setup", "reason"), [
    ("missing", "cannot be used: No such file or directory"),
    ("file", "not a directory"),
    ("not-writable", "istio-proxy (uid 997) may not create files in it"),
    ("fifo-log", "istio.log in it is a FIFO, not a regular file: move it away"),
    ("symlink-log", "istio.err.log in it is a symlink, not a regular file: move it away"),
    ("read-only-log", "istio-proxy (uid 997) may not write istio.log in it"),
])
def test_an_unusable_log_dir_is_a_config_error_before_anything_runs(setup: str, reason: str,
                                                                     tmp_path: Path) -> None:
    log_dir = tmp_path / "log"
    if setup == "file":
        log_dir.write_text("")
    elif setup != "missing":
        log_dir.mkdir()
        log_dir.chmod(0o755 if setup == "not-writable" else 0o777)
    if setup == "fifo-log":
        os.mkfifo(log_dir / "istio.log")
    if setup == "symlink-log":
        (log_dir / "istio.err.log").symlink_to("/etc/passwd")
    if setup == "read-only-log":
        (log_dir / "istio.log").write_text("")
        (log_dir / "istio.log").chmod(stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)
    [problem] = log_dir_problems(log_dir)
    assert (problem.where, problem.variable) == (f"{tmp_path}/c.env:2", "ISTIO_LOG_DIR")
    assert problem.message == f"{reason} (ISTIO_LOG_TARGET=files)"


def test_root_may_write_any_log_dir(tmp_path: Path) -> None:
    (tmp_path / "log").mkdir(mode=0o700)
    assert log_dir_problems(tmp_path / "log", exec_user="root") == []


def test_the_environment_shell_is_what_clean_reads() -> None:
    """CleanSettings reads only the four settings it needs, whatever else is broken."""
    shell = Shell({"ISTIO_VM_RUN_DIR": "/run/x", "ENVOY_PORT": "015001"}, {"ISTIO_VM_RUN_DIR": "a.env:1"},
                  problems=(Problem("a.env", None, None, "not a regular file (a FIFO): not read"),))
    assert CleanSettings.from_shell(shell).run_dir == "/run/x"


# ---- ISTIO_VM_METRICS_FILE -------------------------------------------------------------------------------

def metrics_problems(tmp_path: Path, value: str) -> list[Problem]:
    return problems_loading(tmp_path / "c.env", f"ISTIO_VM_METRICS_FILE={value}\n")


def test_a_metrics_file_in_a_directory_the_proxy_can_write_is_fine(tmp_path: Path) -> None:
    (tmp_path / "textfile").mkdir()
    (tmp_path / "textfile").chmod(0o777)
    assert metrics_problems(tmp_path, str(tmp_path / "textfile" / "istio-sidecar.prom")) == []


@pytest.mark.parametrize(("setup", "name", "reason"), [
    ("", "relative.prom", "not an absolute path"),
    ("", "/var/tmp/istio.txt", "not a *.prom file name (node_exporter's textfile collector reads only those)"),
    ("", "/var/tmp/.prom", "not a *.prom file name (node_exporter's textfile collector reads only those)"),
    ("missing", "m.prom", "directory {d}: cannot be used: No such file or directory"),
    ("not-writable", "m.prom", "directory {d}: istio-proxy (uid 997) may not create files in it"),
    ("fifo", "m.prom", "is a FIFO, not a regular file: move it away"),
])
def test_an_unusable_metrics_file_is_a_config_error_before_anything_runs(setup: str, name: str, reason: str,
                                                                         tmp_path: Path) -> None:
    directory = tmp_path / "textfile"
    if setup != "missing":
        directory.mkdir()
        directory.chmod(0o755 if setup == "not-writable" else 0o777)
    if setup == "fifo":
        os.mkfifo(directory / name)
    value = str(directory / name) if setup else name
    [problem] = metrics_problems(tmp_path, value)
    assert (problem.where, problem.variable, problem.value) == (f"{tmp_path}/c.env:1", "ISTIO_VM_METRICS_FILE", value)
    assert problem.message == reason.format(d=directory)


def test_commands_that_only_read_do_not_check_the_directories_the_service_writes(tmp_path: Path) -> None:
    """`iptables verify` runs in a unit whose file system is read-only (ProtectSystem=strict): the log and
    metrics directories it cannot write are start's business (and config --check's), not a config error."""
    (tmp_path / "ro").mkdir(mode=0o755)
    env = tmp_path / "c.env"
    env.write_text(f"ISTIO_LOG_TARGET=files\nISTIO_LOG_DIR={tmp_path}/ro\nISTIO_VM_METRICS_FILE={tmp_path}/ro/m.prom\n")
    sources = Sources(sidecar_env=MISSING, cluster_env=str(env), resolv_conf=RESOLV_CONF)
    with pytest.raises(ConfigError) as checked:
        load(sources, {}, fake_host())
    assert [p.variable for p in checked.value.problems] == ["ISTIO_LOG_DIR"]  # the first found: start stops there
    assert load(sources, {}, fake_host(), check_writes=False).supervision.metrics_file == f"{tmp_path}/ro/m.prom"
