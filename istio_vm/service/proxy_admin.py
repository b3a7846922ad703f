"""HTTP calls to the proxy on localhost: readiness, drain, active connections.

Every call has a short timeout and checks the status code (1.9's agent had neither): a hung admin
port must not hang the supervisor.
"""

from __future__ import annotations

import http.client
import json
import logging
import re

log = logging.getLogger(__name__)

TIMEOUT = 1.0
_PER_THREAD = re.compile(r"\.(worker_\d+|main_thread)$")
_ACTIVE = re.compile(r"^listener\.(?P<name>[^:]+)\.downstream_cx_active: (?P<count>\d+)$", re.MULTILINE)


def request(port: int, method: str, path: str, timeout: float = TIMEOUT) -> tuple[int, str]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request(method, path)
        response = connection.getresponse()
        return response.status, response.read().decode("utf-8", "replace")
    finally:
        connection.close()


def agent_ready(port: int = 15021) -> bool:
    """pilot-agent's readiness, as Envoy's :15021 serves it (`/healthz/ready` answers 200)."""
    try:
        status, _ = request(port, "GET", "/healthz/ready")
    except (OSError, http.client.HTTPException):
        return False
    return status == 200


def envoy_ready(port: int, restart_epoch: int) -> bool:
    """Envoy's admin says LIVE, and it is the epoch we started (not the parent of a hot restart)."""
    try:
        status, body = request(port, "GET", "/server_info")
        info = json.loads(body) if status == 200 else {}
    except (OSError, http.client.HTTPException, ValueError):
        return False
    epoch = info.get("command_line_options", {}).get("restart_epoch", 0)
    return info.get("state") == "LIVE" and int(epoch) == restart_epoch


def drain(port: int, *, inbound_only: bool) -> None:
    """Fail health checks, then drain listeners gracefully (inbound only by default, as Istio 1.9)."""
    path = "/drain_listeners?graceful" + ("&inboundonly" if inbound_only else "")
    for method_path in ("/healthcheck/fail", path):
        try:
            status, body = request(port, "POST", method_path)
        except (OSError, http.client.HTTPException) as e:
            log.warning("POST %s failed: %s", method_path, e, extra={"ISTIO_EVENT": "drain"})
            continue
        if status != 200:
            log.warning("POST %s answered %s: %s", method_path, status, body.strip(), extra={"ISTIO_EVENT": "drain"})


def active_connections(port: int) -> int | None:
    """Downstream connections open on the proxy's listeners (not admin); None when unknown."""
    try:
        status, body = request(port, "GET", "/stats?filter=downstream_cx_active$")
    except (OSError, http.client.HTTPException):
        return None
    if status != 200:
        return None
    # Per-thread copies (listener.X.worker_0..., listener.admin.main_thread...) repeat the totals; the
    # admin listener is our own probe.
    counts = [int(m["count"]) for m in _ACTIVE.finditer(body)
              if m["name"] != "admin" and not _PER_THREAD.search(m["name"])]
    return sum(counts)
