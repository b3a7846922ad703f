"""The admin-API readers: active connections from Envoy's stats text (as Envoy 1.40 prints them)."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator

import pytest

from istio_vm.service import proxy_admin

STATS = """http.admin.downstream_cx_active: 1
http.inbound_http.downstream_cx_active: 2
listener.0.0.0.0_15001.downstream_cx_active: 1
listener.0.0.0.0_15001.worker_0.downstream_cx_active: 1
listener.0.0.0.0_15001.worker_1.downstream_cx_active: 0
listener.0.0.0.0_15006.downstream_cx_active: 2
listener.0.0.0.0_15006.worker_0.downstream_cx_active: 2
listener.0.0.0.0_15021.downstream_cx_active: 0
listener.admin.downstream_cx_active: 1
listener.admin.main_thread.downstream_cx_active: 1
"""


@pytest.fixture
def fake_envoy() -> Iterator[int]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = STATS.encode() if self.path.startswith("/stats") else b"{}"
            self.send_response(200)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def test_active_connections_sums_listeners_without_copies_or_admin(fake_envoy: int) -> None:
    assert proxy_admin.active_connections(fake_envoy) == 3


def test_unreachable_admin_means_unknown() -> None:
    assert proxy_admin.active_connections(1) is None
    assert proxy_admin.agent_ready(1) is False
    assert proxy_admin.envoy_ready(1, 0) is False
