"""Run `istio-vm start` for real in a private network namespace, with the pilot-agent double.

A `Service` has its own world-readable work directory (the daemon drops to istio-proxy, which
cannot read pytest's 0700 tmp dirs), a NOTIFY_SOCKET datagram socket the test reads, and the
double's record of what it was started with and what it received. The pieces the demo and the
benchmarks share: `istio_vm_command`, `envoy_settings`, `NotifySocket`.
"""

from __future__ import annotations

import contextlib
import grp
import importlib.resources
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from testbed.netns import Netns
from testbed.wait import wait_for

TESTBED = Path(__file__).parent
EXAMPLES = Path(str(importlib.resources.files("istio_vm") / "examples"))
REFERENCE_CLUSTER_ENV = EXAMPLES / "cluster.env"  # the reference Istio 1.9.4 VM's configuration
BUNDLED = EXAMPLES / "envoy-bootstrap.yaml"
VENV_BIN = Path(sys.executable).parent
ISTIO_VM = VENV_BIN / "istio-vm"


def istio_vm_command(netns: str, sidecar_env: Path, cluster_env: Path, *args: str) -> list[str]:
    """argv of `istio-vm --sidecar-env S --cluster-env C ARGS...` inside network namespace `netns`."""
    return ["ip", "netns", "exec", netns, str(ISTIO_VM), "--sidecar-env", str(sidecar_env),
            "--cluster-env", str(cluster_env), *args]


def envoy_settings(envoy: Path, bootstrap: Path, base_id: int, **settings: str) -> dict[str, str]:
    """cluster.env settings of envoy mode: the real Envoy, the bootstrap, a base id, short drain times."""
    return {"ISTIO_VM_PROXY": "envoy", "ENVOY_BINARY": str(envoy), "ENVOY_BOOTSTRAP": str(bootstrap),
            "ENVOY_BASE_ID": str(base_id), "ENVOY_DRAIN_TIME_S": "2", "ENVOY_PARENT_SHUTDOWN_TIME_S": "3", **settings}


class NotifySocket:
    """A NOTIFY_SOCKET for `istio-vm start` outside systemd: every sd_notify datagram it sent, in order."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.socket.bind(str(path))
        os.chmod(path, 0o777)  # the daemon sends as istio-proxy
        self.socket.setblocking(False)
        self.messages: list[str] = []

    def read(self) -> list[str]:
        """Every message so far (the ones that arrived since the last look appended)."""
        with contextlib.suppress(BlockingIOError):
            while True:
                self.messages.append(self.socket.recv(65536).decode())
        return self.messages

    def seen(self, text: str) -> bool:
        return any(text in m for m in self.read())

    def close(self) -> None:
        self.socket.close()


def traversable_by_others(path: Path) -> bool:
    """Every directory on the way to `path` lets other users through (istio-proxy must import us)."""
    return all(os.stat(p).st_mode & 0o001 for p in [path, *path.parents] if p.is_dir())


@dataclass
class Service:
    workdir: Path
    netns: str
    env: dict[str, str]
    proc: subprocess.Popen[str] | None = None
    notify: NotifySocket = field(init=False)

    def __post_init__(self) -> None:
        self.notify = NotifySocket(self.workdir / "notify.sock")

    @property
    def messages(self) -> list[str]:
        return self.notify.messages

    @property
    def record_path(self) -> Path:
        return self.workdir / "record.jsonl"

    def write_env(self, text: str) -> Path:
        path = self.workdir / "cluster.env"
        path.write_text(text)
        path.chmod(0o644)
        return path

    def command(self, *args: str) -> list[str]:
        return istio_vm_command(self.netns, self.workdir / "none.env", self.workdir / "cluster.env", *args)

    def envoy_mode(self, envoy: Path, base_id: int, **settings: str) -> None:
        """The reference VM in envoy mode: istio-vm installs its rules and runs the real Envoy (bundled
        bootstrap) as istio-proxy, whose UID the rules exempt."""
        bootstrap = self.workdir / "envoy-bootstrap.yaml"
        shutil.copy(BUNDLED, bootstrap)
        bootstrap.chmod(0o644)
        self.env.pop("PROXY_UID", None)  # derived from the istio-proxy user, whom Envoy runs as
        self.env.pop("ISTIO_CUSTOM_IP_TABLES", None)  # istio-vm installs the reference rules itself
        settings = envoy_settings(envoy, bootstrap, base_id, TERMINATION_DRAIN_DURATION="5s",
                                  ISTIO_VM_BACKOFF_INITIAL="0.2s", **settings)
        self.write_env(REFERENCE_CLUSTER_ENV.read_text() + "".join(f"{k}={v}\n" for k, v in settings.items()))

    def start(self, *args: str) -> subprocess.Popen[str]:
        """Start `istio-vm start ARGS`; its stderr goes to daemon.log (see `log()`)."""
        with open(self.workdir / "daemon.log", "w") as log:
            self.proc = subprocess.Popen(self.command("start", *args), env=self.env, stdout=subprocess.PIPE,
                                         stderr=log, text=True, start_new_session=True)
        return self.proc

    def log(self) -> str:
        path = self.workdir / "daemon.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def run(self, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.command(*args), env=self.env, capture_output=True, text=True, timeout=timeout,
                              check=False)

    def records(self, event: str | None = None) -> list[dict[str, Any]]:
        if not self.record_path.exists():
            return []
        lines = [json.loads(line) for line in self.record_path.read_text().splitlines() if line]
        return [r for r in lines if event is None or r["event"] == event]

    def read_notifications(self) -> list[str]:
        return self.notify.read()

    def wait_notification(self, text: str, timeout: float = 15) -> None:
        try:
            wait_for(lambda: self.notify.seen(text), timeout, f"notification {text!r}")
        except AssertionError as e:
            raise AssertionError(f"{e}; notifications: {self.messages}; daemon log:\n{self.log()[-4000:]}") from None

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        os.kill(self.daemon_pid(), signum)

    def daemon_pid(self) -> int:
        """The istio-vm process (`ip netns exec` execs it, so it is the Popen's pid)."""
        assert self.proc is not None
        return self.proc.pid

    def wait_exit(self, timeout: float = 30) -> tuple[int, str, str]:
        """The exit status, stdout and stderr (daemon.log) of `istio-vm start`."""
        assert self.proc is not None
        out, err = self.proc.communicate(timeout=timeout)
        return self.proc.returncode, out, err if err is not None else self.log()

    def processes(self) -> list[psutil.Process]:
        """Every process left that belongs to this service (by its work directory in the environment)."""
        found = []
        for process in psutil.process_iter():
            with contextlib.suppress(psutil.Error):
                if process.environ().get("DOUBLE_RECORD") == str(self.record_path):
                    found.append(process)
        return found

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.communicate(timeout=10)
        for process in self.processes():
            with contextlib.suppress(psutil.Error):
                process.kill()
        self.notify.close()


def make_bin(workdir: Path) -> Path:
    """$ISTIO_BIN_BASE with a `pilot-agent` that runs the double with the venv's Python."""
    bin_dir = workdir / "bin"
    bin_dir.mkdir()
    shutil.copy(TESTBED / "pilot_agent.py", workdir / "pilot_agent.py")
    wrapper = bin_dir / "pilot-agent"
    wrapper.write_text(f'#!/bin/sh\nexec {sys.executable} {workdir}/pilot_agent.py "$0" "$@"\n')
    wrapper.chmod(0o755)
    return bin_dir


@contextlib.contextmanager
def service(extra_env: dict[str, str] | None = None, netns: str | None = None) -> Iterator[Service]:
    """A work directory, a network namespace (or `netns`) and an unstarted Service; all removed after."""
    workdir = Path(tempfile.mkdtemp(prefix="istio-vm-svc-", dir="/tmp"))
    workdir.chmod(0o755)
    try:
        bin_dir = make_bin(workdir)
        (workdir / "run").mkdir(mode=0o755)  # root's: root refuses a run dir others could write
        (workdir / "log").mkdir(mode=0o777)
        (workdir / "log").chmod(0o777)
        record = workdir / "record.jsonl"
        record.touch(mode=0o666)
        record.chmod(0o666)
        env = {
            "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "ISTIO_BIN_BASE": str(bin_dir), "ISTIO_VM_RUN_DIR": str(workdir / "run"),
            "ISTIO_LOG_DIR": str(workdir / "log"), "NOTIFY_SOCKET": str(workdir / "notify.sock"),
            "DOUBLE_RECORD": str(record), "ISTIO_CUSTOM_IP_TABLES": "true", "PROXY_UID": "1337",
            **(extra_env or {}),
        }
        with contextlib.ExitStack() as stack:
            name = netns or stack.enter_context(Netns.temporary("svc")).name
            svc = Service(workdir, name, env)
            try:
                yield svc
            finally:
                svc.close()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


@contextlib.contextmanager
def extra_group(user: str) -> Iterator[int]:
    """A supplementary group `user` belongs to for the duration (to see initgroups at work)."""
    name = f"ivmt{uuid.uuid4().hex[:6]}"
    subprocess.run(["groupadd", "--system", name], check=True)
    try:
        subprocess.run(["usermod", "--append", "--groups", name, user], check=True)
        yield grp.getgrnam(name).gr_gid
    finally:
        subprocess.run(["gpasswd", "--delete", user, name], check=False, capture_output=True)
        subprocess.run(["groupdel", name], check=False)


def ensure_user(name: str = "istio-proxy") -> pwd.struct_passwd:
    """The proxy user exists (scripts/setup creates it; so does the package's sysusers.d)."""
    try:
        return pwd.getpwnam(name)
    except KeyError:
        subprocess.run(["useradd", "--system", "--user-group", "--home-dir", "/var/lib/istio", "--no-create-home",
                        "--shell", "/usr/sbin/nologin", name], check=True)
        return pwd.getpwnam(name)
