"""Every variable istio-vm reads: its name, default, check, meaning and difference from Istio 1.9.

This table is the single source of docs/configuration.md, of the example sidecar.env and of the
checks in config.py; a test fails when the generated docs drift from it.
"""

from __future__ import annotations

import enum
from typing import NamedTuple

from istio_vm.config import checks as v


class Section(enum.StrEnum):
    START = "istio-start.sh"
    IPTABLES = "istio-iptables"
    SUPERVISOR = "supervisor"


class Setting(NamedTuple):
    name: str  # the name in dumps and `config --json`
    section: Section
    default: str  # the default as text; "" means empty, a sentence in <...> means derived
    doc: str
    check: v.Check | None = None
    env: str | None = None  # the variable read, when not `name` (NS is read from ISTIO_NAMESPACE)
    keep_empty: bool = False  # `${VAR-default}`: an empty value is kept rather than defaulted
    since_19: str = ""  # what istio-vm does differently from Istio 1.9.4, and why

    @property
    def variable(self) -> str:
        return self.env or self.name


_BOOL_19 = "1.9 silently treats an invalid boolean as false; istio-vm rejects it."
_PORTS_19 = ("1.9 passes any text to iptables (which reads 015001 as octal); istio-vm rejects anything but "
             "ports 1-65535 in plain decimal.")
_CIDR_19 = ("1.9 silently ignores invalid items (including bare addresses without /len); istio-vm "
            "rejects them.")

S, IPT, U = Section.START, Section.IPTABLES, Section.SUPERVISOR
SETTINGS: tuple[Setting, ...] = (
    # ---- istio-start.sh ---------------------------------------------------------------------------
    Setting("ISTIO_SIDECAR_CONFIG", S, "/var/lib/istio/envoy/sidecar.env",
            "First env file read (`--sidecar-env` overrides). Missing: skipped.",
            since_19="A file that exists but cannot be read is an error (1.9 skipped it silently)."),
    Setting("ISTIO_CLUSTER_CONFIG", S, "/var/lib/istio/envoy/cluster.env",
            "Second env file, read after sidecar.env, so its values win (`--cluster-env` overrides). "
            "sidecar.env may set it, as with istio-start.sh."),
    Setting("ISTIO_META_ISTIO_VERSION", S, "1.9.0",
            "Proxy version reported to istiod; exported to pilot-agent as istio-start.sh 1.9 did.",
            since_19="The process environment may set it too (1.9 overwrote it before reading the files)."),
    Setting("ISTIO_BIN_BASE", S, "/usr/local/bin", "Directory of pilot-agent and envoy.", v.absolute_path),
    Setting("ISTIO_LOG_DIR", S, "/var/log/istio",
            "Directory of istio.log / istio.err.log when ISTIO_LOG_TARGET=files.", v.absolute_path),
    Setting("NS", S, "default", "Namespace of the workload (POD_NAMESPACE of pilot-agent).",
            env="ISTIO_NAMESPACE"),
    Setting("SVC", S, "rawvm", "Service name of the workload (serviceCluster in the default PROXY_CONFIG).",
            env="ISTIO_SERVICE"),
    Setting("ISTIO_SYSTEM_NAMESPACE", S, "istio-system", "Namespace of istiod (in the default PILOT_ADDRESS)."),
    Setting("ISTIO_PILOT_PORT", S, "15012", "Port of istiod (in the default PILOT_ADDRESS).", v.port),
    Setting("CONTROL_PLANE_AUTH_POLICY", S, "MUTUAL_TLS", "controlPlaneAuthPolicy of the default PROXY_CONFIG.",
            v.choice("MUTUAL_TLS", "NONE", "INHERIT"), env="ISTIO_CP_AUTH",
            since_19="1.9 passes any text on; istio-vm accepts only Istio's three policies."),
    Setting("ISTIO_SVC_IP", S, "<first address of `hostname --all-ip-addresses`>",
            "Workload IP, given to pilot-agent as INSTANCE_IP.", v.ip_address,
            since_19="Found natively (no `hostname` process); a given value must be an IP address."),
    Setting("POD_NAME", S, "<short host name, as `hostname -s`>", "Workload name given to pilot-agent."),
    Setting("EXEC_USER", S, "istio-proxy",
            "User the proxy runs as; `root` when ISTIO_INBOUND_INTERCEPTION_MODE=TPROXY.",
            since_19="Unknown users are a config error before anything starts (1.9 failed in `su`)."),
    Setting("PILOT_ADDRESS", S, "<istiod.$ISTIO_SYSTEM_NAMESPACE.svc:$ISTIO_PILOT_PORT>",
            "Address of istiod (discoveryAddress of the default PROXY_CONFIG)."),
    Setting("CA_ADDR", S, "<$PILOT_ADDRESS>", "Address of the certificate authority, exported to pilot-agent."),
    Setting("PROV_CERT", S, "/etc/certs", "Provisioning certificate directory, exported to pilot-agent.",
            keep_empty=True),
    Setting("OUTPUT_CERTS", S, "/etc/certs", "Directory pilot-agent writes workload certificates to.",
            keep_empty=True),
    Setting("ISTIO_AGENT_FLAGS", S, "", "Extra arguments of `pilot-agent proxy`, split on whitespace "
            "(no quoting, as `read -a` in istio-start.sh).",
            since_19="Passed as an argument list, never through a shell (1.9 built an `su -c` string)."),
    Setting("PROXY_CONFIG", S, "<serviceCluster, controlPlaneAuthPolicy and discoveryAddress from the above>",
            "ProxyConfig YAML exported to pilot-agent."),
    Setting("ISTIO_CUSTOM_IP_TABLES", S, "false",
            "`true`: istio-vm never touches iptables (install and clean do nothing).", v.true_or_false,
            since_19="Only `true` or `false` are accepted (1.9 treated any other text as false)."),
    # ---- istio-iptables -------------------------------------------------------------------------
    Setting("ENVOY_PORT", IPT, "15001", "Outbound capture port (ISTIO_REDIRECT target).", v.port,
            since_19=_PORTS_19),
    Setting("INBOUND_CAPTURE_PORT", IPT, "15006", "Inbound capture port (ISTIO_IN_REDIRECT / TPROXY target).",
            v.port, since_19=_PORTS_19),
    Setting("INBOUND_TUNNEL_PORT", IPT, "15008", "Inbound tunnel port, never captured.", v.port,
            since_19=_PORTS_19),
    Setting("ENVOY_USER", IPT, "istio-proxy", "User whose UID becomes PROXY_UID when PROXY_UID is empty.",
            since_19="An unknown user is a config error; 1.9 silently used UID 1337, which captures "
                     "the proxy's own traffic on a VM whose istio-proxy has another UID."),
    Setting("PROXY_UID", IPT, "<UID of $ENVOY_USER>", "UIDs (comma list) whose traffic is never captured.",
            v.id_list),
    Setting("PROXY_GID", IPT, "<$PROXY_UID>",
            "GIDs (comma list) whose traffic is never captured; as 1.9, defaults to the UID string.",
            v.id_list),
    Setting("ISTIO_INBOUND_INTERCEPTION_MODE", IPT, "", "REDIRECT (empty means REDIRECT) or TPROXY.",
            v.interception_mode,
            since_19="1.9 silently treats any value but TPROXY (e.g. a typo) as REDIRECT; istio-vm rejects it."),
    Setting("ISTIO_INBOUND_TPROXY_MARK", IPT, "1337", "Packet mark of TPROXY inbound traffic.", v.mark),
    Setting("ISTIO_INBOUND_TPROXY_ROUTE_TABLE", IPT, "133", "Routing table of TPROXY inbound traffic.",
            v.route_table, since_19="Tables 253-255 (default, main, local) are refused."),
    Setting("ISTIO_INBOUND_PORTS", IPT, "", "Inbound ports to capture: `*` for all, a comma list, or empty "
            "for none.", v.port_list(wildcard=True), since_19=_PORTS_19),
    Setting("ISTIO_LOCAL_EXCLUDE_PORTS", IPT, "", "Inbound ports never captured; only used when "
            "ISTIO_INBOUND_PORTS is `*` (port 22 always is).", v.port_list(wildcard=False),
            since_19=_PORTS_19),
    Setting("ISTIO_SERVICE_CIDR", IPT, "", "Outbound CIDRs to capture: `*` for all, a comma list, or empty.",
            v.cidr_list(wildcard=True), since_19=_CIDR_19),
    Setting("ISTIO_SERVICE_EXCLUDE_CIDR", IPT, "", "Outbound CIDRs never captured.",
            v.cidr_list(wildcard=False), since_19=_CIDR_19 + " `*` is refused (1.9 panics)."),
    Setting("ISTIO_OUTBOUND_PORTS", IPT, "", "Outbound TCP ports always captured (IPv4 only, as 1.9.4).",
            v.port_list(wildcard=False), since_19=_PORTS_19),
    Setting("ISTIO_LOCAL_OUTBOUND_PORTS_EXCLUDE", IPT, "", "Outbound TCP ports never captured.",
            v.port_list(wildcard=False), since_19=_PORTS_19),
    Setting("KUBE_VIRT_INTERFACES", IPT, "", "Interfaces whose inbound traffic is treated as outbound.",
            v.interface_list, since_19="1.9 passes any text to iptables, where `+` means every interface; "
            "istio-vm accepts only interface names."),
    Setting("ISTIO_META_DNS_CAPTURE", IPT, "false", "Default of REDIRECT_DNS.", v.boolean, since_19=_BOOL_19),
    Setting("REDIRECT_DNS", IPT, "<$ISTIO_META_DNS_CAPTURE>",
            "Capture DNS to the agent on 15053 (nameservers from resolv.conf).", v.boolean,
            since_19=_BOOL_19),
    Setting("ENABLE_INBOUND_IPV6", IPT, "<detected: the first non-loopback address is IPv6>",
            "Install IPv6 rules too.", v.boolean,
            since_19="1.9 has no such switch (it only detects) and panics on a host without a "
                     "non-loopback address; istio-vm falls back to IPv4 only with a warning."),
    Setting("DRY_RUN", IPT, "false", "`true`: `iptables install` and `clean` only print what they would do.",
            v.boolean, since_19=_BOOL_19),
    Setting("RESTORE_FORMAT", IPT, "true", "Accepted for compatibility.", v.boolean,
            since_19="istio-vm always applies with iptables-restore, atomically per family."),
    Setting("SKIP_RULE_APPLY", IPT, "false", "`true`: `iptables install` installs nothing.", v.boolean,
            since_19=_BOOL_19),
    Setting("RUN_VALIDATION", IPT, "false", "Accepted for compatibility (the VM flow never validated).",
            v.boolean, since_19="istio-vm offers `istio-vm iptables verify` instead of the probe."),
    Setting("IPTABLES_PROBE_PORT", IPT, "15002", "Port of 1.9's validation probe.", v.port),
    Setting("PROBE_TIMEOUT", IPT, "5s", "Timeout of 1.9's validation probe.", v.duration,
            since_19="A bare number means seconds (1.9: nanoseconds)."),
    Setting("ISTIO_IPTABLES_BACKEND", IPT, "<nft, or legacy when only legacy has rules>",
            "iptables backend: `nft` or `legacy`.", v.choice("nft", "legacy"),
            since_19="1.9 ran whatever `iptables` was on PATH."),
    # ---- supervisor -----------------------------------------------------------------------------
    Setting("ISTIO_VM_PROXY", U, "agent", "What `start` supervises: `agent` (pilot-agent proxy) or "
            "`envoy` (Envoy itself, with hot-restart epochs).", v.choice("agent", "envoy")),
    Setting("ENVOY_BINARY", U, "<$ISTIO_BIN_BASE/envoy>", "Envoy binary in envoy mode.", v.absolute_path),
    Setting("ENVOY_BOOTSTRAP", U, "", "Envoy bootstrap file in envoy mode (required there).",
            v.absolute_path),
    Setting("ENVOY_ADMIN_PORT", U, "15000", "Envoy admin port (drain, readiness).", v.port),
    Setting("ENVOY_BASE_ID", U, "0", "Envoy --base-id (shared memory of hot restarts).",
            v.integer(0, 4294967295)),
    Setting("ENVOY_DRAIN_TIME_S", U, "45", "Envoy --drain-time-s.", v.integer(0, 86400)),
    Setting("ENVOY_PARENT_SHUTDOWN_TIME_S", U, "60", "Envoy --parent-shutdown-time-s.", v.integer(1, 86400)),
    Setting("TERMINATION_DRAIN_DURATION", U, "5s",
            "Longest drain on stop before the proxy is told to exit; TERMINATION_DRAIN_DURATION_SECONDS "
            "(1.9's legacy name) is read when this is empty.", v.duration),
    Setting("ISTIO_VM_DRAIN_LISTENERS", U, "inbound", "Listeners drained on stop: `inbound` (as 1.9) "
            "or `all`.", v.choice("inbound", "all")),
    Setting("ISTIO_VM_STOP_TIMEOUT", U, "10s", "After the drain, how long the proxy may take to exit "
            "before its whole process tree is killed.", v.duration),
    Setting("ISTIO_VM_BACKOFF_INITIAL", U, "1s", "First restart delay after the proxy exits.", v.duration),
    Setting("ISTIO_VM_BACKOFF_MAX", U, "30s", "Longest restart delay (the delay doubles per failure).",
            v.duration),
    Setting("ISTIO_VM_BACKOFF_RESET", U, "60s", "A proxy up this long counts as stable: the delay resets.",
            v.duration),
    Setting("ISTIO_VM_MAX_RESTARTS", U, "5", "Give up, with a distinct exit status, after this many restarts within "
            "ISTIO_VM_RESTART_WINDOW, so systemd's Restart= takes over.", v.integer(1, 1000)),
    Setting("ISTIO_VM_RESTART_WINDOW", U, "300s", "Window of ISTIO_VM_MAX_RESTARTS. Must be longer than the "
            "backoff delays of ISTIO_VM_MAX_RESTARTS restarts together (31s with the defaults), so that a proxy "
            "that exits at once always ends in the crash-loop exit; both backoff delays must be above 0.",
            v.duration),
    Setting("ISTIO_VM_CAPTURE", U, "fail-closed",
            "What capture does while no epoch of the proxy is ready: `fail-closed` (everything stays "
            "captured, also while istio-vm itself is restarted by systemd, until the unit is stopped or "
            "finally fails), `outbound-fail-open` (outbound TCP and DNS capture only while the proxy is "
            "ready; inbound as fail-closed) or `fail-open` (all capture only while the proxy is ready). "
            "docs/security.md says what each trades.", v.choice("fail-closed", "outbound-fail-open", "fail-open"),
            since_19="1.9 had no policy: capture stayed while Envoy restarted and was left behind when "
                     "the service stopped."),
    Setting("ISTIO_LOG_TARGET", U, "<journal under systemd, else stderr>",
            "`journal`, `stderr`, or `files` (1.9's istio.log / istio.err.log in ISTIO_LOG_DIR, appended; "
            "checked before anything runs: EXEC_USER must be able to write them there).",
            v.choice("journal", "stderr", "files"),
            since_19="1.9 truncated istio.log at every start; istio-vm appends and reopens on SIGUSR1."),
    Setting("ISTIO_VM_RUN_DIR", U, "/run/istio-vm", "Lock and iptables state of istio-vm.", v.absolute_path),
    Setting("ISTIO_VM_METRICS_FILE", U, "", "A file in Prometheus' text format that istio-vm keeps up to date "
            "(up, ready, epoch, restarts, capture, rules, the last verify), for node_exporter's textfile "
            "collector, e.g. /var/lib/prometheus/node-exporter/istio-sidecar.prom; empty: none. EXEC_USER "
            "must be able to create files in its directory (checked before anything runs). docs/operations.md, "
            "*Metrics*.", v.metrics_file),
)

BY_NAME = {s.name: s for s in SETTINGS}
