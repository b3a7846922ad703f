"""The service wing: `istio-vm start`: lock -> iptables -> drop privileges -> supervise.

start.supervise() is the composition root: it builds the real seams (ProcessOps, ProxyAdmin,
Notifier, ProxyOutput) and hands them to the Loop, which feeds events to the Supervisor (the state
machine) and carries out the actions it answers with.

Pure side (touches nothing on the host; tests/unit/test_boundaries.py checks it, imports included):
    machine        Supervisor: the proxy's lifecycle as a state machine; Policy, actions, wait statuses
    proxy_command  the proxy's argv and environment; the one reader of ISTIO_VM_PROXY
    metrics        the metrics file's content: a Snapshot of the supervisor in Prometheus' text format
Edge side (processes, signals, sockets, the privilege drop):
    start          the order of effects of istio-start.sh: run lock, iptables, rlimit, drop, supervise
    loop           the select loop: signals, child output and deadlines in, the machine's actions out
    reload         `istio-vm reload`: validate, install the new rules, hand the proxy's settings over, wait
    processes      ProcessOps: posix_spawn, kill of a process tree, reaping, child subreaper
    proxy_admin    ProxyAdmin: readiness, drain and connections over HTTP on localhost
    proxy_output   the proxy's lines relayed to the journal, stderr or 1.9's log files
    signals        SignalQueue: handlers that only enqueue, and a wakeup fd for select
    privileges     the in-process privilege drop (groups, gid, uid, no_new_privs)
    notify         sd_notify(3) and the watchdog interval
    capture_helper  the fail-open policies' root helper (CAP_NET_ADMIN, NET_RAW only): on/off PART requests
    unit_restart   will systemd start the unit again? (clean --unless-restarting: ExecStopPost=, OnFailure=)
    metrics_file   ISTIO_VM_METRICS_FILE written atomically on every change; the last verify's result for it
"""
