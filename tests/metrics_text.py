"""The metrics file read back with Prometheus' own text-format parser (prometheus_client), for the tests."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families


def parse_metrics(text: str) -> dict[str, float]:
    """Every sample as 'name{k="v",...}' -> value (labels sorted); raises ValueError on a malformed file.

    Also checks what the textfile collector relies on: each family has its HELP and TYPE lines, and no
    sample is there twice."""
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        assert family.documentation, f"{family.name} has no HELP"
        assert family.type in ("gauge", "counter"), f"{family.name}: TYPE {family.type}"
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            key = f"{sample.name}{{{labels}}}" if labels else sample.name
            assert key not in samples, f"{key} twice"
            samples[key] = sample.value
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            name = line.split()[2]
            assert f"# HELP {name} " in text, f"{name}: TYPE without HELP"
    return samples
