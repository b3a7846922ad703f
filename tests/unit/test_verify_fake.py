"""verify against a recording runner: which processes it spawns, and its errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from istio_vm.errors import ApplyError
from istio_vm.iptables import canonical_netns, verify
from istio_vm.iptables.rules import Plan
from istio_vm.iptables.runner import Completed
from tests.fakes import FakeRunner
from tests.helpers import text

REF = text("reference-vm/expected-v4.restore")


def test_scratch_namespace_argv_and_failures(tmp_path: Path) -> None:
    fake = FakeRunner()
    given: dict[str, str] = {}

    def scratch(argv: tuple[str, ...], stdin: str | None) -> Completed | None:
        if argv[0] != "unshare":
            return None
        given.update({argv[i + 3]: Path(argv[i + 2]).read_text() for i in range(7, len(argv), 4)})  # during the run
        return Completed(argv, 0, f"{canonical_netns.MARKER}4\n")  # the plan saved back: nothing Istio's

    fake.handlers.append(scratch)
    result = verify.compare(Plan.from_restore(REF), backend="nft", runner=fake, proc_net=str(tmp_path))
    assert fake.argvs[:2] == [("iptables-nft-save",), ("ip6tables-nft-save",)]
    # No second Python: a shell in the new namespace, the data only as its arguments (files).
    assert fake.argvs[2][:7] == ("unshare", "--net", "--", "sh", "-c", canonical_netns.SCRIPT, "sh")
    assert fake.argvs[2][7:9] == ("iptables-nft-restore", "iptables-nft-save")
    assert given == {"4": REF}  # only the family with rules; the files are gone afterwards
    assert not Path(fake.argvs[2][9]).exists()
    assert not result.drift
    broken = FakeRunner()
    broken.fail(lambda a, i: a[0] == "unshare", stderr="iptables-nft-restore: line 3 failed")
    with pytest.raises(ApplyError, match="line 3 failed"):
        verify.compare(Plan.from_restore(REF), backend="nft", runner=broken, proc_net=str(tmp_path))


def test_the_scratch_output_splits_at_the_family_markers() -> None:
    out = f"{canonical_netns.MARKER}4\n*nat\n-A X\nCOMMIT\n{canonical_netns.MARKER}6\n*nat\nCOMMIT\n"
    assert canonical_netns.split_saves(out) == {4: "*nat\n-A X\nCOMMIT\n", 6: "*nat\nCOMMIT\n"}
