"""Schemathesis hooks for ``tests/api/test_fuzz.py`` (loaded with ``SCHEMATHESIS_HOOKS``).

The published workload schema carries every rule of a spec that JSON Schema can express
(:mod:`autoscaler.api.spec_schema`). These hooks cover, for the positive cases of the
workload ``PUT`` only (the cases ``positive_data_acceptance`` judges), the rules it
cannot, and nothing else:

* the formats ``cron``, ``schedule-window`` and ``engine-command`` (the schema names them;
  their grammar is the spec's parsers and the engine's command line): generated from
  valid examples, and a positive case's value that does not parse is replaced by one;
* a scheduled ``duration`` string of at most 366 days in all (a sum of its parts): a
  longer one is replaced by ``1h``;
* ``max_workers`` at least ``min_workers``, the lower latency bound below the upper
  (comparisons between two fields): the bound that breaks it is moved;
* CUDA pins that some GPU of the pool runs (the catalog's driver tables): pins that fit
  no GPU of the pool are dropped;
* a worker registered in the project (the store; the fuzzed projects have none): a
  ``worker_id`` is dropped, private workers become cloud workers with a $/h ceiling;
* a secret stored in the project (the store; the fuzzed projects have none): an
  ``hf_token_secret`` is dropped;
* ``max_model_len`` and ``custom_chat_template`` beside the backend and the command
  (Ollama takes neither; the command must not set the same flag): the field is dropped;
* ``llm_loras`` only with backend ``vllm`` or ``sglang`` (dropped otherwise: a schema
  condition tying ``backend`` to the array makes the generator give up on the body), names
  used once and not the model's (a repeated name is dropped);
* a ``warm_pool`` of at most ``max_workers`` parked replicas, sleeping ones only with
  backend ``vllm`` (a comparison between two fields): the pool is dropped otherwise.

Negative cases, and every other operation, are left as generated.
"""

from __future__ import annotations

from typing import Any

import schemathesis
from hypothesis import strategies as st
from pydantic import ValidationError

from autoscaler.admission import runnable_problems
from autoscaler.spec import (
    LORA_BACKENDS,
    MAX_DURATION_SEC,
    SLEEPING_BACKENDS,
    CloudPool,
    Window,
    WorkloadSpec,
    parse_duration,
    validate_cron,
)
from catalog.sizing import CONTEXT_FLAGS

WORKLOAD = "/v1/projects/{project}/workloads/{slug}"
CRONS = ("0 2 * * *", "*/15 * * * *", "30 8 * * mon-fri")
WINDOWS = ("Mon-Fri 08:00-20:00 Europe/Madrid", "Sat-Sun 00:00-23:59 UTC")
COMMANDS = ("", "--max-model-len 4096", "--dtype auto --max-num-seqs 64")

schemathesis.openapi.format("cron", st.sampled_from(CRONS))
schemathesis.openapi.format("schedule-window", st.sampled_from(WINDOWS))
schemathesis.openapi.format("engine-command", st.sampled_from(COMMANDS))


@schemathesis.hook
def map_case(context: Any, case: Any) -> Any:
    operation = case.operation
    meta = case.meta
    if (
        operation.path != WORKLOAD
        or operation.method.upper() != "PUT"
        or meta is None
        or not meta.generation.mode.is_positive
        or not isinstance(case.body, dict)
    ):
        return case
    case.body = repaired(case.body)
    return case


def repaired(body: dict[str, Any]) -> dict[str, Any]:
    """``body`` with the rules above made to hold (a copy)."""
    body = dict(body)
    policy = body.get("execution_policy")
    config = body.get("execution_policy_config")
    config = dict(config) if isinstance(config, dict) else config
    body.pop("hf_token_secret", None)  # a secret stored in the project: none are
    if body.pop("worker_id", None) is not None and policy == "autoscaling" and not config:
        config = {"max_workers": 1, "max_hourly_cost_usd": 1.0}
    if isinstance(config, dict):
        _policy(config)
        _warm_pool(config, backend=body.get("backend", "vllm"))
        body["execution_policy_config"] = config
    _engine_options(body)
    command = body.get("command")
    if isinstance(command, str):
        try:
            # the slug is the path's when the body has none; any valid one does here
            problems = runnable_problems(WorkloadSpec.model_validate({**body, "slug": "s"}))
        except ValidationError:
            problems = []  # invalid for another reason: positive_data_acceptance says so
        if any(p.path == "command" for p in problems):
            body["command"] = COMMANDS[1]
    return body


def _engine_options(body: dict[str, Any]) -> None:
    command = body.get("command") if isinstance(body.get("command"), str) else ""
    for field, flags in (
        ("max_model_len", CONTEXT_FLAGS),
        ("custom_chat_template", ("--chat-template",)),
    ):
        if body.get(field) is None:
            continue
        if body.get("backend") == "ollama" or any(flag in str(command) for flag in flags):
            body.pop(field)
    loras = body.get("llm_loras")
    if loras and body.get("backend", "vllm") not in LORA_BACKENDS:
        body.pop("llm_loras")
    elif isinstance(loras, list):
        seen = {body.get("model")}
        kept = []
        for adapter in loras:
            name = adapter.get("name") if isinstance(adapter, dict) else None
            if name not in seen:
                kept.append(adapter)
                seen.add(name)
        body["llm_loras"] = kept


def _policy(config: dict[str, Any]) -> None:
    cron, window = config.get("cron"), config.get("window")
    if isinstance(cron, str) and not _parses(validate_cron, cron):
        config["cron"] = CRONS[0]
    if isinstance(window, str) and not _parses(Window.parse, window):
        config["window"] = WINDOWS[0]
    duration = config.get("duration")
    if isinstance(duration, str) and _parses(parse_duration, duration):
        config["duration"] = duration if parse_duration(duration) <= MAX_DURATION_SEC else "1h"
    if "max_workers" not in config:
        return
    low, high = config.get("min_workers", 0), config["max_workers"]
    if isinstance(low, int | float) and isinstance(high, int | float) and high < max(1, low):
        config["max_workers"] = max(1, low)
    lower = config.get("lower_allowed_latency_sec", 0.2)
    upper = config.get("upper_allowed_latency_sec", 1.0)
    if isinstance(lower, int | float) and isinstance(upper, int | float) and lower >= upper:
        config["lower_allowed_latency_sec"] = upper / 2
    workers = config.get("workers")
    if isinstance(workers, dict) and workers.get("source") == "private":
        config["workers"] = None
        if config.get("max_hourly_cost_usd") is None:
            config["max_hourly_cost_usd"] = 1.0
    elif isinstance(workers, dict) and isinstance(workers.get("cloud_pool"), dict):
        pool = dict(workers["cloud_pool"])
        if pool.get("allowed_cuda_versions") and _pins_unrunnable(pool):
            pool["allowed_cuda_versions"] = None
        config["workers"] = {**workers, "cloud_pool": pool}


def _warm_pool(config: dict[str, Any], *, backend: Any) -> None:
    pool = config.get("warm_pool")
    if not isinstance(pool, dict):
        return
    stopped, sleeping = pool.get("stopped", 0), pool.get("sleeping", 0)
    high = config.get("max_workers")
    if not all(isinstance(v, int | float) for v in (stopped, sleeping, high)):
        return
    if stopped + sleeping > high or (sleeping and backend not in SLEEPING_BACKENDS):
        config.pop("warm_pool")


def _pins_unrunnable(pool: dict[str, Any]) -> bool:
    try:
        CloudPool.model_validate(pool)
    except ValidationError as exc:
        return any(e["type"] == "cuda_unsatisfiable" for e in exc.errors())
    return False


def _parses(parse: Any, value: Any) -> bool:
    try:
        parse(value)
    except (ValueError, ValidationError):
        return False
    return True
