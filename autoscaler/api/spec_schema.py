"""The workload spec's published JSON schema: pydantic's, with every rule of
:mod:`autoscaler.spec` that JSON Schema can express added, so that a client (or a
fuzzer) that follows the document sends specs the API accepts.

Added to pydantic's schema:

* per ``execution_policy``, the shape of ``execution_policy_config`` (``if``/``then``):
  ``fixed`` (or none) a :class:`~autoscaler.spec.FixedPolicy` or nothing; ``scheduled`` a
  :class:`~autoscaler.spec.ScheduledPolicy`, required; ``autoscaling`` an
  :class:`~autoscaler.spec.AutoscalingPolicy`, required unless ``worker_id`` pins the
  workload to a private worker;
* a schedule has exactly one of ``cron`` and ``window``, ``duration`` only with ``cron``,
  a positive duration, a known time zone;
* cloud autoscaling (no ``workers``, or ``source: cloud``) needs ``max_hourly_cost_usd``;
* ``replicas``, ``min_workers`` and ``max_workers`` at most the service's maximum
  (``max_replicas_per_workload``);
* ``vllm_version`` only with backend ``vllm`` or ``vllm-omni``, and shaped like a version;
  image, audio and video task types only with ``vllm-omni``; ``worker_id`` not with a
  ``workers.cloud_pool``; ``max_model_len`` and ``custom_chat_template`` not with
  ``ollama``;
* ``endpoint_type`` ``sync`` or ``streaming``: not with a job-only ``task_type``
  (reranker, classification, reward), not with ``execution_policy`` ``scheduled``, and a
  replica at all times (``replicas`` at least 1; autoscaling with a config whose
  ``min_workers`` is at least 1);
* names: a slug is a DNS label, ``name`` and ``model`` not blank, GPU names from the
  catalog, CUDA versions from their table (regions and labels carry their own patterns
  in pydantic's schema).

What JSON Schema cannot express is said in the descriptions, and the API answers 422
naming the field: ``max_workers`` at least ``min_workers`` and the lower latency bound
below the upper (comparisons between two fields), CUDA pins that some GPU of the pool
runs (the catalog's driver tables), an engine ``command`` that parses and fits the
backend and model (and sets no flag that ``max_model_len``, ``custom_chat_template`` or
``llm_loras`` sets), a secret stored in the project (the store), adapters only with
backend ``vllm`` or ``sglang`` (expressible, but schemathesis's generator gives up on
the whole body when a condition ties ``backend`` to the ``llm_loras`` array), adapter
names used once and not the model's, a worker registered in the project (the store), and
the syntax of ``cron`` and ``window`` (published as the formats ``cron`` and
``schedule-window``).
"""

from __future__ import annotations

import copy
from typing import Any
from zoneinfo import available_timezones

from autoscaler.labels import SPACE
from autoscaler.spec import (
    BACKENDS,
    JOB_ONLY_TASK_TYPES,
    LIVE_ENDPOINT_TYPES,
    MAX_COMMAND,
    MAX_DURATION_SEC,
    OMNI_TASK_TYPES,
    SECRET_NAME_PATTERN,
    SLUG_RE,
    Backend,
    ExecutionPolicy,
    WorkloadSpec,
)
from catalog.cuda import known_cuda_versions
from catalog.gpus import all_gpus

REF = "#/components/schemas/{model}"

_VERSION = r"^v?[0-9]+\.[0-9]+(\.[0-9]+)?[-.+a-zA-Z0-9]*$"
_DURATION = r"^([0-9]+h)?([0-9]+m)?([0-9]+s)?$"
# A character that is not whitespace as ``str.isspace`` (the spec's blank check, which
# strips) counts it: spelled out (``labels.SPACE``), not ``\S``, which ECMA-262 reads
# otherwise, so a name of separators alone would be schema-valid and refused.
_NOT_BLANK = "[^" + SPACE[1:]


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": REF.format(model=name)}


def _given(key: str) -> dict[str, Any]:
    """The object has ``key``, not null."""
    return {"required": [key], "properties": {key: {"not": {"type": "null"}}}}


def _is(key: str, *values: str) -> dict[str, Any]:
    """The object has ``key`` equal to one of ``values``."""
    return {"required": [key], "properties": {key: {"enum": list(values)}}}


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {"anyOf": [schema, {"type": "null"}], "default": None}


def workload_schema(*, max_replicas: int) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """The published ``WorkloadSpec`` schema and the component schemas it refers to."""
    spec = copy.deepcopy(WorkloadSpec.model_json_schema(ref_template=REF))
    defs: dict[str, dict[str, Any]] = spec.pop("$defs", {})
    _fixed(defs["FixedPolicy"], max_replicas=max_replicas)
    _scheduled(defs["ScheduledPolicy"], max_replicas=max_replicas)
    _autoscaling(defs["AutoscalingPolicy"], max_replicas=max_replicas)
    _cloud_pool(defs["CloudPool"])
    defs["PrivateWorkers"]["properties"]["private_worker_ids"]["items"]["description"] = (
        "The id of a worker registered in the workload's project (`autoscaler workers "
        "register`); an unregistered one is refused with 422."
    )
    defs["Backend"]["enum"] = list(BACKENDS)
    _workload(spec)
    return spec, defs


def _fixed(schema: dict[str, Any], *, max_replicas: int) -> None:
    schema["properties"]["replicas"]["maximum"] = max_replicas


def _scheduled(schema: dict[str, Any], *, max_replicas: int) -> None:
    props = schema["properties"]
    props["replicas"]["maximum"] = max_replicas
    props["cron"] = _nullable(
        {
            "type": "string",
            "format": "cron",
            "description": "Five cron fields, e.g. `0 2 * * *` (minute hour day month "
            "weekday; names such as `mon-fri` allowed). Not valid cron: 422.",
        }
    )
    props["window"] = _nullable(
        {
            "type": "string",
            "format": "schedule-window",
            "description": "Days, hours and a time zone, e.g. `Mon-Fri 08:00-20:00 "
            "Europe/Madrid`. Not such a window: 422.",
        }
    )
    props["duration"] = {
        "anyOf": [
            {
                "type": "string",
                "pattern": _DURATION,
                "not": {"pattern": "^[0hms]*$"},
                "description": "Like `1h`, `90m`, `1h30m` or `45s`; more than zero, "
                f"at most {MAX_DURATION_SEC} s (366 days) in all.",
            },
            {
                "type": "integer",
                "minimum": 1,
                "maximum": MAX_DURATION_SEC,
                "description": "Seconds, at most 366 days.",
            },
            {"type": "null"},
        ],
        "default": None,
    }
    props["timezone"] = {
        "type": "string",
        "enum": sorted(available_timezones()),
        "default": "UTC",
    }
    schema["allOf"] = [
        {"oneOf": [_given("cron"), _given("window")]},
        {"if": _given("window"), "then": {"not": _given("duration")}},
    ]


def _autoscaling(schema: dict[str, Any], *, max_replicas: int) -> None:
    props = schema["properties"]
    # The legacy root ``gpu_pool`` is still read (with a deprecation notice), not published.
    props.pop("gpu_pool", None)
    props["min_workers"]["maximum"] = max_replicas
    props["max_workers"]["maximum"] = max_replicas
    props["max_workers"]["description"] = "At least `max(1, min_workers)` (else 422)."
    props["lower_allowed_latency_sec"]["description"] = (
        "Below `upper_allowed_latency_sec` (else 422)."
    )
    private = {
        "required": ["workers"],
        "properties": {"workers": {"type": "object", **_is("source", "private")}},
    }
    schema["allOf"] = [
        {
            "if": private,
            "else": {
                "required": ["max_hourly_cost_usd"],
                "properties": {"max_hourly_cost_usd": {"type": "number"}},
            },
        }
    ]


def _cloud_pool(schema: dict[str, Any]) -> None:
    props = schema["properties"]
    names = sorted({gpu.display_name for gpu in all_gpus()})
    props["gpu_pool"]["items"] = {"type": "string", "enum": names}
    props["allowed_cuda_versions"] = _nullable(
        {
            "type": "array",
            "items": {"type": "string", "enum": list(known_cuda_versions())},
            "description": "CUDA versions the replica's driver must run; some GPU of "
            "`gpu_pool` must run one of them on some provider (else 422).",
        }
    )


def _live_endpoint() -> dict[str, Any]:
    """``endpoint_type`` sync or streaming: a replica at all times, live modalities only."""
    live = sorted(t.value for t in LIVE_ENDPOINT_TYPES)
    jobs_only = sorted(t.value for t in JOB_ONLY_TASK_TYPES)
    at_least_one = {
        "if": _is("execution_policy", ExecutionPolicy.AUTOSCALING.value),
        "then": {
            "required": ["execution_policy_config"],
            "properties": {
                "execution_policy_config": {
                    "type": "object",
                    "required": ["min_workers"],
                    "properties": {"min_workers": {"type": "integer", "minimum": 1}},
                }
            },
        },
        "else": {
            "properties": {
                "execution_policy_config": {
                    "anyOf": [
                        {"type": "null"},
                        {"type": "object", "properties": {"replicas": {"minimum": 1}}},
                    ]
                }
            }
        },
    }
    return {
        "if": _is("endpoint_type", *live),
        "then": {
            "allOf": [
                {"not": _is("task_type", *jobs_only)},
                {"not": _is("execution_policy", ExecutionPolicy.SCHEDULED.value)},
                at_least_one,
            ]
        },
    }


def _workload(spec: dict[str, Any]) -> None:
    props = spec["properties"]
    props["name"]["pattern"] = _NOT_BLANK
    props["model"]["pattern"] = _NOT_BLANK
    props["slug"]["pattern"] = SLUG_RE.pattern
    props["slug"]["description"] = "The path's slug (a different one answers 409)."
    props["vllm_version"] = _nullable(
        {
            "type": "string",
            "pattern": _VERSION,
            "description": "A vLLM release such as `0.11.0`; backend vllm or vllm-omni only.",
        }
    )
    props["command"] = _nullable(
        {
            "type": "string",
            "format": "engine-command",
            "maxLength": MAX_COMMAND,
            "description": "Arguments for the engine's serve command: it must parse as a "
            "shell command line, name no other model than `model`, and give parallel sizes "
            "as whole numbers of at least 1 that a machine of the pool can hold (else 422).",
        }
    )
    props["llm_loras"]["description"] = (
        "LoRA adapters every replica loads at start; backend vllm or sglang only, each "
        "name used once and not the model's, and no adapter flag in `command` (else 422)."
    )
    props["hf_token_secret"] = _nullable(
        {
            "type": "string",
            "pattern": SECRET_NAME_PATTERN,
            "description": "The name of a secret stored in the workload's project (`POST "
            "/v1/projects/{project}/secrets`) holding the Hugging Face token; one not stored "
            "is refused with 422.",
        }
    )
    props["worker_id"] = _nullable(
        {
            "type": "string",
            "description": "A worker registered in the workload's project; an "
            "unregistered one is refused with 422.",
        }
    )
    props["execution_policy_config"] = {
        "anyOf": [
            _ref("FixedPolicy"),
            _ref("ScheduledPolicy"),
            _ref("AutoscalingPolicy"),
            {"type": "null"},
        ],
        "description": "The config of `execution_policy`: a FixedPolicy (or none) for "
        "fixed, a ScheduledPolicy for scheduled, an AutoscalingPolicy for autoscaling "
        "(none only with a `worker_id`: 0 to 1 replica on it).",
    }
    no_config = {
        "anyOf": [
            {"not": {"required": ["execution_policy_config"]}},
            {
                "properties": {
                    "execution_policy_config": {
                        "anyOf": [{"type": "null"}, {"type": "object", "maxProperties": 0}]
                    }
                }
            },
        ]
    }
    config_is = {
        name: {
            "required": ["execution_policy_config"],
            "properties": {"execution_policy_config": _ref(name)},
        }
        for name in ("ScheduledPolicy", "AutoscalingPolicy")
    }
    fixed = {
        "properties": {
            "execution_policy_config": {"anyOf": [_ref("FixedPolicy"), {"type": "null"}]}
        }
    }
    omni = [t.value for t in sorted(OMNI_TASK_TYPES)]
    spec["allOf"] = [
        _live_endpoint(),
        {
            "if": _is("execution_policy", ExecutionPolicy.SCHEDULED.value),
            "then": config_is["ScheduledPolicy"],
            "else": {
                "if": _is("execution_policy", ExecutionPolicy.AUTOSCALING.value),
                "then": {
                    "anyOf": [
                        config_is["AutoscalingPolicy"],
                        {"allOf": [_given("worker_id"), no_config]},
                    ]
                },
                "else": fixed,
            },
        },
        *(
            {
                "if": _given(option),
                "then": {"properties": {"backend": {"not": {"const": Backend.OLLAMA.value}}}},
            }
            for option in ("max_model_len", "custom_chat_template")
        ),
        {
            "if": _given("vllm_version"),
            "then": {
                "properties": {"backend": {"enum": [Backend.VLLM.value, Backend.VLLM_OMNI.value]}}
            },
        },
        {
            "if": _is("task_type", *omni),
            "then": _is("backend", Backend.VLLM_OMNI.value),
        },
        {
            "if": _given("worker_id"),
            "then": {
                "not": {
                    "required": ["execution_policy_config"],
                    "properties": {
                        "execution_policy_config": {
                            "type": "object",
                            "required": ["workers"],
                            "properties": {
                                "workers": {"type": "object", "required": ["cloud_pool"]}
                            },
                        }
                    },
                }
            },
        },
    ]
