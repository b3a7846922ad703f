"""istio-vm: run an Istio sidecar on a VM.

Replaces Istio 1.9's istio-start.sh and the supervision half of pilot-agent: env files in,
Istio's iptables rules applied atomically, privileges dropped, the proxy supervised.
"""

__version__ = "0.1.0"
