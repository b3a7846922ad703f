"""The iptables wing: Capture -> Plan -> the host, atomically, as Istio 1.9.4's istio-iptables.

build_plan(capture) ports istio-iptables' run(); commands.install() removes the Istio state found on
the host and installs the plan in one iptables-restore per family, rolled back on any failure;
clean removes what is found; verify compares canonical saves.

Pure side (touches nothing on the host; tests/unit/test_boundaries.py checks it, imports included):
    names          Istio's tables, chains and ports (its constants.go), built-in chains, families
    plan           build_plan(): istio-iptables 1.9.4's run(), step for step
    rules          Rule, Plan and Builder; the restore, command and JSON renderings
    explain        the plan in words (`iptables explain`), and `iptables plan --format`
    dot            the plan as a Graphviz graph
    saved          iptables-save and iptables-restore texts as data
    found          the Istio state in a save dump, and the lines that remove it
    restore_input  removal + plan per table: one iptables-restore input per family
    ip_batch       `ip` commands as `ip -batch` input, and their undo
    trace          `iptables trace`: one flow through mangle and nat as the kernel walks them, and why
    parts          the plan in parts (inbound, outbound TCP + DNS) and ISTIO_VM_CAPTURE's policies
Edge side (runs iptables and ip, reads /proc, writes the run dir):
    runner         Runner: every external command goes through it (tests swap in a fake)
    backend        nft or legacy, and the snapshot: one save per family
    state          the state file of the last install, and the iptables lock
    apply          install_plan() and clean_host(), with rollback to the snapshot
    verify         compare(): live rules against the plan, in canonical form
    canonical_netns  verify's scratch network namespace: the plan restored and saved there by a shell
    capture_state  the capture parts the running service says should be on (run dir), for verify
    commands       install, clean and verify as istio-start.sh ran them (custom, dry run, logs)
"""
