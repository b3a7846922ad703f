"""The config wing: env files -> one frozen `Config`, with the source of every value.

load() reads (sources: the env files as `set -a; . sidecar.env; . cluster.env`, with envfile as
the lexer; resolv.conf; the machine), then resolve.build() turns what was read into the Config.

Pure side (touches nothing on the host; tests/unit/test_boundaries.py checks it, imports included):
    model          the types: Shell (what the files say), Value, Capture, Agent, Supervision, Config
    resolve        build(): every setting resolved with istio-start.sh's and istio-iptables' rules
    settings       the table of every variable: name, default, check, meaning, difference from 1.9
    checks         the checks of one setting's text (ports, CIDRs, booleans...), Go's ParseBool
    spelling       misspelt setting names in the env files: "did you mean ISTIO_INBOUND_PORTS?"
    host           Host, Address, User and the hostname(1) / Go rules applied to them
    start_args     istio-start.sh's modes and istio-iptables' flags -> overrides
    render         `istio-vm config`: istio-iptables 1.9's dumps, the supervisor settings, JSON
Edge side (reads files and the machine):
    envfile        one env file as data, with python-dotenv as the lexer and bash's reading checked
    sources        which env files, in which order, and who may have written them
    load           load(): the env files, resolv.conf and the host, read once, then build()
"""
