"""The one frozen `Config`: env files and environment in, typed and validated values out.

`load()` is the edge (it reads the env files and resolv.conf); `build()` is pure: it resolves every
setting of settings.py with istio-start.sh's and istio-iptables 1.9's defaults, remembers where each
value came from, and reports every problem at once as a `ConfigError`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from istio_vm.config import checks as v
from istio_vm.config.host import Host
from istio_vm.config.settings import BY_NAME
from istio_vm.config.sources import DEFAULT_RESOLV_CONF, Shell, Sources, read_shell, read_text
from istio_vm.errors import ConfigError, Problem

DNS_SERVERS = "DNS_SERVERS"  # not a variable: the nameservers istio-iptables read, shown in its dump


@dataclass(frozen=True, slots=True)
class Value:
    name: str
    value: str
    source: str  # "FILE:LINE", "environment", "default", "derived" or "--flag"


@dataclass(frozen=True, slots=True, kw_only=True)
class Capture:
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


@dataclass(frozen=True, slots=True, kw_only=True)
class IptablesOptions:
    custom: bool = False  # ISTIO_CUSTOM_IP_TABLES=true: never touch iptables
    backend: str | None = None  # "nft", "legacy", or None to detect
    dry_run: bool = False
    skip_rule_apply: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class Agent:
    """What istio-start.sh computes for `pilot-agent proxy`."""

    bin_base: str
    log_dir: str
    namespace: str
    service: str
    svc_ip: str
    pod_name: str
    exec_user: str
    pilot_address: str
    ca_addr: str
    prov_cert: str
    output_certs: str
    agent_flags: tuple[str, ...]
    proxy_config: str
    istio_version: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Supervision:
    proxy: str  # "agent" or "envoy"
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


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    capture: Capture
    iptables: IptablesOptions
    agent: Agent
    supervision: Supervision
    values: tuple[Value, ...]  # every setting, in settings.py order, then DNS_SERVERS
    environment: tuple[tuple[str, str], ...]  # what istio-start.sh exported: environment + env files
    files: tuple[str, ...]  # the env files read, in order
    warnings: tuple[str, ...] = field(default=())

    def value(self, name: str) -> Value:
        for item in self.values:
            if item.name == name:
                return item
        raise KeyError(name)

    def getenv(self, name: str) -> str:
        """os.Getenv as istio-iptables saw it: the exported value, or "" when unset."""
        return dict(self.environment).get(name, "")


def load(sources: Sources, environ: Mapping[str, str], host: Host,
         overrides: Mapping[str, tuple[str, str]] | None = None) -> Config:
    """Read sidecar.env then cluster.env as `set -a; . FILE` would, and build the Config."""
    shell = read_shell(sources, environ, host.euid, overrides)
    return build(shell.variables, shell.origins, host, files=shell.files, problems=shell.problems,
                 read_resolv=lambda: read_text(sources.resolv_conf), resolv_path=sources.resolv_conf)


def lenient(shell: Shell, *names: str) -> tuple[dict[str, str], list[Problem]]:
    """Just these settings, each its value if valid or else its default, and what was wrong.

    For `iptables clean`, which must work even when someone broke an env file since the start:
    rules left pointing at a dead proxy would break the VM's traffic and DNS.
    """
    values: dict[str, str] = {}
    problems = list(shell.problems)
    for name in names:
        setting = BY_NAME[name]
        raw = shell.variables.get(setting.variable, "")
        reason = setting.check(raw) if raw and setting.check is not None else None
        if reason is not None:
            problems.append(Problem(shell.origins.get(setting.variable, "environment"), setting.variable, raw, reason))
        values[name] = raw if raw and reason is None else ("" if setting.default.startswith("<") else setting.default)
    return values, problems


class _Resolver:
    """Resolves settings one by one, remembering sources and collecting problems."""

    def __init__(self, shell: Mapping[str, str], origins: Mapping[str, str]) -> None:
        self.shell, self.origins = shell, origins
        self.values: dict[str, Value] = {}
        self.problems: list[Problem] = []
        self.warnings: list[str] = []

    def take(self, name: str, derived: Callable[[], str] | None = None) -> str:
        """The setting's value: set (non-empty, unless keep_empty) or else its default / derivation."""
        setting = BY_NAME[name]
        raw = self.shell.get(setting.variable)
        if raw is not None and (raw != "" or setting.keep_empty):
            source = self.origins.get(setting.variable, "environment")
            if setting.check is not None and (reason := setting.check(raw)) is not None:
                self.problems.append(Problem(source, setting.variable, raw, reason))
            value = Value(name, raw, source)
        elif derived is not None:
            value = Value(name, derived(), "derived")
        elif setting.default.startswith("<"):  # decided later (e.g. the iptables backend at apply time)
            value = Value(name, "", "derived")
        else:
            value = Value(name, setting.default, "default")
        self.values[name] = value
        return value.value

    def set(self, name: str, value: str, source: str = "derived") -> str:
        self.values[name] = Value(name, value, source)
        return value

    def problem(self, name: str, message: str) -> None:
        item = self.values[name]
        variable = BY_NAME[name].variable if name in BY_NAME else name
        self.problems.append(Problem(item.source, variable, item.value, message))

    def ok(self, *names: str) -> bool:
        """True when none of these settings has a problem (so it is safe to derive from them)."""
        bad = {p.variable for p in self.problems}
        return not any(BY_NAME[n].variable in bad for n in names)


def build(
    shell: Mapping[str, str],
    origins: Mapping[str, str],
    host: Host,
    *,
    files: Sequence[str] = (),
    problems: Sequence[Problem] = (),
    read_resolv: Callable[[], str] = lambda: "",
    resolv_path: str = DEFAULT_RESOLV_CONF,
) -> Config:
    """Resolve every setting from the shell variables after the env files (pure but for read_resolv)."""
    r = _Resolver(shell, origins)
    r.problems.extend(problems)
    for name in ("ISTIO_SIDECAR_CONFIG", "ISTIO_CLUSTER_CONFIG"):
        r.set(name, shell.get(name, BY_NAME[name].default), origins.get(name, "default"))
    capture = _capture(r, host, read_resolv, resolv_path)
    iptables = IptablesOptions(
        custom=r.take("ISTIO_CUSTOM_IP_TABLES") == "true",
        backend=r.take("ISTIO_IPTABLES_BACKEND") or None,
        dry_run=v.go_bool(r.take("DRY_RUN")),
        skip_rule_apply=v.go_bool(r.take("SKIP_RULE_APPLY")),
    )
    for name in ("RESTORE_FORMAT", "RUN_VALIDATION", "IPTABLES_PROBE_PORT", "PROBE_TIMEOUT"):
        r.take(name)
    agent = _agent(r, host, capture)
    supervision = _supervision(r, agent)
    if r.problems:
        raise ConfigError(sorted(r.problems, key=lambda p: _location_order(p.where, files)))
    ordered = [r.values[s] for s in BY_NAME] + [r.values[DNS_SERVERS]]
    return Config(capture=capture, iptables=iptables, agent=agent, supervision=supervision,
                  values=tuple(ordered), environment=tuple(shell.items()), files=tuple(files),
                  warnings=tuple(r.warnings))


def _location_order(where: str, files: Sequence[str]) -> tuple[int, int]:
    """Sort key: problems in file order and line order; environment and derived ones last."""
    path, _, line = where.rpartition(":")
    for index, name in enumerate(files):
        if where == name or path == name:
            return index, int(line) if line.isdigit() and path == name else 0
    return len(files), 0


def _capture(r: _Resolver, host: Host, read_resolv: Callable[[], str], resolv_path: str) -> Capture:
    envoy_user = r.take("ENVOY_USER")

    def uid_of_envoy_user() -> str:
        user = host.lookup_user(envoy_user)
        return "" if user is None else str(user.uid)

    proxy_uid = r.take("PROXY_UID", uid_of_envoy_user)
    if proxy_uid == "":
        r.problem("ENVOY_USER", "unknown user (its UID is PROXY_UID): create the user or set PROXY_UID")
    proxy_gid = r.take("PROXY_GID", lambda: proxy_uid)
    dns_capture = r.take("ISTIO_META_DNS_CAPTURE")
    redirect_dns = r.take("REDIRECT_DNS", lambda: "true" if v.go_bool(dns_capture) else "false")

    def detect_ipv6() -> str:
        found = host.first_non_loopback_is_ipv6()
        if found is None:
            r.warnings.append("no non-loopback address found: IPv6 capture off (Istio 1.9 would panic here)")
        return "true" if found else "false"

    ipv6 = r.take("ENABLE_INBOUND_IPV6", detect_ipv6)
    v4: list[str] = []
    v6: list[str] = []
    dns_source = "derived"
    if r.ok("REDIRECT_DNS", "ISTIO_META_DNS_CAPTURE") and v.go_bool(redirect_dns):
        try:
            text = read_resolv()
        except (OSError, UnicodeDecodeError) as e:
            r.problems.append(Problem(resolv_path, "REDIRECT_DNS", redirect_dns, f"DNS capture needs "
                                      f"the nameservers, but {resolv_path} cannot be read: {e}"))
            text = ""
        for number, server in nameservers(text):
            (v4 if _is_ipv4(server) else v6).append(server)
            if dns_source == "derived":
                dns_source = f"{resolv_path}:{number}"
    r.set(DNS_SERVERS, f"[{' '.join(v4)}],[{' '.join(v6)}]", dns_source)
    return Capture(
        proxy_port=r.take("ENVOY_PORT"),
        inbound_capture_port=r.take("INBOUND_CAPTURE_PORT"),
        inbound_tunnel_port=r.take("INBOUND_TUNNEL_PORT"),
        proxy_uid=proxy_uid,
        proxy_gid=proxy_gid,
        inbound_interception_mode=r.take("ISTIO_INBOUND_INTERCEPTION_MODE"),
        inbound_tproxy_mark=r.take("ISTIO_INBOUND_TPROXY_MARK"),
        inbound_tproxy_route_table=r.take("ISTIO_INBOUND_TPROXY_ROUTE_TABLE"),
        inbound_ports_include=r.take("ISTIO_INBOUND_PORTS"),
        inbound_ports_exclude=r.take("ISTIO_LOCAL_EXCLUDE_PORTS"),
        outbound_ports_include=r.take("ISTIO_OUTBOUND_PORTS"),
        outbound_ports_exclude=r.take("ISTIO_LOCAL_OUTBOUND_PORTS_EXCLUDE"),
        outbound_ip_ranges_include=r.take("ISTIO_SERVICE_CIDR"),
        outbound_ip_ranges_exclude=r.take("ISTIO_SERVICE_EXCLUDE_CIDR"),
        kubevirt_interfaces=r.take("KUBE_VIRT_INTERFACES"),
        enable_inbound_ipv6=v.go_bool(ipv6),
        redirect_dns=v.go_bool(redirect_dns),
        dns_servers_v4=tuple(v4),
        dns_servers_v6=tuple(v6),
    )


def nameservers(text: str) -> list[tuple[int, str]]:
    """`nameserver` entries of resolv.conf as miekg/dns reads them: second field, verbatim, in order."""
    found = []
    for number, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if len(fields) > 1 and fields[0] == "nameserver":
            found.append((number, fields[1]))
    return found


def _is_ipv4(server: str) -> bool:
    """Go's `net.ParseIP(s).To4() != nil` for a dotted quad (anything else counts as IPv6 in 1.9)."""
    parts = server.split(".")
    return len(parts) == 4 and all(p.isascii() and p.isdigit() and int(p) < 256 for p in parts)


def _agent(r: _Resolver, host: Host, capture: Capture) -> Agent:
    system_namespace = r.take("ISTIO_SYSTEM_NAMESPACE")
    pilot_port = r.take("ISTIO_PILOT_PORT")
    cp_auth = r.take("CONTROL_PLANE_AUTH_POLICY")
    svc = r.take("SVC")
    svc_ip = r.take("ISTIO_SVC_IP", host.first_ip)
    if svc_ip == "":
        r.warnings.append("ISTIO_SVC_IP: `hostname --all-ip-addresses` would print no address; it is empty")
    if capture.tproxy:
        exec_user = r.set("EXEC_USER", "root")
    else:
        exec_user = r.take("EXEC_USER")
        if host.lookup_user(exec_user) is None:
            r.problem("EXEC_USER", "unknown user: create it (the package's sysusers.d does) or set EXEC_USER")
    pilot_address = r.take("PILOT_ADDRESS", lambda: f"istiod.{system_namespace}.svc:{pilot_port}")
    proxy_config = r.take("PROXY_CONFIG", lambda: (
        f"\nserviceCluster: {svc}\ncontrolPlaneAuthPolicy: {cp_auth}\ndiscoveryAddress: {pilot_address}\n"))
    return Agent(
        istio_version=r.take("ISTIO_META_ISTIO_VERSION"),
        bin_base=r.take("ISTIO_BIN_BASE"),
        log_dir=r.take("ISTIO_LOG_DIR"),
        namespace=r.take("NS"),
        service=svc,
        svc_ip=svc_ip,
        pod_name=r.take("POD_NAME", host.short_hostname),
        exec_user=exec_user,
        pilot_address=pilot_address,
        ca_addr=r.take("CA_ADDR", lambda: pilot_address),
        prov_cert=r.take("PROV_CERT"),
        output_certs=r.take("OUTPUT_CERTS"),
        # `IFS=' ' read -r -a`: split on runs of spaces, tabs and newlines; no quoting.
        agent_flags=tuple(r.take("ISTIO_AGENT_FLAGS").split()),
        proxy_config=proxy_config,
    )


def _supervision(r: _Resolver, agent: Agent) -> Supervision:
    def seconds(name: str, derived: Callable[[], str] | None = None) -> float:
        return v.seconds(r.take(name, derived)) or 0.0

    def number(name: str) -> int:
        text = r.take(name)
        return int(text) if text.isdigit() else 0

    legacy_drain = r.shell.get("TERMINATION_DRAIN_DURATION_SECONDS", "")
    drain = seconds("TERMINATION_DRAIN_DURATION", (lambda: f"{legacy_drain}s") if legacy_drain else None)
    if legacy_drain and r.values["TERMINATION_DRAIN_DURATION"].source == "derived" and (
            v.integer(0, 86400)(legacy_drain) is not None):
        origin = r.origins.get("TERMINATION_DRAIN_DURATION_SECONDS", "environment")
        r.problems.append(Problem(origin, "TERMINATION_DRAIN_DURATION_SECONDS", legacy_drain,
                                  "not a whole number of seconds"))
    proxy = r.take("ISTIO_VM_PROXY")
    bootstrap = r.take("ENVOY_BOOTSTRAP")
    if proxy == "envoy" and not bootstrap:
        r.problem("ISTIO_VM_PROXY", "envoy mode needs ENVOY_BOOTSTRAP (the Envoy bootstrap file)")
    return Supervision(
        proxy=proxy,
        envoy_binary=r.take("ENVOY_BINARY", lambda: f"{agent.bin_base}/envoy"),
        envoy_bootstrap=bootstrap,
        admin_port=number("ENVOY_ADMIN_PORT"),
        base_id=number("ENVOY_BASE_ID"),
        drain_time_s=number("ENVOY_DRAIN_TIME_S"),
        parent_shutdown_time_s=number("ENVOY_PARENT_SHUTDOWN_TIME_S"),
        termination_drain=drain,
        drain_listeners=r.take("ISTIO_VM_DRAIN_LISTENERS"),
        stop_timeout=seconds("ISTIO_VM_STOP_TIMEOUT"),
        backoff_initial=seconds("ISTIO_VM_BACKOFF_INITIAL"),
        backoff_max=seconds("ISTIO_VM_BACKOFF_MAX"),
        backoff_reset=seconds("ISTIO_VM_BACKOFF_RESET"),
        max_restarts=number("ISTIO_VM_MAX_RESTARTS"),
        restart_window=seconds("ISTIO_VM_RESTART_WINDOW"),
        log_target=r.take("ISTIO_LOG_TARGET") or None,
        run_dir=r.take("ISTIO_VM_RUN_DIR"),
    )
