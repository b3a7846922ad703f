"""Misspelt setting names: a name an env file assigns that istio-vm does not read, but nearly does.

`misspellings()` warns (file:line, "did you mean X?") for a name within a small edit distance of a
setting, or a setting in the wrong case; pilot-agent's own variables and the other names
`istioctl x workload entry configure` writes pass silently: they are passed on to pilot-agent as they are.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from istio_vm.config.settings import SETTINGS

# Names istio-vm reads that are not a setting's variable of their own.
_ALSO_READ = ("TERMINATION_DRAIN_DURATION_SECONDS",)
KNOWN = frozenset((*(s.variable for s in SETTINGS), *_ALSO_READ))

# pilot-agent's and istioctl's own variables (Istio 1.9: pkg/istio-agent, pilot/cmd/pilot-agent,
# istioctl/cmd/workload.go): set in cluster.env on purpose, never a typo of ours.
PILOT_AGENT = frozenset("""
    SERVICE_ACCOUNT POD_NAMESPACE INSTANCE_IP TRUST_DOMAIN JWT_POLICY CANONICAL_SERVICE CANONICAL_REVISION
    PROXY_XDS_VIA_AGENT PROXY_XDS_DEBUG_VIA_AGENT FILE_MOUNTED_CERTS XDS_ROOT_CA CA_ROOT_CA CA_PROVIDER
    ECC_SIGNATURE_ALGORITHM SECRET_TTL SECRET_GRACE_PERIOD_RATIO SECRET_ROTATION_GRACE_PERIOD_RATIO
    STS_PORT TOKEN_AUDIENCES XDS_AUTH XDS_AUTH_PROVIDER CREDENTIAL_FETCHER_TYPE CREDENTIAL_IDENTITY_PROVIDER
    ISTIO_BOOTSTRAP ISTIO_BOOTSTRAP_OVERRIDE ISTIO_KUBE_APP_PROBERS ISTIO_PROMETHEUS_ANNOTATIONS
    ISTIO_DEFAULT_REQUEST_TIMEOUT ISTIO_GPRC_MAXSTREAMS ISTIO_CFG ENABLE_WASM_TELEMETRY DNS_AGENT
    DNS_PROXY_ADDR OUTPUT_CERTS PROV_CERT CA_ADDR ISTIO_DELTA_XDS ISTIO_MULTIROOT_MESH
    ENVOY_STATUS_PORT ENVOY_PROMETHEUS_PORT DISABLE_ENVOY REWRITE_PROBE_LEGACY_LOCALHOST_DESTINATION
""".split())
# Whole families of pilot-agent's: proxy metadata (workload labels, cluster id...) and its feature flags.
PILOT_AGENT_PREFIXES = ("ISTIO_META_", "ISTIO_METAJSON_", "PILOT_", "XDS_", "SECRET_", "ISTIO_KUBE_", "ISTIO_AGENT_")
# Names from 1.9's own sidecar.env comments that nothing reads, and what reads that setting instead.
STALE = {"ISTIO_INBOUND_EXCLUDE_PORTS": "ISTIO_LOCAL_EXCLUDE_PORTS"}


def misspellings(assigned: Mapping[str, str]) -> list[str]:
    """One warning per misspelt name; `assigned` is {NAME: "FILE:LINE"} of the env files' assignments.

    >>> misspellings({"ISTIO_INBOUND_PORT": "cluster.env:3", "ISTIO_META_CLUSTER_ID": "cluster.env:4"})
    ['cluster.env:3: ISTIO_INBOUND_PORT is not a setting of istio-vm (it is only passed on to pilot-agent): \
did you mean ISTIO_INBOUND_PORTS?']
    """
    warnings = []
    for name, where in assigned.items():
        meant = suggestion(name)
        if meant is not None:
            warnings.append(f"{where}: {name} is not a setting of istio-vm (it is only passed on to pilot-agent): "
                            f"did you mean {meant}?")
    return warnings


def suggestion(name: str) -> str | None:
    """The setting `name` is probably a misspelling of, or None (a setting, pilot-agent's, or far from any)."""
    if name in KNOWN or name in PILOT_AGENT:
        return None
    if name in STALE:
        return STALE[name]
    upper = name.upper()
    if upper in KNOWN:
        return upper  # a setting in the wrong case: bash's names are case-sensitive
    # In pilot-agent's families any name is legitimate; only a near-exact copy of one of ours is a typo.
    limit = 1 if upper.startswith(PILOT_AGENT_PREFIXES) or len(name) < 8 else 2
    found = sorted((d, known) for known in KNOWN
                   if abs(len(known) - len(upper)) <= limit and (d := distance(upper, known)) <= limit)
    return found[0][1] if found else None


def distance(a: str, b: str) -> int:
    """Damerau-Levenshtein distance (optimal string alignment): a swap of two neighbours counts once.

    >>> distance("ISTIO_SERVICE_CIRD", "ISTIO_SERVICE_CIDR"), distance("ENVOY_PORT", "ENVOY_PORTS")
    (1, 1)
    """
    previous2: list[int] = []
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, start=1):
        current = [i]
        for j, cb in enumerate(b, start=1):
            cost = 0 if ca == cb else 1
            value = min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + cost)
            if i > 1 and j > 1 and ca == b[j - 2] and a[i - 2] == cb:
                value = min(value, previous2[j - 2] + 1)
            current.append(value)
        previous2, previous = previous, current
    return previous[-1]


def assigned_in_files(origins: Mapping[str, str], files: Iterable[str]) -> dict[str, str]:
    """{NAME: "FILE:LINE"} of the names the env files assigned (not the environment's, not the defaults)."""
    prefixes = tuple(f"{path}:" for path in files)
    return {name: where for name, where in origins.items() if where.startswith(prefixes)}
