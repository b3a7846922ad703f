"""Interception proved with traffic: rules installed by `apply.install_plan` in a "vm" namespace, real
connections from a "client" namespace (and from the vm as other users), on both backends.

A redirected connection is recognised by which listener accepts it, and by the original
destination the kernel reports on the accepted socket (SO_ORIGINAL_DST, or the local address under
TPROXY). Each test makes its own pair of namespaces and deletes it.
"""

from __future__ import annotations

import contextlib
import select
import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from istio_vm.iptables import apply
from istio_vm.iptables.backend import BACKENDS
from istio_vm.iptables.rules import Plan
from testbed.netns import CLIENT_V4, CLIENT_V6, VM_V4, VM_V6, Netns, Pair, pair
from tests.helpers import ip_commands, text

pytestmark = [pytest.mark.root, pytest.mark.parametrize("backend", BACKENDS)]

SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h; IP6T_SO_ORIGINAL_DST is also 80, on SOL_IPV6
IP_TRANSPARENT = 19
PROXY_UID, APP_UID = 997, 12345
DNS_SERVER = "10.10.10.6"


@pytest.fixture
def net() -> Iterator[Pair]:
    with pair() as p:
        yield p


def install(p: Pair, backend: str, tmp_path: Path, v4: str, v6: str = "", ip: list[list[str]] | None = None) -> None:
    with p.vm.entered():
        apply.install_plan(Plan.from_restore(v4, v6, ip or []), backend=backend, run_dir=str(tmp_path / "run"))


def listen(ns: Netns, address: str, port: int, *, kind: int = socket.SOCK_STREAM,
           transparent: bool = False) -> socket.socket:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with ns.entered():
        s = socket.socket(family, kind)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if transparent:
            s.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
        s.bind((address, port))
        if kind == socket.SOCK_STREAM:
            s.listen(8)
    s.settimeout(5)
    return s


def connect(address: str, port: int) -> tuple[str, int]:
    """Runs in a forked child inside a namespace: connect and return the local address."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect((address, port))
        local: tuple[str, int] = s.getsockname()[:2]
        return local


def pending(s: socket.socket) -> bool:
    """True when a connection or datagram is waiting on s (checked once the expected one arrived)."""
    return bool(select.select([s], [], [], 0)[0])


def original_dst(conn: socket.socket) -> tuple[str, int]:
    if conn.family == socket.AF_INET6:
        raw = conn.getsockopt(socket.IPPROTO_IPV6, SO_ORIGINAL_DST, 28)  # SOL_IPV6; struct sockaddr_in6
        return socket.inet_ntop(socket.AF_INET6, raw[8:24]), struct.unpack_from("!H", raw, 2)[0]
    raw = conn.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)  # struct sockaddr_in
    return socket.inet_ntoa(raw[4:8]), struct.unpack_from("!H", raw, 2)[0]


def accepted(listener: socket.socket) -> socket.socket:
    conn, _ = listener.accept()
    return conn


@contextlib.contextmanager
def sockets(*items: socket.socket) -> Iterator[None]:
    try:
        yield
    finally:
        for s in items:
            s.close()


def test_inbound_connection_is_redirected_to_15006(net: Pair, backend: str, tmp_path: Path) -> None:
    install(net, backend, tmp_path, text("reference-vm/expected-v4.restore"))
    inbound, app = listen(net.vm, "0.0.0.0", 15006), listen(net.vm, "0.0.0.0", 8080)
    with sockets(inbound, app):
        client_side = net.client.call(lambda: connect(VM_V4, 8080))
        with accepted(inbound) as conn:
            assert original_dst(conn) == (VM_V4, 8080)
            assert conn.getpeername() == client_side
        assert not pending(app)


def test_outbound_of_an_ordinary_user_is_redirected_to_15001(net: Pair, backend: str, tmp_path: Path) -> None:
    install(net, backend, tmp_path, text("reference-vm/expected-v4.restore"))
    outbound, server = listen(net.vm, "0.0.0.0", 15001), listen(net.client, CLIENT_V4, 80)
    with sockets(outbound, server):
        net.vm.call(lambda: connect(CLIENT_V4, 80), uid=APP_UID)
        with accepted(outbound) as conn:
            assert original_dst(conn) == (CLIENT_V4, 80)
        assert not pending(server)


def test_outbound_of_the_proxy_uid_is_not_redirected(net: Pair, backend: str, tmp_path: Path) -> None:
    install(net, backend, tmp_path, text("reference-vm/expected-v4.restore"))
    outbound, server = listen(net.vm, "0.0.0.0", 15001), listen(net.client, CLIENT_V4, 80)
    with sockets(outbound, server):
        local = net.vm.call(lambda: connect(CLIENT_V4, 80), uid=PROXY_UID)
        with accepted(server) as conn:
            assert conn.getpeername() == local
            assert conn.getsockname() == (CLIENT_V4, 80)
        assert not pending(outbound)


def test_inbound_all_ports_except_ssh_and_the_excluded_ones(net: Pair, backend: str, tmp_path: Path) -> None:
    install(net, backend, tmp_path, text("inbound-all/v4.restore"))  # ISTIO_INBOUND_PORTS=*
    inbound = listen(net.vm, "0.0.0.0", 15006)
    direct = {port: listen(net.vm, "0.0.0.0", port) for port in (15021, 22, 8080)}
    with sockets(inbound, *direct.values()):
        for port in (15021, 22):  # ISTIO_LOCAL_EXCLUDE_PORTS=15090,15021, and 1.9's hard-coded 22
            net.client.call(lambda port=port: connect(VM_V4, port))  # type: ignore[misc]
            with accepted(direct[port]) as conn:
                assert conn.getsockname() == (VM_V4, port)
            assert not pending(inbound)
        net.client.call(lambda: connect(VM_V4, 8080))
        with accepted(inbound) as conn:
            assert original_dst(conn) == (VM_V4, 8080)
        assert not pending(direct[8080])


def test_dns_query_of_an_ordinary_user_is_redirected_to_15053(net: Pair, backend: str, tmp_path: Path) -> None:
    net.client.ip("addr", "add", f"{DNS_SERVER}/32", "dev", net.client_if)
    net.vm.ip("route", "add", f"{DNS_SERVER}/32", "via", CLIENT_V4)
    install(net, backend, tmp_path, text("reference-vm/expected-v4.restore"))
    agent = listen(net.vm, "0.0.0.0", 15053, kind=socket.SOCK_DGRAM)
    server = listen(net.client, DNS_SERVER, 53, kind=socket.SOCK_DGRAM)

    def query(payload: bytes) -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.sendto(payload, (DNS_SERVER, 53))

    with sockets(agent, server):
        net.vm.call(lambda: query(b"app"), uid=APP_UID)
        assert agent.recvfrom(64)[0] == b"app"
        net.vm.call(lambda: query(b"proxy"), uid=PROXY_UID)  # the agent's own queries go out
        assert server.recvfrom(64)[0] == b"proxy"
        assert not pending(agent)
        assert not pending(server)


def test_tproxy_inbound_keeps_the_original_destination(net: Pair, backend: str, tmp_path: Path) -> None:
    install(net, backend, tmp_path, text("tproxy/v4.restore"), ip=ip_commands("tproxy/ip-commands.json"))
    assert "fwmark 0x539 lookup 133" in net.vm.ip("rule").stdout
    inbound = listen(net.vm, "0.0.0.0", 15006, transparent=True)
    app = listen(net.vm, "0.0.0.0", 8080)
    with sockets(inbound, app):
        client_side = net.client.call(lambda: connect(VM_V4, 8080))
        with accepted(inbound) as conn:
            assert conn.getsockname() == (VM_V4, 8080)  # TPROXY: no NAT, the socket sees the real address
            assert conn.getpeername() == client_side
        assert not pending(app)


def test_ipv6_inbound_is_redirected_to_15006(net: Pair, backend: str, tmp_path: Path) -> None:
    install(net, backend, tmp_path, text("ipv6/v4.restore"), text("ipv6/v6.restore"),
            ip_commands("ipv6/ip-commands.json"))
    assert "::6/128" in net.vm.ip("-6", "addr", "show", "dev", "lo").stdout
    inbound, app = listen(net.vm, "::", 15006), listen(net.vm, "::", 8080)
    with sockets(inbound, app):
        client_side = net.client.call(lambda: connect(VM_V6, 8080))
        with accepted(inbound) as conn:
            assert original_dst(conn) == (VM_V6, 8080)
            assert conn.getpeername()[:2] == client_side
            assert client_side[0] == CLIENT_V6
        assert not pending(app)
