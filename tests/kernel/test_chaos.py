"""The chaos soak, short (agent mode, the pilot-agent double): testbed/chaos.py (root).

The longer run, and envoy mode with SIGHUP storms: `python -m benchmarks.chaos_soak` (docs/benchmarks.md);
tests/system/test_start_envoy.py runs one envoy-mode round.
"""

from __future__ import annotations

import pytest

from testbed.chaos import chaos_service, run_round
from testbed.service import ensure_user

pytestmark = pytest.mark.root


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_chaos_round_keeps_every_invariant(seed: int) -> None:
    ensure_user("istio-proxy")
    with chaos_service(None) as svc:
        result = run_round(svc, seed, seconds=4.0, envoy=False)
    assert result.problems == [], result
    assert result.exit_status in (0, 1)
    assert sum(result.actions.values()) >= 5
