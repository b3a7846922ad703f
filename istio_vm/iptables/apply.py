"""Install and clean Istio's capture rules atomically, with rollback to the snapshot on any failure.

`install_plan` reads one save per family (the snapshot), then writes one `iptables-restore --noflush`
per family that has something to remove or add (removal of the Istio state found + the plan, per
table) and runs the `ip` commands in one `ip -batch`. If anything fails, Istio's state of each
family that changed goes back to the snapshot's (nothing else is touched) and applied `ip` commands
are undone. `clean_host` is the same with an empty plan, family by family and without rollback.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from istio_vm import loggers
from istio_vm.errors import ApplyError
from istio_vm.iptables import ip_batch, state
from istio_vm.iptables.backend import PROC_NET, Snapshot, binary, other_saves, save, take
from istio_vm.iptables.found import Owners, find
from istio_vm.iptables.ip_batch import IpCommand
from istio_vm.iptables.restore_input import Input, compose, undo_text
from istio_vm.iptables.rules import Plan
from istio_vm.iptables.runner import CountingRunner, Runner, SubprocessRunner

log = loggers.logger(__name__)

WAIT_SECONDS = 30  # --wait=N: how long a legacy restore waits for the xtables lock (nft ignores it)
RESTORE_TIMEOUT = WAIT_SECONDS + 30.0
IP_TIMEOUT = 30.0


class FamilyReport(NamedTuple):
    family: int
    removed: tuple[str, ...]  # "table: -D/-F/-X ..." lines for the Istio state found
    added: tuple[str, ...]  # "table: ..." plan lines
    restore_input: str  # what was (or, in a dry run, would be) fed to iptables-restore; "" = not run


class Report(NamedTuple):
    """What install or clean did: backend, per-family changes, ip commands, processes spawned."""

    backend: str
    backend_reason: str
    families: tuple[FamilyReport, ...]
    ip_applied: tuple[tuple[str, ...], ...] = ()  # ip argv run successfully (adds and dels)
    commands: tuple[tuple[str, ...], ...] = ()  # every process spawned, in order
    dry_run: bool = False

    @property
    def processes(self) -> int:
        return len(self.commands)

    def summary(self) -> str:
        parts = [f"backend {self.backend} ({self.backend_reason})"]
        for f in self.families:
            parts.append(f"IPv{f.family}: {len(f.removed)} removal lines, {len(f.added)} plan lines"
                         + ("" if f.restore_input else " (no restore needed)"))
        if self.ip_applied:
            parts.append(f"{len(self.ip_applied)} ip commands")
        parts.append(f"{self.processes} processes" + (" (dry run)" if self.dry_run else ""))
        return "; ".join(parts)


class _Progress:
    """What has been written so far, so a rollback undoes exactly that."""

    def __init__(self) -> None:
        self.written: list[tuple[int, tuple[str, ...]]] = []  # (family, tables)
        self.ip_done: list[IpCommand] = []


class _Failed(Exception):
    def __init__(self, message: str, stderr: str) -> None:
        super().__init__(message)
        self.stderr = stderr


def _restore_argv(backend: str, family: int, *extra: str) -> list[str]:
    return [binary(backend, family, "restore"), *extra, f"--wait={WAIT_SECONDS}"]


def _run_ip(runner: Runner, commands: Sequence[IpCommand], progress: _Progress) -> list[tuple[IpCommand, str]]:
    """Run commands through `ip -force -batch -`; record what succeeded; return the failures."""
    failures: list[tuple[IpCommand, str]] = []
    for batch in ip_batch.batches(commands):
        done = runner.run(batch.argv(), input=batch.text(), timeout=IP_TIMEOUT)
        failed = ip_batch.failed_lines(done.stderr)
        if not done.ok and not failed:  # killed or crashed: assume the worst (every add may have happened)
            progress.ip_done += [c for c in batch.commands if c.verb == "add"]
            failures += [(c, done.describe()) for c in batch.commands]
            continue
        for number, command in enumerate(batch.commands, start=1):
            if number in failed:
                failures.append((command, done.stderr.strip()))
            else:
                progress.ip_done.append(command)
    return failures


def _rollback(runner: Runner, snap: Snapshot, progress: _Progress, owners: Owners | None) -> list[str]:
    """Put Istio's state of each family written back as in the snapshot, and undo applied ip
    commands; return errors (none: the host's Istio state is as found).

    A fresh save says what the failed run really changed: a restore that failed as a whole (the
    xtables lock held, a bad line) changed nothing and needs no undo. Only Istio's rules are
    touched (undo_text): a rule another program added since the snapshot stays.
    """
    errors: list[str] = []
    for family, _tables in progress.written:
        now = save(runner, snap.backend, family)
        if not now.ok:
            errors.append(f"IPv{family}: cannot read the rules back to undo them: {now.describe()}")
            continue
        text = undo_text(now.stdout, snap.saves[family], owners)
        if not text:
            continue  # unchanged
        done = runner.run(_restore_argv(snap.backend, family, "--noflush"), input=text, timeout=RESTORE_TIMEOUT)
        if not done.ok:
            errors.append(f"IPv{family}: {done.describe()}")
    if progress.ip_done:
        undo = [c.inverse() for c in reversed(progress.ip_done)]
        for command, message in _run_ip(runner, undo, _Progress()):
            errors.append(f"{command.line()}: {message}")
    for message in errors:
        log.error("rollback: %s", message)
    return errors


def _recorded_ip(previous: state.RunState, run_dir: str) -> list[IpCommand]:
    """The `ip` commands the last install recorded in the state file (a file: parsed, so checked)."""
    try:
        return [ip_batch.parse_command(argv) for argv in previous.ip_commands]
    except ValueError as e:
        raise ApplyError(f"{run_dir}/{state.STATE_FILE}: {e}") from None


def _inputs(snap: Snapshot, plan: Plan, what: str, owners: Owners | None) -> dict[int, Input]:
    """Per family read, the restore input removing the Istio state found and adding the plan."""
    inputs = {family: compose(find(text, owners), plan.tables(family)) for family, text in snap.saves.items()}
    for family, inp in inputs.items():
        log.info("%s IPv%d: %d removal lines for the Istio state found, %d plan lines", what, family,
                 len(inp.removed), len(inp.added))
    return inputs


def _test_multi_table(runner: Runner, snap: Snapshot, inputs: dict[int, Input], what: str) -> None:
    """Each COMMIT is atomic on its own, so a restore touching one table either applies whole or
    changes nothing: no test needed. Spanning nat and mangle (TPROXY), the first table could commit
    before the second fails; `--test` first catches that before anything is written."""
    for family, inp in inputs.items():
        if inp.multi_table:
            done = runner.run(_restore_argv(snap.backend, family, "--test", "--noflush"), input=inp.text,
                              timeout=RESTORE_TIMEOUT)
            if not done.ok:
                raise ApplyError(f"{what}: IPv{family} rules rejected, nothing changed: {done.describe()}",
                                 stderr=done.stderr)


def _write(runner: Runner, snap: Snapshot, inputs: dict[int, Input], ip_commands: Sequence[IpCommand],
           progress: _Progress, what: str, owners: Owners | None) -> None:
    """Test the multi-table inputs, run the ip batch, then one restore per family; on any failure
    roll back what was written."""
    _test_multi_table(runner, snap, inputs, what)
    try:
        if ip_commands:
            failures = [(c, m) for c, m in _run_ip(runner, ip_commands, progress) if c.verb == "add"]
            if failures:
                raise _Failed(f"ip {failures[0][0].line()} failed: {failures[0][1]}", failures[0][1])
        for family, inp in inputs.items():
            if not inp.text:
                continue
            progress.written.append((family, inp.tables))
            done = runner.run(_restore_argv(snap.backend, family, "--noflush"), input=inp.text,
                              timeout=RESTORE_TIMEOUT)
            if not done.ok:
                raise _Failed(f"IPv{family}: {done.describe()}", done.stderr)
    except _Failed as failure:
        errors = _rollback(runner, snap, progress, owners)
        raise ApplyError(f"{what} failed, {'host left as found' if not errors else 'ROLLBACK INCOMPLETE'}: "
                         f"{failure}", stderr=failure.stderr,
                         rollback_errors=tuple(errors)) from None


def _report(snap: Snapshot, inputs: dict[int, Input], progress: _Progress, runner: CountingRunner,
            dry_run: bool) -> Report:
    families = tuple(FamilyReport(f, i.removed, i.added, i.text) for f, i in sorted(inputs.items()))
    return Report(snap.backend, snap.reason, families, tuple(c.argv for c in progress.ip_done),
                  tuple(c.argv for c in runner.calls), dry_run)


def install_plan(plan: Plan, *, run_dir: str, backend: str | None = None, runner: Runner | None = None,
                 dry_run: bool = False, proc_net: str = PROC_NET, owners: Owners | None = None) -> Report:
    """Replace the Istio state found on the host by the plan, atomically, in as few processes as possible.

    `owners`: the values that make a 1.9-shaped built-in-chain rule Istio's (this configuration's;
    those the last install recorded are added); None: any value. Raises ApplyError (host rolled
    back) on any failure.
    """
    counting = CountingRunner(runner or SubprocessRunner())
    planned = list(plan.ip_commands)
    with state.locked(run_dir):
        previous = state.read(run_dir)
        recorded = _recorded_ip(previous, run_dir)
        effective = None if owners is None else owners | previous.owners
        batch = ip_batch.install_commands(recorded, planned) if (recorded or planned) else []
        if not dry_run:  # record the intent first: a crash half-way still lets clean find the ip state
            union = previous.ip_commands + tuple(c.argv for c in planned if c.argv not in previous.ip_commands)
            state.write(run_dir, state.RunState(backend or previous.backend, union,
                                                previous.owners | (owners or Owners())))
        progress = _Progress()
        try:
            snap = take(counting, override=backend, recorded=previous.backend,
                        optional=set() if plan.v6 else {6}, proc_net=proc_net)
            inputs = _inputs(snap, plan, "install", effective)
            if not dry_run:
                _write(counting, snap, inputs, batch, progress, "install", effective)
        except ApplyError:
            if not dry_run:
                _restore_state(run_dir, previous)
            raise
        if not dry_run:
            state.write(run_dir, state.RunState(snap.backend, tuple(c.argv for c in planned), owners or Owners()))
            _remove_from_other_backend(counting, snap, proc_net, effective)
    return _report(snap, inputs, progress, counting, dry_run)


def _remove_from_other_backend(runner: Runner, snap: Snapshot, proc_net: str, owners: Owners | None) -> None:
    """Istio rules in the backend not chosen (1.9's in legacy, say) capture traffic too: remove them,
    atomically per family, once ours are in place. A failure is logged; verify keeps reporting it.

    Only when nft is in use: legacy is looked up through /proc (no process unless it has tables), while
    reading nft costs two saves on every install; with legacy in use, verify still reports nft's."""
    if snap.backend != "nft":
        return
    other = other_saves(runner, snap.backend, snap.saves.keys(), proc_net)
    backend = "legacy" if snap.backend == "nft" else "nft"
    inputs = {family: compose(find(save, owners), Plan().tables(family)) for family, save in other.items()
              if not find(save, owners).empty}
    if not inputs:
        return
    log.warning("Removing the Istio rules found in the %s backend (IPv%s): %s is in use", backend,
                "/".join(map(str, sorted(inputs))), snap.backend)
    try:
        _write(runner, Snapshot(backend, "not chosen", other), inputs, [], _Progress(), f"clean of {backend}", owners)
    except ApplyError as e:
        log.error("%s", e)


def clean_host(*, run_dir: str, backend: str | None = None, runner: Runner | None = None,
               dry_run: bool = False, proc_net: str = PROC_NET, owners: Owners | None = None) -> Report:
    """Remove the Istio state found on the host and the ip state recorded by the last install.

    Family by family: each restore is atomic per table, and a family that fails (its restore, or
    the --test of a two-table input) does not keep the other's rules; the recorded ip state is
    removed either way. Idempotent: on a clean host it only reads (two saves). Raises ApplyError
    naming what could not be removed (the state file is kept for a retry).
    """
    counting = CountingRunner(runner or SubprocessRunner())
    with state.locked(run_dir):
        previous = state.read(run_dir)
        recorded = _recorded_ip(previous, run_dir)
        effective = None if owners is None else owners | previous.owners
        snap = take(counting, override=backend, recorded=previous.backend, optional={6}, proc_net=proc_net)
        inputs = _inputs(snap, Plan(), "clean", effective)
        progress = _Progress()
        if not dry_run:
            failures = _clean_families(counting, snap, inputs)
            undo = [c.inverse() for c in reversed(recorded) if c.verb == "add"]
            for command, message in _run_ip(counting, undo, progress) if undo else []:
                log.warning("clean: %s: %s (already gone?)", command.line(), message)
            if failures:
                state.write(run_dir, state.RunState(snap.backend, (), previous.owners))
                cleaned = [f"IPv{f}" for f, i in sorted(inputs.items()) if i.text and f not in dict(failures)]
                raise ApplyError(f"clean failed for {'; '.join(m for _, m in failures)}"
                                 + (f" ({', '.join(cleaned)} cleaned)" if cleaned else ""),
                                 stderr="\n".join(m for _, m in failures))
            state.remove(run_dir)
    return _report(snap, inputs, progress, counting, dry_run)


def _clean_families(runner: Runner, snap: Snapshot, inputs: dict[int, Input]) -> list[tuple[int, str]]:
    """One restore per family with something to remove; the failures, as (family, message)."""
    failures: list[tuple[int, str]] = []
    for family, inp in sorted(inputs.items()):
        if not inp.text:
            continue
        if inp.multi_table:
            tested = runner.run(_restore_argv(snap.backend, family, "--test", "--noflush"), input=inp.text,
                                timeout=RESTORE_TIMEOUT)
            if not tested.ok:
                failures.append((family, f"IPv{family} (nothing removed): {tested.describe()}"))
                continue
        done = runner.run(_restore_argv(snap.backend, family, "--noflush"), input=inp.text, timeout=RESTORE_TIMEOUT)
        if not done.ok:
            failures.append((family, f"IPv{family}: {done.describe()}"))
    for _, message in failures:
        log.error("clean: %s", message)
    return failures


def _restore_state(run_dir: str, previous: state.RunState) -> None:
    if previous == state.RunState():
        state.remove(run_dir)
    else:
        state.write(run_dir, previous)
