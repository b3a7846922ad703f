"""The proxy's command line and environment, as istio-start.sh 1.9 gave them to `su -c`, per mode."""

from __future__ import annotations

from istio_vm.config.host import Host
from istio_vm.config.model import Config, ResolvConf, Shell
from istio_vm.config.resolve import build
from istio_vm.service.proxy_command import proxy_command
from tests.helpers import EveryUser

IDENTITY = {"HOME": "/var/lib/istio", "USER": "istio-proxy", "LOGNAME": "istio-proxy", "SHELL": "/bin/bash"}


def config_of(environ: dict[str, str], files: dict[str, str] | None = None) -> Config:
    """A Config as after `set -a; . cluster.env` with `files` in cluster.env and `environ` before it."""
    variables = {**environ, **(files or {})}
    origins = {**dict.fromkeys(environ, "environment"), **dict.fromkeys(files or {}, "cluster.env:1")}
    return build(Shell(variables, origins), Host(hostname="vm-7.example", users=EveryUser()), ResolvConf("/r"))


def test_agent_mode_runs_pilot_agent_proxy_with_the_agent_flags_split_on_whitespace() -> None:
    command = proxy_command(config_of({}, {"ISTIO_AGENT_FLAGS": "--proxyLogLevel  debug\t--concurrency 2",
                                           "ISTIO_BIN_BASE": "/opt/istio/bin"}), IDENTITY)
    assert command.name == "pilot-agent"
    assert (command.hot_restart, command.admin_port, command.shared_memory) == (False, None, None)
    expected = ("/opt/istio/bin/pilot-agent", "proxy", "--proxyLogLevel", "debug", "--concurrency", "2")
    assert command.argv(0) == command.argv(3) == expected  # no epochs for pilot-agent


def test_envoy_mode_runs_envoy_with_hot_restart_flags() -> None:
    command = proxy_command(config_of({}, {"ISTIO_VM_PROXY": "envoy", "ENVOY_BOOTSTRAP": "/etc/istio/envoy.yaml",
                                           "ENVOY_BASE_ID": "7", "ENVOY_ADMIN_PORT": "15100",
                                           "ISTIO_VM_DRAIN_LISTENERS": "all"}), IDENTITY)
    assert command.name == "envoy"
    assert command.argv(2) == (
        "/usr/local/bin/envoy", "-c", "/etc/istio/envoy.yaml", "--restart-epoch", "2", "--base-id", "7",
        "--drain-time-s", "45", "--parent-shutdown-time-s", "60", "--drain-strategy", "immediate",
        "--file-flush-interval-msec", "1000")
    assert (command.hot_restart, command.admin_port, command.drain_inbound_only) == (True, 15100, False)
    assert command.shared_memory == "/dev/shm/envoy_shared_memory_70"


def test_environment_is_what_istio_start_sh_exported_plus_its_assignments() -> None:
    config = config_of({"PATH": "/usr/bin", "NOTIFY_SOCKET": "/run/systemd/notify", "WATCHDOG_USEC": "30000000",
                        "ISTIO_SVC_IP": "10.0.0.9"},
                       {"ISTIO_NAMESPACE": "shop", "ISTIO_SERVICE": "cart", "POD_NAME": "cart-1",
                        "CA_ADDR": "ca.example:15012"})
    env = dict(proxy_command(config, IDENTITY).environment)
    assert env["PATH"] == "/usr/bin"
    assert not {"NOTIFY_SOCKET", "WATCHDOG_USEC"} & set(env)  # the proxy must not talk to systemd for us
    assert (env["INSTANCE_IP"], env["POD_NAME"], env["POD_NAMESPACE"]) == ("10.0.0.9", "cart-1", "shop")
    assert (env["ISTIO_SERVICE"], env["CA_ADDR"]) == ("cart", "ca.example:15012")
    assert env["PROXY_CONFIG"] == ("\nserviceCluster: cart\ncontrolPlaneAuthPolicy: MUTUAL_TLS\n"
                                   "discoveryAddress: istiod.istio-system.svc:15012\n")
    assert env["ISTIO_META_ISTIO_VERSION"] == "1.9.0"
    assert {k: env[k] for k in IDENTITY} == IDENTITY


def test_variables_the_script_reassigned_are_exported_only_if_they_were_already() -> None:
    exported = dict(proxy_command(config_of({"ISTIO_BIN_BASE": ""}), IDENTITY).environment)
    assert exported["ISTIO_BIN_BASE"] == "/usr/local/bin"  # set (empty), so exported with the script's value
    assert not {"PILOT_ADDRESS", "SVC"} & set(exported)  # never set: the script kept them local
    assert dict(proxy_command(config_of({}), IDENTITY).environment)["POD_NAME"] == "vm-7"  # `hostname -s`
