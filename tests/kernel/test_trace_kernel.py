"""`iptables trace` against the kernel: seeded flows, traced (planned and live), then made for real.

Per configuration one vm <-> client pair: the plan installed by the engine, listeners on every port
in both namespaces (15001/15006/15053 in the vm) answering with their port and SO_ORIGINAL_DST, then
every flow connected (TCP) or sent (UDP) from the client (inbound) or the vm as its uid/gid (outbound).
The trace's `captured` and `port` must be where the kernel delivered it, for every flow.
"""

from __future__ import annotations

import contextlib
import os
import random
import selectors
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from istio_vm.config.host import Host
from istio_vm.config.model import Config, ResolvConf, Shell
from istio_vm.config.resolve import build
from istio_vm.iptables import apply, commands
from istio_vm.iptables.backend import BACKENDS, binary
from istio_vm.iptables.plan import build_plan
from istio_vm.iptables.trace import Flow, HostView, Trace, tracer_for_plan
from testbed.netns import CLIENT_V4, CLIENT_V6, VM_V4, VM_V6, Netns, Pair, pair
from tests.helpers import EveryUser
from tests.kernel.test_traffic import IP_TRANSPARENT, original_dst

pytestmark = pytest.mark.root

PROXY = 997
APP = 12345
PROXY_PORTS = (15001, 15006, 15053)
PORTS = (22, 53, 80, 3306, 7000, 7070, 8080, 9090, 15008, 15021, 15090)
NAMESERVER = "10.99.1.53"
EXCLUDED = "10.99.1.16/28"
# The client holds these too (routed via the veth): the nameserver, and each side of EXCLUDED's edges.
REMOTE_V4 = (CLIENT_V4, NAMESERVER, "10.99.1.15", "10.99.1.16", "10.99.1.31", "10.99.1.32")
IDS = ((0, 0), (PROXY, PROXY), (APP, APP), (APP, PROXY), (PROXY, APP))
FLOWS_PER_CONFIG = 64


@dataclass(frozen=True)
class Setup:
    name: str
    env: dict[str, str]
    v6: bool = False


SETUPS = (
    Setup("reference", {"ISTIO_INBOUND_PORTS": "8080", "ISTIO_LOCAL_EXCLUDE_PORTS": "15090,15021",
                        "ISTIO_SERVICE_CIDR": "*", "ISTIO_META_DNS_CAPTURE": "true"}),
    Setup("inbound-all", {"ISTIO_INBOUND_PORTS": "*", "ISTIO_LOCAL_EXCLUDE_PORTS": "15090,15021,3306",
                          "ISTIO_SERVICE_CIDR": "*"}),
    Setup("cidrs", {"ISTIO_INBOUND_PORTS": "8080", "ISTIO_SERVICE_CIDR": "10.99.0.0/16",
                    "ISTIO_SERVICE_EXCLUDE_CIDR": EXCLUDED, "ISTIO_LOCAL_OUTBOUND_PORTS_EXCLUDE": "3306,7000",
                    "ISTIO_META_DNS_CAPTURE": "true"}),
    Setup("tproxy", {"ISTIO_INBOUND_INTERCEPTION_MODE": "TPROXY", "ISTIO_INBOUND_PORTS": "8080,9090",
                     "ISTIO_SERVICE_CIDR": "*"}),
    Setup("ipv6", {"ISTIO_INBOUND_PORTS": "8080", "ISTIO_SERVICE_CIDR": "*", "ENABLE_INBOUND_IPV6": "true",
                   "ISTIO_META_DNS_CAPTURE": "true"}, v6=True),
    Setup("kubevirt", {"ISTIO_INBOUND_PORTS": "8080", "ISTIO_SERVICE_CIDR": "*", "KUBEVIRT_INTERFACES": "{vm_if}"}),
)

FOREIGN = """*nat
:DOCKER - [0:0]
-I PREROUTING 1 -m addrtype --dst-type LOCAL -j DOCKER
-I OUTPUT 1 ! -d 127.0.0.0/8 -m addrtype --dst-type LOCAL -j DOCKER
-I OUTPUT 1 -p tcp --dport 7000 -j RETURN
-I OUTPUT 2 -p tcp --dport 9090 -m statistic --mode nth --every 2 --packet 0 -j RETURN
-A DOCKER -i docker0 -j RETURN
-A DOCKER ! -i docker0 -p tcp -m tcp --dport 7070 -j DNAT --to-destination 10.99.0.2:80
COMMIT
"""


def config_for(setup: Setup, vm_if: str, run_dir: str) -> Config:
    # The run dir the install wrote its state to: the host's own /run/istio-vm may hold another's.
    env = {k: v.format(vm_if=vm_if) for k, v in setup.env.items()} | {"ISTIO_VM_RUN_DIR": run_dir}
    return build(Shell(env, dict.fromkeys(env, "cluster.env:1")), Host(users=EveryUser()),
                 ResolvConf("/etc/resolv.conf", f"nameserver {NAMESERVER}\n"))


class Listeners:
    """TCP and UDP listeners on every port of both namespaces; each answers `NS PORT ORIGINAL-DST`."""

    def __init__(self, p: Pair) -> None:
        self.selector = selectors.DefaultSelector()
        self.sockets: list[socket.socket] = []
        for ns, role, ports in ((p.vm, "vm", PORTS + PROXY_PORTS), (p.client, "client", PORTS)):
            for family, address in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
                for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
                    for port in ports:
                        self._listen(ns, role, family, kind, address, port)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _listen(self, ns: Netns, role: str, family: int, kind: int, address: str, port: int) -> None:
        with ns.entered():
            s = socket.socket(family, kind)
        self.sockets.append(s)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        if role == "vm" and port == 15006:  # the TPROXY listener: accepts connections not addressed to it
            s.setsockopt(socket.SOL_IP if family == socket.AF_INET else socket.IPPROTO_IPV6,
                         IP_TRANSPARENT if family == socket.AF_INET else 75, 1)
        s.bind((address, port))
        if kind == socket.SOCK_STREAM:
            s.listen(64)
        s.setblocking(False)
        self.selector.register(s, selectors.EVENT_READ, (role, port))

    def _serve(self) -> None:
        while not self.stop.is_set():
            for key, _ in self.selector.select(0.1):
                s: socket.socket = key.fileobj  # type: ignore[assignment]
                role, port = key.data
                with contextlib.suppress(OSError):
                    if s.type == socket.SOCK_STREAM:
                        conn, _ = s.accept()
                        with conn:
                            try:
                                orig = "{}:{}".format(*original_dst(conn))
                            except OSError:
                                orig = "-"
                            conn.setblocking(True)
                            conn.sendall(f"{role} {port} {orig}".encode())
                    else:
                        _, peer = s.recvfrom(512)
                        s.sendto(f"{role} {port} -".encode(), peer)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        for s in self.sockets:
            s.close()


def make(flows: list[Flow]) -> list[str]:
    """In a forked child in a namespace: make each flow, return what answered ("vm 15001 ORIG") or an error."""
    results = []
    for flow in flows:
        family = socket.AF_INET6 if ":" in flow.dst else socket.AF_INET
        kind = socket.SOCK_STREAM if flow.protocol == "tcp" else socket.SOCK_DGRAM
        try:
            with socket.socket(family, kind) as s:
                s.settimeout(2)
                if flow.src:
                    s.bind((flow.src, 0))
                if kind == socket.SOCK_STREAM:
                    s.connect((flow.dst, flow.dport))
                    results.append(s.recv(200).decode())
                else:
                    s.sendto(b"?", (flow.dst, flow.dport))
                    results.append(s.recvfrom(200)[0].decode())
        except OSError as e:
            results.append(f"error {e}")
    return results


def as_ids(uid: int, gid: int, flows: list[Flow]) -> Callable[[], list[str]]:
    def run() -> list[str]:
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)
        return make(flows)
    return run


def generate(setup: Setup, p: Pair, seed: int) -> list[Flow]:
    rng = random.Random(seed)
    v4 = (not setup.v6)
    local = [VM_V4, "127.0.0.1"] if v4 else [VM_V6, "::1"]
    remote = list(REMOTE_V4) if v4 else [CLIENT_V6]
    flows = []
    for _ in range(FLOWS_PER_CONFIG):
        protocol = rng.choice(("tcp", "tcp", "udp"))
        port = rng.choice(PORTS)
        if rng.random() < 0.4:
            client = CLIENT_V4 if v4 else CLIENT_V6
            flows.append(Flow("inbound", protocol, VM_V4 if v4 else VM_V6, port, client, None, 0, 0, p.vm_if))
            continue
        uid, gid = rng.choice(IDS)
        dst = rng.choice(local + remote)
        src: str | None = None
        if v4 and dst == "127.0.0.1" and rng.random() < 0.4:
            src = "127.0.0.6"  # the proxy's inbound passthrough
        flows.append(Flow("outbound", protocol, dst, port, src, None, uid, gid))
    return flows


def landed(answer: str) -> tuple[bool, int] | None:
    words = answer.split()
    if words[0] == "error":
        return None
    role, port = words[0], int(words[1])
    return role == "vm" and port in PROXY_PORTS, port


@contextlib.contextmanager
def installed(setup: Setup, tmp_path_str: str, backend: str, foreign: str = "") -> Iterator[tuple[Pair, Config]]:
    with pair("istio-vm-tr") as p:
        config = config_for(setup, p.vm_if, tmp_path_str)
        plan = build_plan(config.capture)
        with p.vm.entered():
            apply.install_plan(plan, backend=backend, run_dir=tmp_path_str)
        for address in REMOTE_V4[1:]:
            p.client.ip("addr", "add", f"{address}/32", "dev", p.client_if)
        p.vm.ip("route", "add", "10.99.1.0/24", "via", CLIENT_V4, "dev", p.vm_if)
        if foreign:
            p.vm.run(binary(backend, 4, "restore"), "--noflush", input=foreign)
        yield p, config


def run_flows(p: Pair, flows: list[Flow]) -> list[str]:
    answers: dict[int, str] = {}
    inbound = [i for i, f in enumerate(flows) if f.direction == "inbound"]
    for i, answer in zip(inbound, p.client.call(lambda: make([flows[i] for i in inbound])), strict=True):
        answers[i] = answer
    for uid, gid in IDS:
        group = [i for i, f in enumerate(flows) if f.direction == "outbound" and (f.uid, f.gid) == (uid, gid)]
        if group:
            out = p.vm.call(as_ids(uid, gid, [flows[i] for i in group]), timeout=60)
            answers.update(zip(group, out, strict=True))
    return [answers[i] for i in range(len(flows))]


def disagreements(flows: list[Flow], traces: list[Trace], answers: list[str], *, allow_unknown: bool) -> list[str]:
    bad = []
    for flow, trace, answer in zip(flows, traces, answers, strict=True):
        kernel = landed(answer)
        if trace.verdict == "unknown" and allow_unknown:
            continue
        redirected_tcp = trace.verdict == "redirect" and flow.protocol == "tcp" and kernel is not None
        if redirected_tcp and answer.split()[2] != f"{flow.dst}:{flow.dport}":  # the proxy sees where it was going
            bad.append(f"{flow.words()}: SO_ORIGINAL_DST is {answer.split()[2]}, not the flow's destination")
        if kernel != (trace.captured, trace.port):
            bad.append(f"{flow.words()} uid {flow.uid} gid {flow.gid} src {flow.src}: kernel {answer!r}, "
                       f"trace {trace.verdict} {trace.port} ({trace.sentence})")
    return bad


def host_view(p: Pair) -> HostView:
    return HostView(frozenset({VM_V4, VM_V6}), p.vm_if, sources={4: VM_V4, 6: VM_V6})


def observe(p: Pair, config: Config, flows: list[Flow]) -> tuple[list[Trace], list[Trace], list[str]]:
    """The flows traced over the plan and over the live rules (read in the vm), then made for real."""
    planned = tracer_for_plan(build_plan(config.capture), host_view(p))
    with p.vm.entered():
        live = commands.tracer(config, live=True)
    listeners = Listeners(p)
    try:
        answers = run_flows(p, flows)
    finally:
        listeners.close()
    return [planned.trace(f) for f in flows], [live.trace(f) for f in flows], answers


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("setup", SETUPS, ids=[s.name for s in SETUPS])
def test_trace_agrees_with_the_kernel(setup: Setup, backend: str, tmp_path: object) -> None:
    seed = 1300 + SETUPS.index(setup)  # the same flows for both backends
    with installed(setup, str(tmp_path), backend) as (p, config):
        flows = generate(setup, p, seed)
        planned_traces, live_traces, answers = observe(p, config, flows)
    assert not [t for t in planned_traces + live_traces if t.verdict == "unknown"]
    bad = disagreements(flows, planned_traces, answers, allow_unknown=False)
    bad += ["live: " + b for b in disagreements(flows, live_traces, answers, allow_unknown=False)]
    assert not bad, f"seed {seed}: {len(bad)} of {len(flows)} flows disagree:\n" + "\n".join(bad)
    assert any(t.captured for t in planned_traces)
    assert any(t.captured is False for t in planned_traces)


@pytest.mark.parametrize("backend", BACKENDS)
def test_live_with_foreign_rules_agrees_or_says_unknown(backend: str, tmp_path: object) -> None:
    setup = SETUPS[0]
    with installed(setup, str(tmp_path), backend, FOREIGN) as (p, config):
        flows = generate(setup, p, 1399)
        flows += [Flow("outbound", "tcp", CLIENT_V4, port, None, None, APP, APP) for port in (7000, 9090, 80)]
        flows += [Flow("inbound", "tcp", VM_V4, 7070, CLIENT_V4, None, 0, 0, p.vm_if)]
        planned_traces, live_traces, answers = observe(p, config, flows)
    bad = disagreements(flows, live_traces, answers, allow_unknown=True)
    assert not bad, "\n".join(bad)
    by_port = {(t.flow.direction, t.flow.dport): t for t in live_traces[-4:]}
    origins = {s.rule: s.origin for t in live_traces for s in t.steps}
    assert origins["-A OUTPUT -p tcp -m tcp --dport 7000 -j RETURN"] == "not installed by istio-vm"
    assert origins["-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001"] == "Set by: ENVOY_PORT=15001 (default)."
    assert by_port[("outbound", 7000)].verdict == "not-captured"  # the user's -I OUTPUT 1 RETURN
    assert "statistic" in by_port[("outbound", 9090)].sentence
    assert by_port[("inbound", 7070)].verdict == "unknown"  # Docker's DNAT is not modelled
    assert planned_traces[-4].verdict == "redirect"  # the plan does not see foreign rules


def test_generated_flows_cover_the_corners() -> None:
    fake = Pair(Netns("vm"), Netns("client"), "ivv", "ivc")
    flows = [f for setup in SETUPS for f in generate(setup, fake, 1300 + SETUPS.index(setup))]
    assert len(flows) >= 300
    seen = {(f.direction, f.protocol, f.dst, f.dport, f.src, f.uid, f.gid) for f in flows}

    def some(test: Callable[[tuple[str, str, str, int, str | None, int, int]], bool]) -> bool:
        return any(test(s) for s in seen)
    assert some(lambda s: s[5] == PROXY and s[6] != PROXY)
    assert some(lambda s: s[6] == PROXY and s[5] != PROXY)
    assert some(lambda s: s[2] == "127.0.0.1")
    assert some(lambda s: s[2] == VM_V4)
    assert some(lambda s: s[2] == "::1")
    assert some(lambda s: s[4] == "127.0.0.6")
    assert some(lambda s: s[3] == 53 and s[1] == "tcp")
    assert some(lambda s: s[3] == 53 and s[1] == "udp")
    assert some(lambda s: s[2] == NAMESERVER and s[3] == 53)
    for port in (15008, 15021, 15090, 3306, 22):
        assert some(lambda s, port=port: s[3] == port)  # type: ignore[misc]
    for address in REMOTE_V4[2:]:  # just outside, inside, inside, outside the excluded CIDR
        assert some(lambda s, address=address: s[2] == address and s[0] == "outbound")  # type: ignore[misc]
