"""A stand-in for `pilot-agent proxy`: records how it was started and what it received, behaves like it.

Run as `python pilot_agent.py ARGV0 ARGS...` by a `pilot-agent` wrapper script. It appends JSON lines
to $DOUBLE_RECORD (start: argv, env, uid/gid/groups; every signal; exit), serves readiness on
127.0.0.1:15021/healthz/ready, starts a stand-in "envoy" grandchild, and on SIGTERM "drains" for
$DOUBLE_DRAIN seconds, stops its envoy and exits 0. SIGUSR2 makes it crash (exit $DOUBLE_CRASH_CODE).
$DOUBLE_CRASH_AT_START=1 makes every start crash at once; $DOUBLE_IGNORE_TERM=1 ignores SIGTERM.
$DOUBLE_READY_FILE=PATH: readiness answers 503 until PATH exists (the first refusal prints a line), so a
test decides when the proxy becomes ready; the first 200 is recorded ("ready", with its time).
It prints a few lines on stdout and stderr, like pilot-agent and Envoy do.
"""

from __future__ import annotations

import http.server
import json
import os
import signal
import subprocess
import sys
import threading
import time

RECORD = os.environ.get("DOUBLE_RECORD", "/dev/null")
lock = threading.Lock()


def record(event: str, **fields: object) -> None:
    line = json.dumps({"event": event, "pid": os.getpid(), "time": time.monotonic(), **fields})
    with lock, open(RECORD, "a", encoding="utf-8") as f:
        f.write(line + "\n")


class Ready(http.server.BaseHTTPRequestHandler):
    refused = False
    answered = False

    def do_GET(self) -> None:
        ok = self.path == "/healthz/ready"
        gate = os.environ.get("DOUBLE_READY_FILE")
        if ok and gate and not os.path.exists(gate):
            if not Ready.refused:
                Ready.refused = True
                print(f"info\tnot ready yet: waiting for {gate}", flush=True)
            self.send_response(503)
            self.end_headers()
            return
        if ok and gate and not Ready.answered:
            Ready.answered = True
            record("ready")  # before answering: a latency measured from this time is not flattered
        self.send_response(200 if ok else 404)
        self.end_headers()
        self.wfile.write(b"ready\n" if ok else b"")

    def log_message(self, format: str, *args: object) -> None:
        pass


def main() -> int:
    argv = sys.argv[1:]
    record("start", argv=argv, env=dict(os.environ), uid=os.getuid(), gid=os.getgid(), euid=os.geteuid(),
           egid=os.getegid(), groups=sorted(os.getgroups()), ppid=os.getppid(), pgid=os.getpgid(0),
           nofile=__import__("resource").getrlimit(__import__("resource").RLIMIT_NOFILE)[0])
    print("info\tpilot-agent double starting", flush=True)
    print("warn\tthis is a test double, not Istio", file=sys.stderr, flush=True)
    if os.environ.get("DOUBLE_CRASH_AT_START") == "1":
        print("error\tcrashing at start as asked", file=sys.stderr, flush=True)
        record("exit", code=int(os.environ.get("DOUBLE_CRASH_CODE", "1")))
        return int(os.environ.get("DOUBLE_CRASH_CODE", "1"))
    handled = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2}
    # Blocked before any thread starts, then taken one by one with sigwait: no signal is missed.
    signal.pthread_sigmask(signal.SIG_BLOCK, handled)
    envoy = subprocess.Popen([sys.executable, "-c", "import signal; signal.pause()"],
                             preexec_fn=lambda: signal.pthread_sigmask(signal.SIG_UNBLOCK, handled))
    record("envoy", envoy_pid=envoy.pid)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 15021), Ready)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    print("info\tEnvoy proxy is ready", flush=True)
    while True:
        received = signal.sigwait(handled)
        name = signal.Signals(received).name
        record("signal", signal=name)
        print(f"info\treceived {name}", flush=True)
        if received in (signal.SIGTERM, signal.SIGINT) and os.environ.get("DOUBLE_IGNORE_TERM") != "1":
            time.sleep(float(os.environ.get("DOUBLE_DRAIN", "0")))  # the double's own "drain"
            envoy.terminate()
            envoy.wait()
            server.shutdown()
            record("exit", code=0)
            print("info\tAgent has successfully terminated", flush=True)
            return 0
        if received == signal.SIGUSR2:
            code = int(os.environ.get("DOUBLE_CRASH_CODE", "1"))
            record("exit", code=code)
            print(f"error\tcrashing with status {code}", file=sys.stderr, flush=True)
            os._exit(code)  # like a crash: the envoy grandchild is left behind

if __name__ == "__main__":
    sys.exit(main())
