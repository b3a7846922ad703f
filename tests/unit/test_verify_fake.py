"""verify against a recording runner: which processes it spawns, and its errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from istio_vm.errors import ApplyError
from istio_vm.iptables import verify
from istio_vm.iptables.rules import Plan
from istio_vm.iptables.runner import Completed
from tests.fakes import FakeRunner
from tests.helpers import text

REF = text("reference-vm/expected-v4.restore")


def test_scratch_namespace_argv_and_failures(tmp_path: Path) -> None:
    fake = FakeRunner()
    fake.handlers.append(lambda a, i: Completed(a, 0, json.dumps({"4": "", "6": ""})) if a[0] == "unshare"
                         else None)
    result = verify.compare(Plan.from_restore(REF), backend="nft", runner=fake, proc_net=str(tmp_path))
    assert fake.argvs[:2] == [("iptables-nft-save",), ("ip6tables-nft-save",)]
    assert fake.argvs[2][:3] == ("unshare", "--net", "--")
    assert fake.argvs[2][-3:] == ("-m", "istio_vm.iptables.canonical_netns", "nft")
    assert fake.argvs[2][-4] == "-I"  # isolated: the root child never imports from the working directory
    assert json.loads(fake.calls[2][1] or "") == {"4": REF, "6": ""}
    assert not result.drift
    broken = FakeRunner()
    broken.fail(lambda a, i: a[0] == "unshare", stderr="iptables-nft-restore: line 3 failed")
    with pytest.raises(ApplyError, match="line 3 failed"):
        verify.compare(Plan.from_restore(REF), backend="nft", runner=broken, proc_net=str(tmp_path))
