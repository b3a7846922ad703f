"""Config: istio-start.sh / istio-iptables 1.9 defaults and derivations, sources, precedence, dumps."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest

from istio_vm.config import render
from istio_vm.config.host import Address, Host, User
from istio_vm.config.load import load
from istio_vm.config.model import Config, ResolvConf, Shell
from istio_vm.config.resolve import build
from istio_vm.config.sources import Sources
from istio_vm.errors import ConfigError
from tests.helpers import DATA

REFERENCE = DATA / "reference-vm"


USERS = {"istio-proxy": User("istio-proxy", 997, 996, "/var/lib/istio"), "root": User("root", 0, 0, "/root")}


HOST = Host(
    addresses=(
        Address("lo", "127.0.0.1", True, True),
        Address("eth0", "10.0.0.5", False, True),
        Address("lo", "::1", True, True),
        Address("eth0", "fe80::1", False, True),
    ),
    hostname="vm-1.example.com",
    euid=os.geteuid(),  # the ownership checks of env files apply exactly when the tests run as root
    users=USERS,
)


def write(path: Path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    path.chmod(0o644)
    return str(path)


def load_files(tmp_path: Path, sidecar: str = "", cluster: str = "", environ: dict[str, str] | None = None,
               host: Host = HOST, resolv: str = "nameserver 10.10.10.6\n") -> Config:
    sources = Sources(sidecar_env=write(tmp_path / "sidecar.env", sidecar),
                      cluster_env=write(tmp_path / "cluster.env", cluster),
                      resolv_conf=write(tmp_path / "resolv.conf", resolv))
    return load(sources, environ or {}, host)


def test_reference_vm_dump_is_exactly_istio_1_9s() -> None:
    sources = Sources(sidecar_env="/nonexistent/sidecar.env", cluster_env=str(REFERENCE / "cluster.env"),
                      resolv_conf=str(REFERENCE / "resolv.conf"))
    config = load(sources, {"PROXY_UID": "997"}, HOST)
    expected = (REFERENCE / "expected-dump.txt").read_text().splitlines()
    assert render.istio_dumps(config) == expected


def test_sources_and_precedence(tmp_path: Path) -> None:
    config = load_files(
        tmp_path,
        sidecar="ENVOY_PORT=15101\nISTIO_INBOUND_PORTS=80\n",
        cluster="\n# comment\nISTIO_INBOUND_PORTS=8080\n",
        environ={"ENVOY_PORT": "1", "INBOUND_CAPTURE_PORT": "15106", "ISTIO_LOCAL_EXCLUDE_PORTS": ""},
    )
    assert config.value("ENVOY_PORT").value == "15101"  # file beats environment
    assert config.value("ENVOY_PORT").source == f"{tmp_path}/sidecar.env:1"
    assert config.value("ISTIO_INBOUND_PORTS").value == "8080"  # cluster.env beats sidecar.env
    assert config.value("ISTIO_INBOUND_PORTS").source == f"{tmp_path}/cluster.env:3"
    assert config.value("INBOUND_CAPTURE_PORT").source == "environment"
    assert config.value("INBOUND_TUNNEL_PORT").source == "default"
    assert config.value("ISTIO_LOCAL_EXCLUDE_PORTS").source == "default"  # empty means default
    assert config.value("PROXY_UID") .source == "derived"
    assert config.value("ISTIO_CLUSTER_CONFIG").source == "--cluster-env"


def test_sidecar_env_chooses_cluster_env_path(tmp_path: Path) -> None:
    other = write(tmp_path / "other.env", "ISTIO_SERVICE=from-other\n")
    sidecar = write(tmp_path / "sidecar.env", f"ISTIO_CLUSTER_CONFIG={other}\n")
    config = load(Sources(sidecar_env=sidecar, resolv_conf="/dev/null"), {}, HOST)
    assert config.value("SVC").value == "from-other"
    assert config.files == (sidecar, other)
    assert config.value("ISTIO_CLUSTER_CONFIG").source == f"{sidecar}:1"
    assert config.environment["ISTIO_CLUSTER_CONFIG"] == other  # exported, as under `set -a`


def test_environment_chooses_files_and_missing_files_are_skipped(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cluster = write(tmp_path / "c.env", "ISTIO_NAMESPACE=ns1\n")
    environ = {"ISTIO_SIDECAR_CONFIG": str(tmp_path / "missing.env"), "ISTIO_CLUSTER_CONFIG": cluster}
    with caplog.at_level(logging.INFO):
        config = load(Sources(resolv_conf="/dev/null"), environ, HOST)
    assert config.value("NS").value == "ns1"
    assert config.files == (cluster,)
    assert f"{tmp_path}/missing.env: not found, skipped" in caplog.messages


def test_istio_start_defaults_and_derivations(tmp_path: Path) -> None:
    config = load_files(tmp_path, cluster="ISTIO_NAMESPACE=shop\nISTIO_SERVICE=cart\nISTIO_PILOT_PORT=15010\n"
                        "ISTIO_AGENT_FLAGS='--proxyLogLevel  debug\t--concurrency 2'\nPROV_CERT=\n")
    agent = config.agent
    assert (agent.namespace, agent.service, agent.bin_base, agent.log_dir) == (
        "shop", "cart", "/usr/local/bin", "/var/log/istio")
    assert agent.svc_ip == "10.0.0.5"  # first non-loopback, up, non-link-local address
    assert agent.pod_name == "vm-1"
    assert agent.exec_user.name == "istio-proxy"
    assert agent.pilot_address == "istiod.istio-system.svc:15010"
    assert agent.ca_addr == agent.pilot_address
    assert agent.prov_cert == ""  # ${PROV_CERT-/etc/certs} keeps an empty value
    assert agent.output_certs == "/etc/certs"
    assert agent.agent_flags == ("--proxyLogLevel", "debug", "--concurrency", "2")
    assert agent.proxy_config == ("\nserviceCluster: cart\ncontrolPlaneAuthPolicy: MUTUAL_TLS\n"
                                  "discoveryAddress: istiod.istio-system.svc:15010\n")
    assert config.value("ISTIO_SVC_IP").source == "derived"


def test_tproxy_runs_as_root(tmp_path: Path) -> None:
    config = load_files(tmp_path, cluster="ISTIO_INBOUND_INTERCEPTION_MODE=TPROXY\nEXEC_USER=istio-proxy\n")
    assert config.agent.exec_user.name == "root"
    assert config.capture.tproxy


def test_istio_iptables_derivations(tmp_path: Path) -> None:
    config = load_files(tmp_path, cluster="ISTIO_META_DNS_CAPTURE=true\n",
                        resolv="# x\nnameserver 10.10.10.6\nnameserver fd00::53\nsearch a\nnameserver 1.1.1.1\n")
    capture = config.capture
    assert (capture.proxy_uid, capture.proxy_gid) == ("997", "997")  # GID defaults to the UID string
    assert capture.redirect_dns
    assert capture.dns_servers_v4 == ("10.10.10.6", "1.1.1.1")
    assert capture.dns_servers_v6 == ("fd00::53",)
    assert config.value("DNS_SERVERS").value == "[10.10.10.6 1.1.1.1],[fd00::53]"
    assert config.value("DNS_SERVERS").source.endswith("resolv.conf:2")
    assert not capture.enable_inbound_ipv6  # the first non-loopback address is IPv4


def test_redirect_dns_overrides_dns_capture(tmp_path: Path) -> None:
    config = load_files(tmp_path, cluster="ISTIO_META_DNS_CAPTURE=true\nREDIRECT_DNS=false\n")
    assert not config.capture.redirect_dns
    assert config.value("DNS_SERVERS").value == "[],[]"


@pytest.mark.parametrize(("addresses", "setting", "expected", "warned"), [
    ((Address("eth0", "fe80::1", False, True), Address("eth0", "fd00::5", False, True)), "", True, False),
    ((Address("eth0", "10.1.1.1", False, False), Address("eth0", "fd00::5", False, True)), "", False, False),
    ((Address("lo", "127.0.0.1", True, True), Address("lo", "::1", True, True)), "", False, True),
    ((Address("eth0", "10.1.1.1", False, True),), "true", True, False),
    ((Address("eth0", "fd00::5", False, True),), "false", False, False),
])
def test_ipv6_detection_and_override(tmp_path: Path, addresses: tuple[Address, ...], setting: str,
                                     expected: bool, warned: bool) -> None:
    host = Host(addresses=addresses, hostname="h", euid=os.geteuid(), users=USERS)
    config = load_files(tmp_path, cluster=f"ENABLE_INBOUND_IPV6={setting}\n", host=host)
    assert config.capture.enable_inbound_ipv6 is expected
    assert any("IPv6 capture off" in w for w in config.warnings) is warned


def test_first_ip_is_hostname_all_ip_addresses_first_field() -> None:
    host = Host(addresses=(
        Address("lo", "127.0.0.1", True, True),
        Address("lo", "10.9.9.9", True, True),  # on a loopback interface: skipped by hostname(1)
        Address("eth1", "10.2.2.2", False, False),  # interface down: skipped
        Address("eth0", "fe80::2", False, True),  # link-local: skipped
        Address("eth0", "fd00::7", False, True),
    ))
    assert host.first_ip() == "fd00::7"
    assert Host().first_ip() == ""


def test_legacy_termination_drain_duration_seconds(tmp_path: Path) -> None:
    config = load_files(tmp_path, environ={"TERMINATION_DRAIN_DURATION_SECONDS": "12"})
    assert config.supervision.termination_drain == 12.0
    config = load_files(tmp_path, cluster="TERMINATION_DRAIN_DURATION=1m30s\n",
                        environ={"TERMINATION_DRAIN_DURATION_SECONDS": "12"})
    assert config.supervision.termination_drain == 90.0


def test_capture_policy_defaults_to_fail_closed(tmp_path: Path) -> None:
    assert load_files(tmp_path).supervision.capture_policy == "fail-closed"
    config = load_files(tmp_path, cluster="ISTIO_VM_CAPTURE=outbound-fail-open\n")
    assert config.supervision.capture_policy == "outbound-fail-open"
    assert config.value("ISTIO_VM_CAPTURE").source.endswith("cluster.env:1")


def test_json_has_every_setting_with_value_and_source(tmp_path: Path) -> None:
    config = load_files(tmp_path, cluster="ISTIO_INBOUND_PORTS=8080\n")
    data = json.loads(render.render_json(config))
    assert data["ISTIO_INBOUND_PORTS"] == {"value": "8080", "source": f"{tmp_path}/cluster.env:1"}
    assert data["PROXY_GID"] == {"value": "997", "source": "derived"}
    assert data["ENVOY_PORT"] == {"value": "15001", "source": "default"}
    assert set(data) == set(config.values)
    assert all(isinstance(v["value"], str) and isinstance(v["source"], str) for v in data.values())


def test_text_output_has_dumps_then_supervisor_settings_with_sources(tmp_path: Path) -> None:
    config = load_files(tmp_path, cluster="ISTIO_SERVICE=cart\n")
    text = render.render_text(config, show_source=True)
    assert text.startswith("Environment:\n------------\nENVOY_PORT=  # not set\n")
    assert "\nVariables:\n----------\nPROXY_PORT=15001  # default\n" in text
    assert "\n\nSupervisor:\n-----------\n" in text
    assert f"SVC=cart  # {tmp_path}/cluster.env:1\n" in text
    assert "PROXY_CONFIG=$'\\nserviceCluster: cart\\n" in text


def test_build_reports_every_problem_at_once() -> None:
    shell = {"ENVOY_PORT": "0", "ISTIO_INBOUND_PORTS": "x", "REDIRECT_DNS": "maybe"}
    origins = {"ENVOY_PORT": "a.env:1", "ISTIO_INBOUND_PORTS": "a.env:2", "REDIRECT_DNS": "environment"}
    with pytest.raises(ConfigError) as caught:
        build(Shell(shell, origins), HOST, ResolvConf("/etc/resolv.conf"))
    assert [str(p) for p in caught.value.problems] == [
        "environment: REDIRECT_DNS='maybe': not a boolean (true or false)",
        "a.env:1: ENVOY_PORT='0': not a port (1-65535)",
        "a.env:2: ISTIO_INBOUND_PORTS='x': 'x' is not a port (1-65535); write ports separated by commas, "
        "no spaces",
    ]
