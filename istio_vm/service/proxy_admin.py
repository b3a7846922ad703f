"""What the loop asks the proxy over HTTP on localhost: readiness, drain, active connections.

`ProxyAdmin` is the loop's seam; `admin_for()` picks pilot-agent's readiness port or Envoy's admin
API for a `ProxyCommand`. Every call has a short timeout and checks the status code (1.9's agent had
neither): a hung admin port must not hang the supervisor.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from types import ModuleType
from typing import Protocol

from istio_vm import loggers
from istio_vm.service.proxy_command import ProxyCommand

log = loggers.logger(__name__)

REQUEST_TIMEOUT = 1.0
AGENT_READINESS_PORT = 15021  # pilot-agent's /healthz/ready (served by its Envoy)
_PER_THREAD = re.compile(r"\.(worker_\d+|main_thread)$")
_ACTIVE = re.compile(r"^listener\.(?P<name>[^:]+)\.downstream_cx_active: (?P<count>\d+)$", re.MULTILINE)


def _http() -> ModuleType:
    """http.client, imported on the first request: it loads ssl and email (~10 ms), and the first probe
    comes after the proxy's spawn, so that time overlaps the proxy's own start instead of delaying it."""
    import http.client

    return http.client


def request(port: int, method: str, path: str, timeout: float = REQUEST_TIMEOUT) -> tuple[int, str]:
    connection = _http().HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request(method, path)
        response = connection.getresponse()
        return response.status, response.read().decode("utf-8", "replace")
    finally:
        connection.close()


def agent_ready(port: int = AGENT_READINESS_PORT) -> bool:
    """pilot-agent's readiness, as Envoy's :15021 serves it (`/healthz/ready` answers 200)."""
    try:
        status, _ = request(port, "GET", "/healthz/ready")
    except (OSError, _http().HTTPException):
        return False
    return status == 200


def envoy_ready(port: int, restart_epoch: int) -> bool:
    """Envoy's admin says LIVE, and it is the epoch we started (not the parent of a hot restart)."""
    try:
        status, body = request(port, "GET", "/server_info")
        info = json.loads(body) if status == 200 else {}
    except (OSError, _http().HTTPException, ValueError):
        return False
    epoch = info.get("command_line_options", {}).get("restart_epoch", 0)
    return info.get("state") == "LIVE" and int(epoch) == restart_epoch


def drain(port: int, *, inbound_only: bool) -> None:
    """Fail health checks, then drain listeners gracefully (inbound only by default, as Istio 1.9)."""
    path = "/drain_listeners?graceful" + ("&inboundonly" if inbound_only else "")
    for method_path in ("/healthcheck/fail", path):
        try:
            status, body = request(port, "POST", method_path)
        except (OSError, _http().HTTPException) as e:
            log.warning("POST %s failed: %s", method_path, e, extra={"ISTIO_EVENT": "drain"})
            continue
        if status != 200:
            log.warning("POST %s answered %s: %s", method_path, status, body.strip(), extra={"ISTIO_EVENT": "drain"})


def active_connections(port: int) -> int | None:
    """Downstream connections open on the proxy's listeners (not admin); None when unknown."""
    try:
        status, body = request(port, "GET", "/stats?filter=downstream_cx_active$")
    except (OSError, _http().HTTPException):
        return None
    if status != 200:
        return None
    # Per-thread copies (listener.X.worker_0..., listener.admin.main_thread...) repeat the totals; the
    # admin listener is our own probe.
    counts = [int(m["count"]) for m in _ACTIVE.finditer(body)
              if m["name"] != "admin" and not _PER_THREAD.search(m["name"])]
    return sum(counts)


class ProxyAdmin(Protocol):
    def ready(self, restart_epoch: int) -> bool: ...
    def drain(self) -> None: ...
    def active_connections(self) -> int | None: ...


@dataclass(frozen=True, slots=True)
class AgentAdmin:
    port: int = AGENT_READINESS_PORT

    def ready(self, restart_epoch: int) -> bool:
        return agent_ready(self.port)

    def drain(self) -> None:  # pilot-agent drains Envoy itself on SIGTERM
        pass

    def active_connections(self) -> int | None:
        return None


@dataclass(frozen=True, slots=True)
class EnvoyAdmin:
    port: int
    inbound_only: bool

    def ready(self, restart_epoch: int) -> bool:
        return envoy_ready(self.port, restart_epoch)

    def drain(self) -> None:
        drain(self.port, inbound_only=self.inbound_only)

    def active_connections(self) -> int | None:
        return active_connections(self.port)


def admin_for(command: ProxyCommand) -> ProxyAdmin:
    """Envoy's admin API when the proxy is Envoy itself, else pilot-agent's readiness port."""
    if command.admin_port is None:
        return AgentAdmin()
    return EnvoyAdmin(command.admin_port, inbound_only=command.drain_inbound_only)
