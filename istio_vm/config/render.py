"""Render a Config for people and machines: istio-iptables 1.9's dumps, supervisor settings, JSON.

The 'Environment:' and 'Variables:' blocks reproduce what istio-iptables 1.9 logged before writing
its rules, line for line, so operators can diff a 1.9 log against `istio-vm config`.
"""

from __future__ import annotations

import re
import shlex

from istio_vm.config.model import DNS_SERVERS, Config
from istio_vm.config.settings import SETTINGS, Section

ENVIRONMENT = (
    "ENVOY_PORT", "INBOUND_CAPTURE_PORT", "ISTIO_INBOUND_INTERCEPTION_MODE", "ISTIO_INBOUND_TPROXY_MARK",
    "ISTIO_INBOUND_TPROXY_ROUTE_TABLE", "ISTIO_INBOUND_PORTS", "ISTIO_OUTBOUND_PORTS",
    "ISTIO_LOCAL_EXCLUDE_PORTS", "ISTIO_SERVICE_CIDR", "ISTIO_SERVICE_EXCLUDE_CIDR",
)
# label in 1.9's 'Variables:' dump -> the setting it shows
VARIABLES = (
    ("PROXY_PORT", "ENVOY_PORT"),
    ("PROXY_INBOUND_CAPTURE_PORT", "INBOUND_CAPTURE_PORT"),
    ("PROXY_TUNNEL_PORT", "INBOUND_TUNNEL_PORT"),
    ("PROXY_UID", "PROXY_UID"),
    ("PROXY_GID", "PROXY_GID"),
    ("INBOUND_INTERCEPTION_MODE", "ISTIO_INBOUND_INTERCEPTION_MODE"),
    ("INBOUND_TPROXY_MARK", "ISTIO_INBOUND_TPROXY_MARK"),
    ("INBOUND_TPROXY_ROUTE_TABLE", "ISTIO_INBOUND_TPROXY_ROUTE_TABLE"),
    ("INBOUND_PORTS_INCLUDE", "ISTIO_INBOUND_PORTS"),
    ("INBOUND_PORTS_EXCLUDE", "ISTIO_LOCAL_EXCLUDE_PORTS"),
    ("OUTBOUND_IP_RANGES_INCLUDE", "ISTIO_SERVICE_CIDR"),
    ("OUTBOUND_IP_RANGES_EXCLUDE", "ISTIO_SERVICE_EXCLUDE_CIDR"),
    ("OUTBOUND_PORTS_INCLUDE", "ISTIO_OUTBOUND_PORTS"),
    ("OUTBOUND_PORTS_EXCLUDE", "ISTIO_LOCAL_OUTBOUND_PORTS_EXCLUDE"),
    ("KUBEVIRT_INTERFACES", "KUBE_VIRT_INTERFACES"),
    ("ENABLE_INBOUND_IPV6", "ENABLE_INBOUND_IPV6"),
    ("DNS_SERVERS", DNS_SERVERS),
)


def _heading(title: str) -> list[str]:
    return [title, "-" * len(title)]


def _line(name: str, text: str, source: str | None) -> str:
    return f"{name}={text}" if source is None else f"{name}={text}  # {source}"


def istio_dumps(config: Config, *, show_source: bool = False) -> list[str]:
    """The 'Environment:' and 'Variables:' blocks of istio-iptables 1.9 (raw env, then resolved)."""
    lines = _heading("Environment:")
    for name in ENVIRONMENT:
        raw = config.getenv(name)
        source = (config.value(name).source if raw else "not set") if show_source else None
        lines.append(_line(name, raw, source))
    lines += _heading("Variables:")
    for label, name in VARIABLES:
        item = config.value(name)
        text = ("true" if config.capture.enable_inbound_ipv6 else "false") if label == "ENABLE_INBOUND_IPV6" \
            else item.value
        lines.append(_line(label, text, item.source if show_source else None))
    return lines


def supervisor_settings(config: Config, *, show_source: bool = False) -> list[str]:
    """What istio-start.sh derives and what the supervisor uses, one `NAME=value` per line."""
    lines = _heading("Supervisor:")
    for setting in SETTINGS:
        if setting.section is Section.IPTABLES:
            continue
        item = config.value(setting.name)
        lines.append(_line(item.name, shell_quote(item.value), item.source if show_source else None))
    return lines


def render_text(config: Config, *, show_source: bool = False) -> str:
    lines = istio_dumps(config, show_source=show_source)
    lines += ["", *supervisor_settings(config, show_source=show_source)]
    return "\n".join(lines) + "\n"


def render_json(config: Config) -> str:
    import json  # only `config --json` needs it (install logs render's text dumps on every start)

    data = {item.name: {"value": item.value, "source": item.source} for item in config.values.values()}
    return json.dumps(data, indent=2) + "\n"


def shell_quote(text: str) -> str:
    """Quote a value so the line stays one line and reads back in bash to the same string."""
    if re.search(r"[\x00-\x1f\x7f]", text):
        escaped = text.replace("\\", "\\\\").replace("'", "\\'")
        escaped = re.sub(r"[\x00-\x1f\x7f]", lambda m: {"\n": "\\n", "\t": "\\t"}.get(
            m.group(0), f"\\x{ord(m.group(0)):02x}"), escaped)
        return f"$'{escaped}'"
    return text if text == "" or re.fullmatch(r"[\w@%+=:,./*-]+", text) else shlex.quote(text)
