"""A recording fake Runner: canned outputs per binary, injectable failures, every call kept."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from istio_vm.iptables.runner import Completed

Handler = Callable[[tuple[str, ...], str | None], Completed | None]


@dataclass
class FakeRunner:
    saves: dict[str, str] = field(default_factory=dict)  # binary -> iptables-save output
    handlers: list[Handler] = field(default_factory=list)  # first non-None answer wins
    calls: list[tuple[tuple[str, ...], str | None]] = field(default_factory=list)

    def run(self, argv: Sequence[str], *, input: str | None = None, timeout: float) -> Completed:
        args = tuple(argv)
        assert timeout > 0
        self.calls.append((args, input))
        for handler in self.handlers:
            answer = handler(args, input)
            if answer is not None:
                return answer
        if args[0].endswith("-save"):
            return Completed(args, 0, self.saves.get(args[0], ""))
        return Completed(args, 0)

    def fail(self, predicate: Callable[[tuple[str, ...], str | None], bool], returncode: int = 1,
             stderr: str = "boom") -> None:
        self.handlers.append(lambda a, i: Completed(a, returncode, "", stderr) if predicate(a, i) else None)

    @property
    def argvs(self) -> list[tuple[str, ...]]:
        return [argv for argv, _ in self.calls]

    def input_of(self, *prefix: str) -> str | None:
        return next(i for a, i in self.calls if a[: len(prefix)] == prefix)
