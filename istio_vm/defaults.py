"""The defaults and choices the command line offers, in a module that imports nothing.

`istio-vm --help` (and a bad command line) needs them before any command runs: kept here, the parser
loads no more than argparse; the modules that use them (config/sources.py, iptables/explain.py) import
them from here.
"""

DEFAULT_SIDECAR_ENV = "/var/lib/istio/envoy/sidecar.env"
DEFAULT_CLUSTER_ENV = "/var/lib/istio/envoy/cluster.env"
DEFAULT_RESOLV_CONF = "/etc/resolv.conf"
FORMATS = ("restore", "commands", "json", "dot")  # what `istio-vm iptables plan --format` prints
