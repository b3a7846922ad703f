"""Seeded mutations of env files for fuzzing the config path (tests/unit, tests/kernel, benchmarks.fuzz_config).

`Mutator(seed).case(directory)` writes sidecar.env, cluster.env and resolv.conf into `directory`, each
from the corpus and mutated (bytes, lines, quotes, numbers, expansions, sizes, and file types:
FIFOs, devices, sockets, directories, symlinks, modes), and returns what it did. `run_in_process`
loads the case the way every command does, plans and renders it, and returns an `Outcome`;
`violations` lists what breaks the contract: exit 0 or 78, one bounded line per problem, no other
exception, at most 2 s. The same seed always gives the same cases.

    python -m testbed.fuzz_config --seed 1 --cases 2000     # one JSON report (what the unit test runs)

runs the cases in this fresh interpreter under an address-space limit of its start + 100 MB (a case
that needs more fails with MemoryError, a violation) and a 5 s alarm per case (a hang is a violation,
not a stuck run), and reports the violations, the statuses, the slowest case and the memory high-water.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from istio_vm.config.host import Address, Host, User
from istio_vm.config.load import load
from istio_vm.config.render import render_json, render_text
from istio_vm.config.settings import SETTINGS
from istio_vm.config.sources import Sources
from istio_vm.errors import MAX_PROBLEM_LINE, ConfigError, capped
from istio_vm.iptables.explain import explain, render
from istio_vm.iptables.plan import build_plan

ROOT = Path(__file__).resolve().parent.parent
CASE_SECONDS = 2.0  # the contract: every case decided within 2 s ...
CASE_MEMORY = 100 << 20  # ... and 100 MB
FILES = ("sidecar.env", "cluster.env")
MAX_GENERATED = 1 << 20  # content written (over the 256 KiB cap already; sparse files stand for huge ones)


def corpus(root: Path = ROOT) -> list[bytes]:
    """Every env file of the test data and the examples: the seeds of the mutations. The valid ones come
    three times (the refused ones are half the files), so that a fair share of cases gets past the checks."""
    paths = sorted({*root.glob("tests/data/envfiles/**/*.env"), *root.glob("tests/data/**/cluster.env"),
                    *root.glob("istio_vm/examples/*.env")})
    return [p.read_bytes() for p in paths if p.is_file() for _ in range(1 if "reject" in p.parts else 3)]


NAMES = [s.variable for s in SETTINGS]
NUMBER_FORMS: tuple[Callable[[random.Random], str], ...] = (
    lambda r: "0" + str(r.randrange(1, 70000)),  # a leading zero: octal to iptables
    lambda r: "00" + str(r.randrange(0, 9)),
    lambda r: "1" * r.choice((20, 21, 4300, 4301, 5000)),  # past int()'s limit
    lambda r: str(r.choice((0, 1, 22, 253, 254, 255, 65535, 65536, 4294967295, 4294967296))),
    lambda r: r.choice(("-1", "+5", " 5", "5 ", "1_0", "٣", "0x", "0x0539", "0XFFFFFFFF", "0x100000000", "1e3")),
    lambda r: r.choice(("0", "0s", "0.0", "1ns", "24h", "24h1s", "9999999h", "inf", "nan", ".5s", "1.s")),
    lambda r: ",".join(str(r.randrange(0, 70000)) for _ in range(r.randrange(1, 50))),
    lambda r: r.choice(("*", "*,80", ",,", "80,,81", "10.0.0.0/8", "10.0.0.0/08", "10.0.0.1", "::/0",
                        "::ffff:1.2.3.4/128", "010.0.0.1/32", "fe80::1%eth0/64")),
    lambda r: r.choice(("+", "eth+", "!eth0", "-i", ".", "..", "eth0@if3", "a/b", "a:b", "x" * 16, "eth0,+")),
)
SPECIAL_BYTES = (b"\x00", b"\r", b"\n", b"\t", b" ", b"\xff", b"\xef\xbb\xbf", b"\xc2\x85", b"\xe2\x80\xa8",
                 b"\xc2\xa0", b"'", b'"', b"$", b"${", b"}", b"`", b"\\", b"#", b"=", b";", b"|", b"(", b"~",
                 b"$(id)", b"${A}", b"${A:-x}", b"export ", b"\x1b[31m", b"\x0c")


@dataclass
class Case:
    """What one case wrote (for the report of a violation) and where."""

    seed: int
    directory: Path
    actions: list[str] = field(default_factory=list)

    @property
    def sources(self) -> Sources:
        return Sources(sidecar_env=str(self.directory / FILES[0]), cluster_env=str(self.directory / FILES[1]),
                       resolv_conf=str(self.directory / "resolv.conf"))


class Mutator:
    """Seeded cases: Mutator(seed).case(directory) writes one case, the n-th of that seed's sequence."""

    def __init__(self, seed: int, seeds: Sequence[bytes] | None = None, *, special_files: bool = True) -> None:
        self.seed = seed
        self.seeds = list(seeds) if seeds is not None else corpus()
        self.special_files = special_files  # FIFOs, sockets, device symlinks (False: only regular files)
        self.count = 0

    def case(self, directory: Path) -> Case:
        self.count += 1
        return self.replay(self.seed * 1_000_003 + self.count, directory)

    def replay(self, case_seed: int, directory: Path) -> Case:
        """The case of `describe()`'s seed, written again (the corpus must be the same)."""
        case = Case(case_seed, directory)
        r = random.Random(case_seed)
        for name in FILES:
            text = r.choice(self.seeds) if r.random() < 0.9 else b""
            for _ in range(r.choice((0, 0, 0, 1, 1, 2, 3, 5, 8))):
                text = self._mutate(r, text, case)[:MAX_GENERATED]
            self._write(r, directory / name, text, case)
        resolv = b"nameserver 10.10.10.6\n"
        if r.random() < 0.1:
            resolv = r.choice((b"nameserver 010.010.010.006\n", b"nameserver " + b"1" * 5000 + b"\n",
                               b"nameserver ::1\nnameserver 10.0.0.1\n", b"\xff\xfe", b""))
            case.actions.append(f"resolv.conf={resolv[:40]!r}")
        self._write(r, directory / "resolv.conf", resolv, case, special=r.random() < 0.05)
        return case

    # ---- content -----------------------------------------------------------------------------
    def _mutate(self, r: random.Random, text: bytes, case: Case) -> bytes:
        kind = r.choice(("byte", "byte", "special", "line", "line", "quote", "number", "number", "number",
                         "expansion", "size"))
        case.actions.append(kind)
        lines = text.split(b"\n")
        if kind == "byte" and text:
            at = r.randrange(len(text))
            op = r.randrange(3)
            if op == 0:
                return text[:at] + bytes([r.randrange(256)]) + text[at + 1 :]
            if op == 1:
                return text[:at] + text[at + 1 :]
            return text[:at] + bytes([r.randrange(256)]) + text[at:]
        if kind == "special":
            at = r.randrange(len(text) + 1)
            return text[:at] + r.choice(SPECIAL_BYTES) + text[at:]
        if kind == "line" and lines:
            op = r.randrange(4)
            i = r.randrange(len(lines))
            if op == 0:
                lines.insert(i, lines[r.randrange(len(lines))])
            elif op == 1:
                del lines[i]
            elif op == 2:
                j = r.randrange(len(lines))
                lines[i], lines[j] = lines[j], lines[i]
            else:
                lines.insert(i, r.choice(r.choice(self.seeds).split(b"\n") or [b""]))
            return b"\n".join(lines)
        if kind == "quote":
            quote = r.choice((b"'", b'"', b""))
            value = r.choice((b"x", b"a b", b"${HOME}", b"it's", b"multi\nline", b"\\", b""))
            tail = r.choice((b"", b"'", b'"', b" # c", b";x", b"y"))
            return text + b"\n" + r.choice(NAMES).encode() + b"=" + quote + value + r.choice((quote, b"")) + tail
        if kind == "number":
            name = r.choice(NAMES).encode()
            quote = r.choice((b"", b"'", b'"'))
            return text + b"\n" + name + b"=" + quote + r.choice(NUMBER_FORMS)(r).encode() + quote + b"\n"
        if kind == "expansion":
            atom = r.choice((b"${A}", b"${A}${A}", b"${A:-${A}}", b"${PATH}", b"${A:-x}"))
            chain = b"A=" + b"x" * r.choice((1, 16, 1024)) + b"\n" + (b"A=" + atom * r.randrange(2, 8) + b"\n") * \
                r.randrange(1, 60)
            return text + b"\n" + chain
        # size: a long line, a long value, many lines, or a file over the cap
        op = r.randrange(4)
        if op == 0:
            return text + b"\nA='" + b"y" * r.choice((1000, 130_000, 250_000, 600_000)) + b"'\n"
        if op == 1:
            return text + (b"bad line\n" * r.choice((100, 10_000)))
        if op == 2:
            return text + b"\n#" + b"c" * r.choice((70_000, 1 << 20)) + b"\n"
        return text * r.randrange(2, 20)

    # ---- the file itself ---------------------------------------------------------------------
    def _write(self, r: random.Random, path: Path, text: bytes, case: Case, *, special: bool | None = None) -> None:
        if special is None:
            special = r.random() < 0.12
        if not special:
            path.write_bytes(text)
            path.chmod(0o644)
            return
        kinds = ["missing", "dangling", "directory", "dev-null", "secret", "group-writable", "symlink", "sparse"]
        if self.special_files:
            kinds += ["fifo", "dev-zero", "socket", "dev-tty"]
        kind = r.choice(kinds)
        case.actions.append(f"{path.name}:{kind}")
        if kind == "missing":
            return
        if kind == "dangling":
            path.symlink_to(path.parent / "nowhere" / path.name)
        elif kind == "directory":
            path.mkdir()
        elif kind == "dev-null":
            path.symlink_to("/dev/null")
        elif kind == "dev-zero":
            path.symlink_to("/dev/zero")
        elif kind == "dev-tty":
            path.symlink_to("/dev/tty")
        elif kind == "fifo":
            os.mkfifo(path)
        elif kind == "socket":
            with socket.socket(socket.AF_UNIX) as s:
                s.bind(str(path))
        elif kind == "sparse":
            with path.open("wb") as f:
                f.write(text)
                f.truncate(r.choice((1 << 20, 1 << 30, 1 << 40)))
        else:
            target = path.with_name(path.name + ".target") if kind in ("secret", "symlink") else path
            target.write_bytes(text)
            target.chmod({"secret": 0o600, "group-writable": 0o664}.get(kind, 0o644))
            if target != path:
                path.symlink_to(target)


# ---- running a case ----------------------------------------------------------------------------

class AnyUser(Mapping[str, User]):
    """Accounts of a machine where every name exists (root is uid 0, every other name uid 997)."""

    def __getitem__(self, name: str) -> User:
        return User(name, 0, 0, "/root") if name == "root" else User(name, 997, 997, "/var/lib/istio")

    def __iter__(self) -> Iterator[str]:
        return iter(())

    def __len__(self) -> int:
        return 0


FUZZ_HOST = Host(addresses=(Address("lo", "127.0.0.1", True, True), Address("eth0", "10.10.10.20", False, True)),
                 hostname="vm-1.example", euid=os.geteuid(), users=AnyUser())
FUZZ_ENVIRON: Mapping[str, str] = {"PATH": "/usr/bin:/bin", "HOME": "/root", "SHELL": "/bin/bash", "TERM": "dumb"}


@dataclass(frozen=True)
class Outcome:
    status: int  # 0, 78, or -1 for an exception that is neither (described in `error`)
    lines: tuple[str, ...]  # what the CLI would print for the problems (capped)
    problem_lines: tuple[str, ...]  # every problem, one str() each
    seconds: float
    error: str = ""


def run_in_process(case: Case, host: Host = FUZZ_HOST, environ: Mapping[str, str] = FUZZ_ENVIRON) -> Outcome:
    """What `istio-vm config`, `iptables plan` and `explain` would decide on this case, in this process."""
    start = time.monotonic()
    try:
        config = load(case.sources, environ, host)
        plan = build_plan(config.capture)
        for fmt in ("restore", "json"):
            render(plan, fmt)
        explain(plan, config)
        render_text(config, show_source=True)
        render_json(config)
    except ConfigError as e:
        problems = tuple(str(p) for p in e.problems)
        return Outcome(78, tuple(capped(e.problems)), problems, time.monotonic() - start)
    except Exception as e:  # the finding: report it, do not stop the run
        return Outcome(-1, (), (), time.monotonic() - start, error=f"{type(e).__name__}: {e}"[:300])
    return Outcome(0, (), (), time.monotonic() - start)


def violations(outcome: Outcome) -> list[str]:
    """What breaks the contract in one outcome ([] when it holds)."""
    found = []
    if outcome.status not in (0, 78):
        found.append(f"status {outcome.status}: {outcome.error}")
    if outcome.status == 78 and not outcome.problem_lines:
        found.append("exit 78 without a problem")
    for line in outcome.problem_lines:
        if "\n" in line or "\r" in line or len(line) > MAX_PROBLEM_LINE + 40:
            found.append(f"problem not one bounded line: {line[:120]!r}")
            break
    if len(outcome.lines) > 21:
        found.append(f"{len(outcome.lines)} lines printed")
    if outcome.seconds > CASE_SECONDS:
        found.append(f"took {outcome.seconds:.2f}s")
    return found


def max_rss() -> int:
    """The high-water mark of this process's resident memory, in bytes (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def clear(directory: Path) -> None:
    """Remove what a case wrote (FIFOs, sockets, directories and symlinks included), keep the directory."""
    for entry in directory.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            for inner in entry.iterdir():
                inner.unlink()
            entry.rmdir()
        else:
            entry.unlink()


def describe(case: Case) -> str:
    """One line that reproduces a case: its seed and what was done."""
    return f"case seed {case.seed}: {', '.join(case.actions) or 'unmutated'}"


def vm_size() -> int:
    """This process's virtual memory size in bytes (what RLIMIT_AS counts)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")


class CaseTimeout(Exception):
    pass


def _expired(signum: int, frame: FrameType | None) -> None:
    raise CaseTimeout("the case took more than 5 s (a blocking read?)")


def run(seed: int, cases: int, *, memory_limit: bool = True) -> dict[str, Any]:
    """Run `cases` cases of `seed` in this process; the report as JSON-ready data."""
    mutator = Mutator(seed)
    report: dict[str, Any] = {"seed": seed, "cases": cases, "statuses": {}, "violations": [], "slowest": [0.0, ""]}
    previous = signal.signal(signal.SIGALRM, _expired)
    rss_before = max_rss()
    if memory_limit:  # the contract's 100 MB, enforced: beyond it allocation fails inside the case
        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        resource.setrlimit(resource.RLIMIT_AS, (vm_size() + CASE_MEMORY, hard))
    started = time.monotonic()
    times: list[float] = []
    try:
        with tempfile.TemporaryDirectory(prefix="istio-vm-fuzz-") as tmp:
            directory = Path(tmp)
            for _ in range(cases):
                case = mutator.case(directory)
                signal.alarm(5)
                try:
                    outcome = run_in_process(case)
                except CaseTimeout as e:
                    outcome = Outcome(-1, (), (), 5.0, error=str(e))
                finally:
                    signal.alarm(0)
                times.append(outcome.seconds)
                key = str(outcome.status)
                report["statuses"][key] = report["statuses"].get(key, 0) + 1
                if outcome.seconds > report["slowest"][0]:
                    report["slowest"] = [round(outcome.seconds, 4), describe(case)]
                for violation in violations(outcome):
                    report["violations"].append(f"{describe(case)}: {violation}")
                clear(directory)
    finally:
        signal.signal(signal.SIGALRM, previous)
    report["seconds"] = round(time.monotonic() - started, 3)
    times.sort()
    report["case_seconds"] = {"p50": times[len(times) // 2], "p99": times[len(times) * 99 // 100],
                              "max": times[-1]} if times else {}
    report["max_rss_growth_mb"] = round((max_rss() - rss_before) / 1e6, 1)
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m testbed.fuzz_config", description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--cases", type=int, default=2000)
    args = parser.parse_args(argv)
    report = run(args.seed, args.cases)
    json.dump(report, sys.stdout)
    sys.stdout.write("\n")
    return 1 if report["violations"] else 0


if __name__ == "__main__":
    sys.exit(main())
