"""The published workload schema says what the API accepts: a spec it calls valid is
stored, and one it calls invalid for a rule JSON Schema can express is refused by both."""

from __future__ import annotations

import re
import sys
from typing import Any

import jsonschema_rs
import pytest
from jsonschema import Draft202012Validator
from pydantic import ValidationError

from autoscaler.admission import runnable_problems
from autoscaler.api.contract import complete
from autoscaler.spec import APPLY, WorkloadSpec, limit_errors

MAX_REPLICAS = 100


def _document(max_replicas: int = MAX_REPLICAS) -> dict[str, Any]:
    paths: dict[str, Any] = {"/v1/projects/{project}/workloads/{slug}": {"put": {}, "patch": {}}}
    return complete({"paths": paths}, max_replicas=max_replicas)


def _schema() -> dict[str, Any]:
    """The PUT body's published schema (the path gives the slug when the body has none)."""
    return {"$ref": "#/components/schemas/WorkloadSpec", "components": _document()["components"]}


def _schema_valid(body: dict[str, Any]) -> bool:
    """Whether the published schema takes ``body``, read with Python's ``re`` (the
    ``jsonschema`` package) and with ECMA-262's patterns, JSON Schema's own dialect
    (``jsonschema_rs``, which schemathesis uses too): the two must agree."""
    python: bool = Draft202012Validator(_schema()).is_valid(body)
    ecma = jsonschema_rs.validator_for(_schema()).is_valid(body)
    assert python == ecma, f"Python's re says {python}, ECMA-262 says {ecma}"
    return python


def _server_accepts(body: dict[str, Any]) -> bool:
    """What the API's PUT checks, but for the registered workers (the store's)."""
    try:
        spec = WorkloadSpec.model_validate({"slug": "s", **body}, context={APPLY: True})
    except ValidationError:
        return False
    return not limit_errors(spec, max_replicas=MAX_REPLICAS) and not runnable_problems(spec)


BASE = {"name": "bot", "model": "meta-llama/Llama-3.1-8B-Instruct"}
AUTOSCALING = {"max_workers": 3, "max_hourly_cost_usd": 5.0}

VALID = [
    {},
    {"execution_policy": "fixed", "execution_policy_config": {"replicas": 2}},
    {"execution_policy_config": None},
    {"execution_policy_config": {"replicas": 2.0}},  # JSON Schema's integer: 2.0 is 2
    {"execution_policy": "scheduled", "execution_policy_config": {"cron": "0 2 * * *"}},
    {
        "execution_policy": "scheduled",
        "execution_policy_config": {"window": "Mon-Fri 08:00-20:00 UTC", "replicas": 3},
    },
    {"execution_policy": "autoscaling", "execution_policy_config": AUTOSCALING},
    {
        "execution_policy": "autoscaling",
        "execution_policy_config": {
            "max_workers": 2,
            "workers": {"source": "private", "private_worker_ids": ["wrk_1"]},
        },
    },
    {"execution_policy": "autoscaling", "worker_id": "wrk_1"},
    {"backend": "vllm-omni", "task_type": "text2image", "vllm_version": "0.11.0"},
    {"endpoint_type": "sync"},
    {"endpoint_type": "streaming", "per_worker": 1, "execution_policy_config": {"replicas": 2}},
    {
        "endpoint_type": "sync",
        "execution_policy": "autoscaling",
        "execution_policy_config": {**AUTOSCALING, "min_workers": 1},
    },
    {
        "endpoint_type": "async",
        "execution_policy": "autoscaling",
        "execution_policy_config": {**AUTOSCALING, "min_throughput_rate": 1000},
    },
    {"endpoint_type": "async", "task_type": "reranker"},
]

INVALID = {
    "scheduled without a schedule": {"execution_policy": "scheduled"},
    "cron and window": {
        "execution_policy": "scheduled",
        "execution_policy_config": {"cron": "0 2 * * *", "window": "Sat 00:00-23:59 UTC"},
    },
    "window with a duration": {
        "execution_policy": "scheduled",
        "execution_policy_config": {"window": "Sat 00:00-23:59 UTC", "duration": "1h"},
    },
    "zero duration": {
        "execution_policy": "scheduled",
        "execution_policy_config": {"cron": "0 2 * * *", "duration": "0h0m"},
    },
    "unknown time zone": {
        "execution_policy": "scheduled",
        "execution_policy_config": {"cron": "0 2 * * *", "timezone": "Mars/Olympus"},
    },
    "autoscaling without a config": {"execution_policy": "autoscaling"},
    "cloud autoscaling without a $/h ceiling": {
        "execution_policy": "autoscaling",
        "execution_policy_config": {"max_workers": 3},
    },
    "a fixed config under autoscaling": {
        "execution_policy": "autoscaling",
        "execution_policy_config": {"replicas": 2},
    },
    "more replicas than the service allows": {"execution_policy_config": {"replicas": 101}},
    "max_workers above the maximum": {
        "execution_policy": "autoscaling",
        "execution_policy_config": {**AUTOSCALING, "max_workers": 101},
    },
    "vllm_version on sglang": {"backend": "sglang", "vllm_version": "0.11.0"},
    "a version that is not one": {"vllm_version": "latest"},
    "an image task on vllm": {"task_type": "text2image"},
    "worker_id with a cloud pool": {
        "worker_id": "wrk_1",
        "execution_policy": "autoscaling",
        "execution_policy_config": {
            **AUTOSCALING,
            "workers": {"cloud_pool": {"gpu_pool": ["NVIDIA A10G"]}},
        },
    },
    "an unknown GPU": {
        "execution_policy": "autoscaling",
        "execution_policy_config": {
            **AUTOSCALING,
            "workers": {"cloud_pool": {"gpu_pool": ["NVIDIA Z9000"]}},
        },
    },
    "an unknown region": {
        "execution_policy": "autoscaling",
        "execution_policy_config": {**AUTOSCALING, "regions": ["moon-base-1"]},
    },
    "a sync endpoint with min_workers 0": {
        "endpoint_type": "sync",
        "execution_policy": "autoscaling",
        "execution_policy_config": AUTOSCALING,
    },
    "a streaming endpoint with no replica": {
        "endpoint_type": "streaming",
        "execution_policy_config": {"replicas": 0},
    },
    "a scheduled sync endpoint": {
        "endpoint_type": "sync",
        "execution_policy": "scheduled",
        "execution_policy_config": {"cron": "0 2 * * *"},
    },
    "a sync reranker": {"endpoint_type": "sync", "task_type": "reranker"},
    "an unknown endpoint type": {"endpoint_type": "batch"},
    "per_worker 0": {"per_worker": 0},
    "a zero throughput floor": {
        "execution_policy": "autoscaling",
        "execution_policy_config": {**AUTOSCALING, "min_throughput_rate": 0},
    },
    "a blank name": {"name": "   "},
    "a name of separators": {"name": "\x1c\x1f\x85"},
    "a model of line separators": {"model": "\u2028\u2029"},
    "a version with a final newline": {"vllm_version": "0.11.0\n"},
    "a version in another script's digits": {"vllm_version": "\u0660.\u0661\u0661.\u0660"},
    "a slug with a final newline": {"slug": "bot\n"},
    "a command longer than 16 KiB": {"command": "--dtype auto " * 1400},
    "a duration in upper case": {
        "execution_policy": "scheduled",
        "execution_policy_config": {"cron": "0 2 * * *", "duration": "1H"},
    },
    "a duration with a final newline": {
        "execution_policy": "scheduled",
        "execution_policy_config": {"cron": "0 2 * * *", "duration": "1h\n"},
    },
    "a duration of true": {
        "execution_policy": "scheduled",
        "execution_policy_config": {"cron": "0 2 * * *", "duration": True},
    },
    "a scheduled run longer than 366 days": {
        "execution_policy": "scheduled",
        "execution_policy_config": {"cron": "0 2 * * *", "duration": 366 * 86400 + 1},
    },
    "a secret name with a final newline": {"hf_token_secret": "hf-token\n"},
    "a slug that is no DNS label": {"slug": "Not_A_Slug"},
}


@pytest.mark.parametrize("extra", VALID)
def test_a_spec_the_schema_calls_valid_is_accepted(extra: dict[str, Any]) -> None:
    body = {**BASE, **extra}
    assert _schema_valid(body)
    assert _server_accepts(body)


@pytest.mark.parametrize("extra", INVALID.values(), ids=list(INVALID))
def test_a_rule_the_schema_can_express_is_in_it_and_the_server_keeps_it(
    extra: dict[str, Any],
) -> None:
    body = {**BASE, **extra}
    assert not _schema_valid(body)
    assert not _server_accepts(body)


def test_the_document_publishes_the_service_maximum_and_the_merge_patch_shape() -> None:
    schemas = _document(max_replicas=7)["components"]["schemas"]
    assert schemas["FixedPolicy"]["properties"]["replicas"]["maximum"] == 7
    assert schemas["AutoscalingPolicy"]["properties"]["max_workers"]["maximum"] == 7
    patch = schemas["WorkloadPatch"]
    assert patch["additionalProperties"] is False
    assert set(patch["properties"]) == set(schemas["WorkloadSpec"]["properties"])


def test_the_blank_rule_is_one_pattern_in_python_and_in_json_schemas_dialect() -> None:
    """JSON Schema's patterns are ECMA-262, whose ``\\s`` is not Python's (U+0085 and
    U+001C-U+001F are not whitespace to it): the published rule spells its characters out,
    and over every code point it calls blank exactly what the spec's check strips."""
    spec = _document()["components"]["schemas"]["WorkloadSpec"]["properties"]
    for field in ("name", "model"):
        pattern = spec[field]["pattern"]
        assert "\\s" not in pattern.lower(), pattern
        for point in range(sys.maxunicode + 1):
            char = chr(point)
            assert (re.search(pattern, char) is not None) == bool(char.strip()), hex(point)


def test_every_published_pattern_ends_where_the_string_ends_in_both_dialects() -> None:
    """A pattern's ``$`` is the string's end in ECMA-262, but also the place before a
    final newline in Python's ``re``: each one the document publishes is guarded, so
    ``value\\n`` is refused by the schema as by the server (the cases above)."""
    patterns: list[str] = []

    def walk(node: object) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "pattern" and isinstance(value, str):
                    patterns.append(value)
                else:
                    walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(_document())
    ends = [p for p in patterns if p.endswith("$")]
    assert len(ends) >= 8
    assert all(p.endswith("(?!\\n)$") for p in ends), ends
