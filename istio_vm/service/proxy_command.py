"""The proxy's command line and environment, as istio-start.sh 1.9 gave them (pure).

Agent mode: `$ISTIO_BIN_BASE/pilot-agent proxy $ISTIO_AGENT_FLAGS` with the exported environment plus
INSTANCE_IP, POD_NAME and POD_NAMESPACE. Envoy mode: Envoy itself with hot-restart flags.
"""

from __future__ import annotations

from collections.abc import Mapping

from istio_vm.config.model import Config

# Variables istio-start.sh assigns after `set +a`: exported only if they already were (from the
# environment or an env file), and then with the value the script gave them.
_REASSIGNED = ("ISTIO_BIN_BASE", "ISTIO_LOG_DIR", "NS", "SVC", "ISTIO_SYSTEM_NAMESPACE", "ISTIO_PILOT_PORT",
               "CONTROL_PLANE_AUTH_POLICY", "ISTIO_SVC_IP", "POD_NAME", "EXEC_USER", "PILOT_ADDRESS",
               "ISTIO_AGENT_FLAGS")
# Only for the supervisor: a child must not talk to systemd in our place.
_SUPERVISOR_ONLY = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES")


def agent_command(config: Config) -> list[str]:
    return [f"{config.agent.bin_base}/pilot-agent", "proxy", *config.agent.agent_flags]


def envoy_command(config: Config, restart_epoch: int) -> list[str]:
    s = config.supervision
    return [
        s.envoy_binary, "-c", s.envoy_bootstrap,
        "--restart-epoch", str(restart_epoch),
        "--base-id", str(s.base_id),
        "--drain-time-s", str(s.drain_time_s),
        "--parent-shutdown-time-s", str(s.parent_shutdown_time_s),
        # Tell every client to go at once when draining (Istio >= 1.10), and write access logs
        # within a second rather than Envoy's default ten.
        "--drain-strategy", "immediate",
        "--file-flush-interval-msec", "1000",
    ]


def environment(config: Config, identity: Mapping[str, str]) -> dict[str, str]:
    """The environment `su -c "INSTANCE_IP=... exec pilot-agent proxy ..." USER` produced."""
    env = dict(config.environment)
    for name in _SUPERVISOR_ONLY:
        env.pop(name, None)
    for name in _REASSIGNED:
        if name in env:
            env[name] = config.value(name).value
    a = config.agent
    env.update({
        "ISTIO_META_ISTIO_VERSION": a.istio_version,
        "CA_ADDR": a.ca_addr, "PROV_CERT": a.prov_cert, "OUTPUT_CERTS": a.output_certs,
        "PROXY_CONFIG": a.proxy_config,
        "INSTANCE_IP": a.svc_ip, "POD_NAME": a.pod_name, "POD_NAMESPACE": a.namespace,
    })
    env.update(identity)
    return env
