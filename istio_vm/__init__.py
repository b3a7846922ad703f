"""istio-vm: run an Istio sidecar on a VM.

Replaces Istio 1.9's istio-start.sh and the supervision half of pilot-agent: env files in,
Istio's iptables rules applied atomically, privileges dropped, the proxy supervised.

Three wings, each mapped in its own __init__.py:
    config/        env files -> one frozen Config
    iptables/      Capture -> Plan -> the host, atomically
    service/       `istio-vm start`: lock -> iptables -> drop privileges -> supervise

Pure side (touches nothing on the host; tests/unit/test_boundaries.py checks it, imports included):
    errors         exit statuses, Problem, and the errors the CLI maps to them
    defaults       the command line's defaults and choices, importing nothing (a fast --help)
    loggers        the package's loggers: logging is imported at the first record, and logs' handler installed
Edge side:
    cli            argv -> one command -> exit status
    logs           where istio-vm's own log records go (journal or stderr)
    journal        journald's native protocol without blocking: an entry goes now, waits, or is dropped, counted
    trust          what root may trust: root-only paths, files opened without following planted links
    __main__       `python -m istio_vm`
"""

__version__ = "0.1.0"
