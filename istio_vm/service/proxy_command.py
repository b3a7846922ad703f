"""The proxy's command line and environment, as istio-start.sh 1.9 gave them (pure).

`proxy_command()` is the one place that reads ISTIO_VM_PROXY: it returns a `ProxyCommand` that holds
everything that differs between the modes. Agent mode: `$ISTIO_BIN_BASE/pilot-agent proxy
$ISTIO_AGENT_FLAGS` with the exported environment plus INSTANCE_IP, POD_NAME and POD_NAMESPACE.
Envoy mode: Envoy itself with hot-restart flags, drained and probed through its admin port.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

from istio_vm.config.model import Config, Proxy

# Variables istio-start.sh assigns after `set +a`: exported only if they already were (from the
# environment or an env file), and then with the value the script gave them.
_REASSIGNED = ("ISTIO_BIN_BASE", "ISTIO_LOG_DIR", "NS", "SVC", "ISTIO_SYSTEM_NAMESPACE", "ISTIO_PILOT_PORT",
               "CONTROL_PLANE_AUTH_POLICY", "ISTIO_SVC_IP", "POD_NAME", "EXEC_USER", "PILOT_ADDRESS",
               "ISTIO_AGENT_FLAGS")
# Only for the supervisor: a child must not talk to systemd in our place.
_SUPERVISOR_ONLY = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES")


class ProxyCommand(NamedTuple):
    """How to run this configuration's proxy, epoch after epoch."""

    name: str  # "pilot-agent" or "envoy": what its lines in the journal are tagged with
    before_epoch: tuple[str, ...]  # argv up to the restart epoch (the whole argv of pilot-agent)
    after_epoch: tuple[str, ...]
    environment: Mapping[str, str]
    hot_restart: bool = False  # envoy: --restart-epoch N, readiness and drain through the admin API
    admin_port: int | None = None  # envoy's admin port; None: pilot-agent's readiness port 15021
    drain_inbound_only: bool = True
    shared_memory: str | None = None  # envoy's hot-restart region for --base-id, in /dev/shm

    def argv(self, restart_epoch: int) -> tuple[str, ...]:
        epoch = ("--restart-epoch", str(restart_epoch)) if self.hot_restart else ()
        return (*self.before_epoch, *epoch, *self.after_epoch)


def proxy_command(config: Config, identity: Mapping[str, str]) -> ProxyCommand:
    """The command of ISTIO_VM_PROXY's proxy; `identity` is the environment `su` gave (HOME, USER...)."""
    env = environment(config, identity)
    s = config.supervision
    match s.proxy:
        case Proxy.ENVOY:
            return ProxyCommand(
                "envoy", (s.envoy_binary, "-c", s.envoy_bootstrap), (
                    "--base-id", str(s.base_id),
                    "--drain-time-s", str(s.drain_time_s),
                    "--parent-shutdown-time-s", str(s.parent_shutdown_time_s),
                    # Tell every client to go at once when draining (Istio >= 1.10), and write access logs
                    # within a second rather than Envoy's default ten.
                    "--drain-strategy", "immediate",
                    "--file-flush-interval-msec", "1000",
                ), env, hot_restart=True, admin_port=s.admin_port,
                drain_inbound_only=s.drain_listeners == "inbound",
                # Envoy names it after base id x 10 (docs/envoy-notes.md).
                shared_memory=f"/dev/shm/envoy_shared_memory_{s.base_id * 10}")
        case Proxy.AGENT:
            return ProxyCommand("pilot-agent", (f"{config.agent.bin_base}/pilot-agent", "proxy",
                                                *config.agent.agent_flags), (), env)


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
