"""Resolve every setting: the shell variables of the env files in, one frozen `Config` out (pure).

`build()` applies istio-start.sh's and istio-iptables 1.9's defaults and derivations to every setting of
settings.py, remembers where each value came from, and reports every problem at once as a
`ConfigError`. It takes data only (the `Shell`, the `Host`, resolv.conf's text): load.py reads them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType

from istio_vm.config import checks, spelling
from istio_vm.config.host import Host
from istio_vm.config.model import (
    DNS_SERVERS,
    Agent,
    Capture,
    Config,
    IptablesOptions,
    Proxy,
    ResolvConf,
    Shell,
    Supervision,
    Value,
)
from istio_vm.config.settings import BY_NAME
from istio_vm.errors import ConfigError, Problem, shown


def user_names(variables: Mapping[str, str]) -> frozenset[str]:
    """The accounts a build of these variables may look up: ENVOY_USER's and EXEC_USER's, and root (TPROXY)."""
    names = {"root"}
    for name in ("ENVOY_USER", "EXEC_USER"):
        names.add(variables.get(name) or BY_NAME[name].default)
    return frozenset(names)


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


def build(shell: Shell, host: Host, resolv: ResolvConf) -> Config:
    """Resolve every setting from the shell variables after the env files."""
    variables, origins = shell.variables, shell.origins
    r = _Resolver(variables, origins)
    r.problems.extend(shell.problems)
    for name in ("ISTIO_SIDECAR_CONFIG", "ISTIO_CLUSTER_CONFIG"):
        r.set(name, variables.get(name, BY_NAME[name].default), origins.get(name, "default"))
    capture = _capture(r, host, resolv)
    iptables = IptablesOptions(
        custom=r.take("ISTIO_CUSTOM_IP_TABLES") == "true",
        backend=r.take("ISTIO_IPTABLES_BACKEND") or None,
        dry_run=checks.go_bool(r.take("DRY_RUN")),
        skip_rule_apply=checks.go_bool(r.take("SKIP_RULE_APPLY")),
    )
    for name in ("RESTORE_FORMAT", "RUN_VALIDATION", "IPTABLES_PROBE_PORT", "PROBE_TIMEOUT"):
        r.take(name)
    agent = _agent(r, host, capture)
    supervision = _supervision(r)
    if r.problems or agent is None:
        raise ConfigError(sorted(r.problems, key=lambda p: _location_order(p.where, shell.files)))
    ordered = {name: r.values[name] for name in (*BY_NAME, DNS_SERVERS)}
    return Config(capture=capture, iptables=iptables, agent=agent, supervision=supervision,
                  values=MappingProxyType(ordered), environment=MappingProxyType(dict(variables)),
                  files=shell.files,
                  warnings=(*spelling.misspellings(spelling.assigned_in_files(origins, shell.files)),
                            *r.warnings))


def _location_order(where: str, files: Sequence[str]) -> tuple[int, int]:
    """Sort key: problems in file order and line order; environment and derived ones last."""
    path, _, line = where.rpartition(":")
    for index, name in enumerate(files):
        if where == name or path == name:
            return index, int(line) if line.isdigit() and path == name else 0
    return len(files), 0


def _capture(r: _Resolver, host: Host, resolv: ResolvConf) -> Capture:
    envoy_user = r.take("ENVOY_USER")

    def uid_of_envoy_user() -> str:
        user = host.user(envoy_user)
        return "" if user is None else str(user.uid)

    proxy_uid = r.take("PROXY_UID", uid_of_envoy_user)
    if proxy_uid == "":
        r.problem("ENVOY_USER", "unknown user (its UID is PROXY_UID): create the user or set PROXY_UID")
    proxy_gid = r.take("PROXY_GID", lambda: proxy_uid)
    dns_capture = r.take("ISTIO_META_DNS_CAPTURE")
    redirect_dns = r.take("REDIRECT_DNS", lambda: "true" if checks.go_bool(dns_capture) else "false")

    def detect_ipv6() -> str:
        found = host.first_non_loopback_is_ipv6()
        if found is None:
            r.warnings.append("no non-loopback address found: IPv6 capture off (Istio 1.9 would panic here)")
        return "true" if found else "false"

    ipv6 = r.take("ENABLE_INBOUND_IPV6", detect_ipv6)
    v4: list[str] = []
    v6: list[str] = []
    dns_source = "derived"
    if r.ok("REDIRECT_DNS", "ISTIO_META_DNS_CAPTURE") and checks.go_bool(redirect_dns):
        if resolv.error is not None:
            r.problems.append(Problem(resolv.path, "REDIRECT_DNS", redirect_dns, f"DNS capture needs "
                                      f"the nameservers, but {resolv.path} cannot be read: {resolv.error}"))
        for number, server in nameservers(resolv.text):
            if _octal_looking_ipv4(server):
                r.problems.append(Problem(f"{resolv.path}:{number}", "REDIRECT_DNS", redirect_dns,
                                          f"nameserver {shown(server)} has a leading zero: glibc and "
                                          "iptables read such a part as octal; write the address in plain decimal"))
                continue
            (v4 if _is_ipv4(server) else v6).append(server)
            if dns_source == "derived":
                dns_source = f"{resolv.path}:{number}"
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
        enable_inbound_ipv6=checks.go_bool(ipv6),
        redirect_dns=checks.go_bool(redirect_dns),
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
    return len(parts) == 4 and all(checks.decimal(p, 0, 255) is not None for p in parts)


def _octal_looking_ipv4(server: str) -> bool:
    """A dotted quad of decimal digits with a part like `010`: Go 1.15 read it as decimal, inet_aton as octal."""
    parts = server.split(".")
    return len(parts) == 4 and all(p.isascii() and p.isdigit() for p in parts) and any(
        len(p) > 1 and p.startswith("0") for p in parts)


def _agent(r: _Resolver, host: Host, capture: Capture) -> Agent | None:
    """pilot-agent's settings; None when the exec user is unknown (a problem is recorded then)."""
    system_namespace = r.take("ISTIO_SYSTEM_NAMESPACE")
    pilot_port = r.take("ISTIO_PILOT_PORT")
    cp_auth = r.take("CONTROL_PLANE_AUTH_POLICY")
    svc = r.take("SVC")
    svc_ip = r.take("ISTIO_SVC_IP", host.first_ip)
    if svc_ip == "":
        r.warnings.append("ISTIO_SVC_IP: `hostname --all-ip-addresses` would print no address; it is empty")
    exec_name = r.set("EXEC_USER", "root") if capture.tproxy else r.take("EXEC_USER")
    exec_user = host.user(exec_name)
    if exec_user is None:
        r.problem("EXEC_USER", "unknown user: create it (the package's sysusers.d does) or set EXEC_USER")
    pilot_address = r.take("PILOT_ADDRESS", lambda: f"istiod.{system_namespace}.svc:{pilot_port}")
    proxy_config = r.take("PROXY_CONFIG", lambda: (
        f"\nserviceCluster: {svc}\ncontrolPlaneAuthPolicy: {cp_auth}\ndiscoveryAddress: {pilot_address}\n"))
    istio_version = r.take("ISTIO_META_ISTIO_VERSION")
    bin_base = r.take("ISTIO_BIN_BASE")
    log_dir = r.take("ISTIO_LOG_DIR")
    namespace = r.take("NS")
    pod_name = r.take("POD_NAME", host.short_hostname)
    ca_addr = r.take("CA_ADDR", lambda: pilot_address)
    prov_cert = r.take("PROV_CERT")
    output_certs = r.take("OUTPUT_CERTS")
    # `IFS=' ' read -r -a`: split on runs of spaces, tabs and newlines; no quoting.
    agent_flags = tuple(r.take("ISTIO_AGENT_FLAGS").split())
    if exec_user is None:
        return None
    return Agent(istio_version=istio_version, bin_base=bin_base, log_dir=log_dir, namespace=namespace, service=svc,
                 svc_ip=svc_ip, pod_name=pod_name, exec_user=exec_user, pilot_address=pilot_address, ca_addr=ca_addr,
                 prov_cert=prov_cert, output_certs=output_certs, agent_flags=agent_flags, proxy_config=proxy_config)


def _supervision(r: _Resolver) -> Supervision:
    def seconds(name: str, derived: Callable[[], str] | None = None) -> float:
        return checks.seconds(r.take(name, derived)) or 0.0

    def number(name: str) -> int:
        return checks.decimal(r.take(name), 0, 0xFFFFFFFF) or 0  # an invalid value is a problem already

    legacy_drain = r.shell.get("TERMINATION_DRAIN_DURATION_SECONDS", "")
    drain = seconds("TERMINATION_DRAIN_DURATION", (lambda: f"{legacy_drain}s") if legacy_drain else None)
    if legacy_drain and r.values["TERMINATION_DRAIN_DURATION"].source == "derived" and (
            checks.integer(0, 86400)(legacy_drain) is not None):
        origin = r.origins.get("TERMINATION_DRAIN_DURATION_SECONDS", "environment")
        r.problems.append(Problem(origin, "TERMINATION_DRAIN_DURATION_SECONDS", legacy_drain,
                                  "not a whole number of seconds"))
    proxy_name = r.take("ISTIO_VM_PROXY")
    proxy = Proxy(proxy_name) if r.ok("ISTIO_VM_PROXY") else Proxy.AGENT
    bootstrap = r.take("ENVOY_BOOTSTRAP")
    if proxy is Proxy.ENVOY and not bootstrap:
        r.problem("ISTIO_VM_PROXY", "envoy mode needs ENVOY_BOOTSTRAP (the Envoy bootstrap file)")
    supervision = Supervision(
        proxy=proxy,
        envoy_binary=r.take("ENVOY_BINARY", lambda: f"{r.values['ISTIO_BIN_BASE'].value}/envoy"),
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
        capture_policy=r.take("ISTIO_VM_CAPTURE") if r.ok("ISTIO_VM_CAPTURE") else "fail-closed",
        metrics_file=r.take("ISTIO_VM_METRICS_FILE"),
    )
    _check_restart_budget(r, supervision)
    return supervision


def _check_restart_budget(r: _Resolver, s: Supervision) -> None:
    """A proxy that exits at once must end in the crash-loop exit, never in restarts forever.

    The loop gives up after more than MAX_RESTARTS exits within RESTART_WINDOW. Between the first and
    the last of those exits lie MAX_RESTARTS backoff delays, each at most the doubling delay; when the
    window is not longer than those delays together, no window ever holds enough exits and the proxy is
    restarted forever (with a zero backoff: as fast as it can spawn). A zero initial delay or maximum
    would make every restart immediate, so both must be positive.
    """
    names = ("ISTIO_VM_BACKOFF_INITIAL", "ISTIO_VM_BACKOFF_MAX", "ISTIO_VM_MAX_RESTARTS", "ISTIO_VM_RESTART_WINDOW")
    if not r.ok(*names):
        return
    for name, value in (("ISTIO_VM_BACKOFF_INITIAL", s.backoff_initial), ("ISTIO_VM_BACKOFF_MAX", s.backoff_max)):
        if value <= 0:
            r.problem(name, "must be longer than 0: a zero delay restarts a failing proxy as fast as it can spawn")
            return
    waits = sum(min(s.backoff_initial * 2.0 ** k, s.backoff_max) for k in range(s.max_restarts))
    if s.restart_window <= waits:
        r.problem("ISTIO_VM_RESTART_WINDOW", f"must be longer than the {waits:g}s the first ISTIO_VM_MAX_RESTARTS="
                  f"{s.max_restarts} restarts wait (ISTIO_VM_BACKOFF_INITIAL doubling up to ISTIO_VM_BACKOFF_MAX): "
                  "otherwise a proxy that exits at once is restarted forever, never reaching the crash-loop exit")
