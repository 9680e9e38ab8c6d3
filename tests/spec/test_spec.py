"""The workload contract: every rule answers with the field, the value and what is allowed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from autoscaler.spec import (
    AutoscalingPolicy,
    Backend,
    ExecutionPolicy,
    FixedPolicy,
    OnDrift,
    ScheduledPolicy,
    TaskType,
    Window,
    WorkloadDocument,
    WorkloadSpec,
    deprecations,
    describe_errors,
    merge_patch,
    spec_diff,
)

EXAMPLES = sorted(
    path
    for path in (Path(__file__).parents[2] / "examples").glob("*.yaml")
    if not path.name.startswith("config-")  # controller configurations, not workloads
)


def base(**overrides: Any) -> dict[str, Any]:
    return {"name": "Support bot", "slug": "support-bot", "model": "m/x-8B", **overrides}


def autoscaling(**config: Any) -> dict[str, Any]:
    cfg = {"max_workers": 3, "max_hourly_cost_usd": 20.0, **config}
    return base(execution_policy="autoscaling", execution_policy_config=cfg)


def errors_of(raw: dict[str, Any]) -> list[dict[str, Any]]:
    with pytest.raises(ValidationError) as info:
        WorkloadSpec.model_validate(raw)
    return describe_errors(info.value)


def only_error(raw: dict[str, Any]) -> dict[str, Any]:
    errors = errors_of(raw)
    assert len(errors) == 1, errors
    return errors[0]


# -- enums and defaults ------------------------------------------------------------------------


def test_defaults_are_fixed_one_replica_text2text_on_vllm() -> None:
    spec = WorkloadSpec.model_validate(base())
    assert spec.backend is Backend.VLLM
    assert spec.task_type is TaskType.TEXT2TEXT
    assert spec.execution_policy is ExecutionPolicy.FIXED
    assert spec.execution_policy_config == FixedPolicy(replicas=1)


def test_backend_members_answer_to_both_spellings() -> None:
    assert Backend["VLLM"] is Backend["Vllm"]
    assert Backend["VLLM_OMNI"] is Backend["VllmOmni"]
    assert Backend("vllm-omni") is Backend.VllmOmni
    assert [b.value for b in Backend] == ["vllm", "sglang", "ollama", "vllm-omni"]


def test_twelve_task_types_and_three_drift_modes() -> None:
    assert len(TaskType) == 12
    assert {d.value for d in OnDrift} == {"reconcile", "fail", "ignore"}


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_example_is_a_valid_workload(path: Path) -> None:
    docs = list(yaml.safe_load_all(path.read_text()))
    for doc in docs:
        WorkloadDocument.model_validate(doc)


def test_examples_cover_every_modality_and_policy() -> None:
    docs = [yaml.safe_load(p.read_text()) for p in EXAMPLES]
    assert {d.get("task_type", "text2text") for d in docs} == {t.value for t in TaskType}
    configs = [d.get("execution_policy_config", {}) for d in docs]
    assert any("cron" in c for c in configs)
    assert any("window" in c for c in configs)
    assert any(c.get("workers", {}).get("source") == "private" for c in configs)
    assert any(
        c.get("workers", {}).get("cloud_pool", {}).get("allowed_cuda_versions") for c in configs
    )


# -- slug, name ----------------------------------------------------------------------------------


@pytest.mark.parametrize("slug", ["Support-Bot", "-bot", "bot-", "bot_1", "a" * 64, "", "bot.x"])
def test_slug_must_be_a_lowercase_dns_label(slug: str) -> None:
    error = only_error(base(slug=slug))
    assert error["path"] == "slug"
    assert error["value"] == slug
    assert "lowercase DNS label" in error["message"]


@pytest.mark.parametrize("slug", ["a", "support-bot", "x1-2-3", "a" * 63])
def test_good_slugs_pass(slug: str) -> None:
    assert WorkloadSpec.model_validate(base(slug=slug)).slug == slug


@pytest.mark.parametrize("field", ["name", "model"])
def test_name_and_model_must_not_be_blank(field: str) -> None:
    assert only_error(base(**{field: "  "}))["path"] == field


# -- unknown keys ----------------------------------------------------------------------------------


def test_unknown_top_level_key_is_refused_with_a_suggestion() -> None:
    error = only_error(base(modle="x"))
    assert "unknown field 'modle'" in error["message"]
    assert "did you mean 'model'" in error["message"]


@pytest.mark.parametrize(
    ("wrong", "right"), [("min_replicas", "min_workers"), ("max_replicas", "max_workers")]
)
def test_replica_names_point_to_workers(wrong: str, right: str) -> None:
    error = only_error(autoscaling(**{wrong: 1}))
    assert error["path"] == "execution_policy_config"
    assert f"unknown field '{wrong}'" in error["message"]
    assert f"did you mean '{right}'" in error["message"]


def test_unknown_key_deep_in_the_pool_is_refused() -> None:
    raw = autoscaling(workers={"cloud_pool": {"gpu_pool": ["NVIDIA L4"], "max_instance": 2}})
    error = only_error(raw)
    assert error["path"] == "execution_policy_config.workers.cloud_pool"
    assert "did you mean 'max_instances'" in error["message"]


# -- fixed -----------------------------------------------------------------------------------------


def test_fixed_replicas_must_be_a_non_negative_integer() -> None:
    error = only_error(base(execution_policy_config={"replicas": -1}))
    assert error["path"] == "execution_policy_config.replicas"
    assert error["value"] == -1
    assert "greater than or equal to 0" in error["message"]
    assert only_error(base(execution_policy_config={"replicas": 1.5}))["value"] == 1.5


def test_fixed_zero_replicas_is_allowed() -> None:
    spec = WorkloadSpec.model_validate(base(execution_policy_config={"replicas": 0}))
    assert spec.execution_policy_config == FixedPolicy(replicas=0)


def test_a_config_of_another_policy_is_refused() -> None:
    error = only_error(base(execution_policy_config={"cron": "0 2 * * *"}))
    assert "unknown field 'cron'" in error["message"]


# -- scheduled ---------------------------------------------------------------------------------


def scheduled(**config: Any) -> dict[str, Any]:
    return base(execution_policy="scheduled", execution_policy_config=config)


def test_scheduled_needs_exactly_one_of_cron_or_window() -> None:
    assert "exactly one" in only_error(scheduled())["message"]
    both = scheduled(cron="0 2 * * *", window="Daily 08:00-09:00")
    assert "exactly one" in only_error(both)["message"]


def test_cron_defaults_one_replica_for_one_hour() -> None:
    spec = WorkloadSpec.model_validate(scheduled(cron="0 2 * * *"))
    config = spec.execution_policy_config
    assert isinstance(config, ScheduledPolicy)
    assert (config.replicas, config.duration_sec) == (1, 3600)


@pytest.mark.parametrize(
    ("cron", "needle"),
    [("0 2 * *", "five are needed"), ("61 2 * * *", "not valid"), ("0 2 * * mon-xyz", "not valid")],
)
def test_bad_cron_is_refused(cron: str, needle: str) -> None:
    error = only_error(scheduled(cron=cron))
    assert error["path"] == "execution_policy_config.cron"
    assert needle in error["message"]


@pytest.mark.parametrize(
    ("duration", "seconds"), [("90m", 5400), ("1h30m", 5400), ("45s", 45), (600, 600)]
)
def test_durations(duration: str | int, seconds: int) -> None:
    config = WorkloadSpec.model_validate(scheduled(cron="0 2 * * *", duration=duration))
    assert isinstance(config.execution_policy_config, ScheduledPolicy)
    assert config.execution_policy_config.duration_sec == seconds


@pytest.mark.parametrize("duration", ["0m", "soon", "", -5])
def test_bad_durations_are_refused(duration: str | int) -> None:
    error = only_error(scheduled(cron="0 2 * * *", duration=duration))
    assert error["path"] == "execution_policy_config.duration"


def test_window_grammar() -> None:
    w = Window.parse("Mon-Fri 08:00-20:00 Europe/Madrid")
    assert (w.days, w.start.hour, w.end.hour, w.tz) == (frozenset(range(5)), 8, 20, "Europe/Madrid")
    assert Window.parse("Daily 22:00-06:00").tz == "UTC"
    assert Window.parse("Mon,Wed,Fri 09:00-10:00").days == frozenset({0, 2, 4})
    assert Window.parse("Fri-Mon 09:00-10:00").days == frozenset({4, 5, 6, 0})
    assert Window.parse("Sat 00:00-24:00").end.hour == 0


@pytest.mark.parametrize(
    ("window", "needle"),
    [
        ("Mon-Fri 08:00-20:00 Europe/Madird", "did you mean 'Europe/Madrid'"),
        ("Mon-Fry 08:00-20:00", "Mon..Sun"),
        ("Mon-Fri 8-20", "HH:MM"),
        ("Mon-Fri 25:00-26:00", "not HH:MM"),
        ("Mon-Fri 08:00-08:00", "empty"),
        ("whenever", "not like"),
    ],
)
def test_bad_windows_are_refused(window: str, needle: str) -> None:
    error = only_error(scheduled(window=window))
    assert error["path"] == "execution_policy_config.window"
    assert error["value"] == window
    assert needle in error["message"]


DAYS = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"]


@given(
    first=st.sampled_from(DAYS),
    last=st.sampled_from(DAYS),
    start=st.tuples(st.integers(0, 23), st.integers(0, 59)),
    end=st.tuples(st.integers(0, 23), st.integers(0, 59)),
    tz=st.sampled_from(["UTC", "Europe/Madrid", "America/New_York", "Asia/Tokyo"]),
)
def test_any_well_formed_window_parses_to_what_it_says(
    first: str, last: str, start: tuple[int, int], end: tuple[int, int], tz: str
) -> None:
    text = f"{first}-{last} {start[0]:02d}:{start[1]:02d}-{end[0]:02d}:{end[1]:02d} {tz}"
    if start == end:
        with pytest.raises(ValueError, match="empty"):
            Window.parse(text)
        return
    w = Window.parse(text)
    a, b = DAYS.index(first), DAYS.index(last)
    assert len(w.days) == (b - a) % 7 + 1
    assert a in w.days and b in w.days
    assert (w.start.hour, w.start.minute, w.end.hour, w.end.minute) == (*start, *end)
    assert w.tz == tz


@given(
    minute=st.integers(0, 59),
    hour=st.integers(0, 23),
    dow=st.sampled_from(["*", "mon-fri", "0", "6", "1,3,5"]),
)
def test_any_valid_five_field_cron_is_accepted(minute: int, hour: int, dow: str) -> None:
    spec = WorkloadSpec.model_validate(scheduled(cron=f"{minute} {hour} * * {dow}"))
    assert isinstance(spec.execution_policy_config, ScheduledPolicy)


@given(minute=st.integers(60, 500))
def test_any_out_of_range_minute_is_refused(minute: int) -> None:
    assert only_error(scheduled(cron=f"{minute} 2 * * *"))["path"] == "execution_policy_config.cron"


# -- autoscaling ----------------------------------------------------------------------------------


def test_cloud_autoscaling_needs_a_positive_ceiling() -> None:
    raw = base(execution_policy="autoscaling", execution_policy_config={"max_workers": 2})
    assert "max_hourly_cost_usd is required" in only_error(raw)["message"]
    error = only_error(autoscaling(max_hourly_cost_usd=0))
    assert error["path"] == "execution_policy_config.max_hourly_cost_usd"
    assert "greater than 0" in error["message"]


def test_worker_bounds() -> None:
    assert (
        "max_workers (1) must be at least"
        in only_error(autoscaling(min_workers=2, max_workers=1))["message"]
    )
    assert only_error(autoscaling(min_workers=-1))["path"] == "execution_policy_config.min_workers"
    assert only_error(autoscaling(max_workers=0))["path"] == "execution_policy_config.max_workers"


def test_pool_must_not_be_empty_and_its_limits_positive() -> None:
    for pool, path in [
        ({"gpu_pool": []}, "gpu_pool"),
        ({"gpu_pool": ["NVIDIA L4"], "max_hourly_cost_usd": -1}, "max_hourly_cost_usd"),
        ({"gpu_pool": ["NVIDIA L4"], "max_instances": 0}, "max_instances"),
        ({"gpu_pool": ["NVIDIA L4"], "allowed_cuda_versions": ["12"]}, "allowed_cuda_versions"),
    ]:
        error = only_error(autoscaling(workers={"source": "cloud", "cloud_pool": pool}))
        assert error["path"] == f"execution_policy_config.workers.cloud_pool.{path}", error


def test_pool_names_are_checked_against_the_catalog_and_canonicalised() -> None:
    spec = WorkloadSpec.model_validate(
        autoscaling(workers={"cloud_pool": {"gpu_pool": ["a100-80gb", "NVIDIA L4", "nvidia-l4"]}})
    )
    config = spec.execution_policy_config
    assert isinstance(config, AutoscalingPolicy) and config.cloud_pool is not None
    assert config.cloud_pool.gpu_pool == ["NVIDIA A100-SXM4-80GB", "NVIDIA L4"]
    error = only_error(autoscaling(workers={"cloud_pool": {"gpu_pool": ["NVIDIA A100-SXM4-80G"]}}))
    assert error["path"] == "execution_policy_config.workers.cloud_pool.gpu_pool"
    assert "NVIDIA A100-SXM4-80GB" in error["message"]


def test_legacy_flat_pool_is_accepted_with_a_deprecation_notice() -> None:
    raw = autoscaling(gpu_pool=["NVIDIA L4"])
    spec = WorkloadSpec.model_validate(raw)
    config = spec.execution_policy_config
    assert isinstance(config, AutoscalingPolicy) and config.cloud_pool is not None
    assert config.cloud_pool.gpu_pool == ["NVIDIA L4"]
    assert "gpu_pool" not in spec.canonical()["execution_policy_config"]
    assert deprecations(raw) and "deprecated" in deprecations(raw)[0]
    assert deprecations(autoscaling(workers={"cloud_pool": {"gpu_pool": ["NVIDIA L4"]}})) == []


def test_legacy_flat_pool_cannot_carry_cuda_pins() -> None:
    raw = autoscaling(
        gpu_pool=["NVIDIA L4"], workers={"cloud_pool": {"allowed_cuda_versions": ["12.4"]}}
    )
    assert "cannot carry CUDA pins" in only_error(raw)["message"]
    raw = autoscaling(gpu_pool=["NVIDIA L4"], allowed_cuda_versions=["12.4"])
    assert "cannot carry CUDA pins" in only_error(raw)["message"]


def test_private_workers_need_ids_and_no_ceiling() -> None:
    raw = base(
        execution_policy="autoscaling",
        execution_policy_config={
            "max_workers": 2,
            "workers": {"source": "private", "private_worker_ids": ["wrk_1"]},
        },
    )
    config = WorkloadSpec.model_validate(raw).execution_policy_config
    assert isinstance(config, AutoscalingPolicy)
    assert config.private_worker_ids == ["wrk_1"]
    raw["execution_policy_config"]["workers"]["private_worker_ids"] = []
    assert only_error(raw)["path"] == "execution_policy_config.workers.private_worker_ids"


def test_tuning_defaults() -> None:
    config = WorkloadSpec.model_validate(autoscaling()).execution_policy_config
    assert isinstance(config, AutoscalingPolicy)
    assert config.autoscaling_strategy == "ttft_latency_sec"
    assert (config.upper_allowed_latency_sec, config.lower_allowed_latency_sec) == (1.0, 0.2)
    assert config.ttft_percentile == 0.95
    assert config.allow_spot_instances is False


def test_latency_band_must_be_ordered() -> None:
    error = only_error(autoscaling(lower_allowed_latency_sec=2.0))
    assert "must be below upper_allowed_latency_sec" in error["message"]


# -- cross-field rules ----------------------------------------------------------------------------


def test_vllm_version_only_with_vllm_engines() -> None:
    error = only_error(base(backend="sglang", vllm_version="0.11.0"))
    assert "applies only to backend vllm or vllm-omni" in error["message"]
    WorkloadSpec.model_validate(base(backend="vllm-omni", vllm_version="0.11.0"))


@pytest.mark.parametrize("task", ["text2image", "audio2text", "text2video", "image2image"])
def test_image_and_audio_tasks_only_on_vllm_omni(task: str) -> None:
    error = only_error(base(task_type=task))
    assert "served only by backend 'vllm-omni'" in error["message"]
    WorkloadSpec.model_validate(base(task_type=task, backend="vllm-omni"))


def test_worker_pin_conflicts_with_a_cloud_pool() -> None:
    raw = autoscaling(workers={"cloud_pool": {"gpu_pool": ["NVIDIA L4"]}})
    raw["worker_id"] = "wrk_1"
    assert "conflicts with workers.cloud_pool" in only_error(raw)["message"]


def test_bad_enum_values_list_the_allowed_ones() -> None:
    error = only_error(base(backend="tgi"))
    assert error["path"] == "backend"
    assert error["message"].endswith("allowed: vllm, sglang, ollama, vllm-omni")
    assert error["message"].count("sglang") == 1


# -- identity and diff -------------------------------------------------------------------------


def test_hash_ignores_how_defaults_were_written() -> None:
    a = WorkloadSpec.model_validate(base())
    b = WorkloadSpec.model_validate(base(backend="vllm", execution_policy_config={"replicas": 1}))
    assert a.spec_hash() == b.spec_hash()
    c = WorkloadSpec.model_validate(base(execution_policy_config={"replicas": 2}))
    assert a.spec_hash() != c.spec_hash()


def test_diff_names_changed_fields_by_dotted_path() -> None:
    a = WorkloadSpec.model_validate(base()).canonical()
    b = WorkloadSpec.model_validate(
        base(model="m/y", execution_policy_config={"replicas": 3})
    ).canonical()
    assert spec_diff(a, b) == [
        {"path": "execution_policy_config.replicas", "old": 1, "new": 3},
        {"path": "model", "old": "m/x-8B", "new": "m/y"},
    ]


def test_workload_document_carries_on_drift() -> None:
    doc = WorkloadDocument.model_validate({**base(), "on_drift": "fail"})
    assert doc.on_drift is OnDrift.FAIL
    assert doc.spec() == WorkloadSpec.model_validate(base())


@pytest.mark.parametrize(
    ("target", "patch", "result"),
    [  # from RFC 7396, appendix A
        ({"a": "b"}, {"a": "c"}, {"a": "c"}),
        ({"a": "b"}, {"b": "c"}, {"a": "b", "b": "c"}),
        ({"a": "b"}, {"a": None}, {}),
        ({"a": "b", "b": "c"}, {"a": None}, {"b": "c"}),
        ({"a": ["b"]}, {"a": "c"}, {"a": "c"}),
        ({"a": "c"}, {"a": ["b"]}, {"a": ["b"]}),
        ({"a": {"b": "c"}}, {"a": {"b": "d", "c": None}}, {"a": {"b": "d"}}),
        ({"a": [{"b": "c"}]}, {"a": [1]}, {"a": [1]}),
        ({"e": None}, {"a": 1}, {"e": None, "a": 1}),
        ({}, {"a": {"bb": {"ccc": None}}}, {"a": {"bb": {}}}),
    ],
)
def test_merge_patch_follows_rfc_7396(
    target: dict[str, Any], patch: dict[str, Any], result: dict[str, Any]
) -> None:
    assert merge_patch(target, patch) == result


def test_bounds_added_for_apply_do_not_stop_a_spec_stored_before_them() -> None:
    """The bounds against one large value are checked when a spec is applied; a spec
    stored before they existed (a 300-character name, a 115-day scale-to-zero timeout,
    a 5 s boot deadline, a cron no date matches) still reads back, so the controller keeps
    stepping its replicas, and is refused only when it is applied again."""
    from autoscaler.spec import APPLY

    stored: dict[str, object] = {
        "name": "n" * 300,
        "slug": "old",
        "model": "meta-llama/Llama-3.1-8B-Instruct",
        "execution_policy": "autoscaling",
        "execution_policy_config": {
            "max_workers": 2,
            "max_hourly_cost_usd": 5,
            "scale_to_zero_timeout_sec": 1e7,
            "scaling_up_timeout_sec": 5,
        },
    }
    spec = WorkloadSpec.model_validate(stored)
    assert spec.name == "n" * 300
    with pytest.raises(ValidationError) as caught:
        WorkloadSpec.model_validate(stored, context={APPLY: True})
    paths = {".".join(map(str, e["loc"])) for e in caught.value.errors()}
    assert paths == {
        "name",
        "execution_policy_config.scale_to_zero_timeout_sec",
        "execution_policy_config.scaling_up_timeout_sec",
    }
    never = {**stored, "name": "n", "execution_policy": "scheduled"}
    never["execution_policy_config"] = {"cron": "0 0 31 2 *", "replicas": 1}
    assert WorkloadSpec.model_validate(never).execution_policy_config is not None
    with pytest.raises(ValidationError, match="never fires"):
        WorkloadSpec.model_validate(never, context={APPLY: True})
