"""Host facts read natively agree with the commands istio-start.sh ran (`hostname -I`, `hostname -s`)."""

from __future__ import annotations

import subprocess

from istio_vm.config.load import read_host
from tests.helpers import hostname_first_ip


def test_first_ip_matches_hostname_on_this_host() -> None:
    assert read_host().first_ip() == hostname_first_ip([])


def test_short_hostname_matches_hostname_s() -> None:
    out = subprocess.run(["hostname", "-s"], capture_output=True, text=True, check=True).stdout.strip()
    assert read_host().short_hostname() == out
