"""The configuration as values: what the env files say (`Shell`), and the one frozen `Config` built from it.

Types only, and pure: the rule plan, the proxy's command line and the supervisor import these without
pulling in the readers of files (sources.py, envfile.py) or of the machine (load.py).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import NamedTuple

from istio_vm.config.host import User
from istio_vm.errors import Problem

DNS_SERVERS = "DNS_SERVERS"  # not a variable: the nameservers istio-iptables read, shown in its dump


class Shell(NamedTuple):
    """The shell variables after `set -a; . sidecar.env; . cluster.env`, with where each came from."""

    variables: Mapping[str, str]
    origins: Mapping[str, str]
    files: tuple[str, ...] = ()  # the env files read, in order
    problems: tuple[Problem, ...] = ()  # what the files got wrong (syntax, permissions)


class ResolvConf(NamedTuple):
    """resolv.conf as read at load time: its text, or why it could not be read (then `text` is "")."""

    path: str
    text: str = ""
    error: str | None = None


class Value(NamedTuple):
    name: str
    value: str
    source: str  # "FILE:LINE", "environment", "default", "derived" or "--flag"


class Capture(NamedTuple):
    """The inputs of istio-iptables 1.9 (its Config struct), validated, as the strings it passes on."""

    proxy_port: str = "15001"
    inbound_capture_port: str = "15006"
    inbound_tunnel_port: str = "15008"
    proxy_uid: str = "1337"
    proxy_gid: str = "1337"
    inbound_interception_mode: str = ""
    inbound_tproxy_mark: str = "1337"
    inbound_tproxy_route_table: str = "133"
    inbound_ports_include: str = ""
    inbound_ports_exclude: str = ""
    outbound_ports_include: str = ""
    outbound_ports_exclude: str = ""
    outbound_ip_ranges_include: str = ""
    outbound_ip_ranges_exclude: str = ""
    kubevirt_interfaces: str = ""
    enable_inbound_ipv6: bool = False
    redirect_dns: bool = False
    dns_servers_v4: tuple[str, ...] = ()
    dns_servers_v6: tuple[str, ...] = ()

    @property
    def tproxy(self) -> bool:
        return self.inbound_interception_mode == "TPROXY"


class IptablesOptions(NamedTuple):
    custom: bool = False  # ISTIO_CUSTOM_IP_TABLES=true: never touch iptables
    backend: str | None = None  # "nft", "legacy", or None to detect
    dry_run: bool = False
    skip_rule_apply: bool = False


class Agent(NamedTuple):
    """What istio-start.sh computes for `pilot-agent proxy`."""

    bin_base: str
    log_dir: str
    namespace: str
    service: str
    svc_ip: str
    pod_name: str
    exec_user: User  # looked up once, when the configuration is built; the privilege drop uses it
    pilot_address: str
    ca_addr: str
    prov_cert: str
    output_certs: str
    agent_flags: tuple[str, ...]
    proxy_config: str
    istio_version: str


class Proxy(enum.StrEnum):
    """What `istio-vm start` supervises (ISTIO_VM_PROXY)."""

    AGENT = "agent"  # pilot-agent proxy, which runs Envoy itself
    ENVOY = "envoy"  # Envoy itself, with hot-restart epochs


class Supervision(NamedTuple):
    proxy: Proxy
    envoy_binary: str
    envoy_bootstrap: str
    admin_port: int
    base_id: int
    drain_time_s: int
    parent_shutdown_time_s: int
    termination_drain: float
    drain_listeners: str
    stop_timeout: float
    backoff_initial: float
    backoff_max: float
    backoff_reset: float
    max_restarts: int
    restart_window: float
    log_target: str | None  # None: journal under systemd, else stderr
    run_dir: str
    capture_policy: str = "fail-closed"  # ISTIO_VM_CAPTURE (iptables/parts.py: CapturePolicy)
    metrics_file: str = ""  # ISTIO_VM_METRICS_FILE; "" none


class Config(NamedTuple):
    capture: Capture
    iptables: IptablesOptions
    agent: Agent
    supervision: Supervision
    values: Mapping[str, Value]  # every setting by name, in settings.py order, then DNS_SERVERS: for display
    environment: Mapping[str, str]  # what istio-start.sh exported: environment + env files, in order
    files: tuple[str, ...]  # the env files read, in order
    warnings: tuple[str, ...] = ()

    def value(self, name: str) -> Value:
        """The setting's value and where it came from (KeyError for a name that is not a setting)."""
        return self.values[name]

    def getenv(self, name: str) -> str:
        """os.Getenv as istio-iptables saw it: the exported value, or "" when unset."""
        return self.environment.get(name, "")
