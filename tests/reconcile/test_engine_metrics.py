"""Reading the engines' own metrics: bucket increases become first-token samples, a
restarted engine counts from zero, and the TTFT rule reads the worse of the two views."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from autoscaler.decide.scaling import measured_ttft
from autoscaler.decide.signals import Signals, with_engine_ttft
from autoscaler.reconcile.engine_metrics import new_samples, parse_engine_metrics

HEAD = """# HELP vllm:time_to_first_token_seconds Histogram of time to first token in seconds.
# TYPE vllm:time_to_first_token_seconds histogram
"""


def _vllm_text(counts: dict[str, float], *, waiting: int = 0, running: int = 0) -> str:
    """vLLM's exposition for one engine: cumulative TTFT buckets and the two gauges."""
    lines = [HEAD]
    for le, count in counts.items():
        lines.append(
            f'vllm:time_to_first_token_seconds_bucket{{engine="0",le="{le}",model_name="m"}} '
            f"{count}\n"
        )
    total = max(counts.values())
    lines.append(f'vllm:time_to_first_token_seconds_count{{engine="0",model_name="m"}} {total}\n')
    lines.append('vllm:time_to_first_token_seconds_sum{engine="0",model_name="m"} 1.0\n')
    lines.append("# TYPE vllm:num_requests_waiting gauge\n")
    lines.append(f'vllm:num_requests_waiting{{engine="0",model_name="m"}} {waiting}\n')
    lines.append("# TYPE vllm:num_requests_running gauge\n")
    lines.append(f'vllm:num_requests_running{{engine="0",model_name="m"}} {running}\n')
    lines.append("# TYPE vllm:kv_cache_usage_perc gauge\n")
    lines.append('vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.25\n')
    return "".join(lines)


def test_bucket_increases_between_scrapes_become_samples_at_the_bucket_bounds() -> None:
    before = parse_engine_metrics(_vllm_text({"0.1": 2, "1.0": 3, "+Inf": 3}))
    after = parse_engine_metrics(_vllm_text({"0.1": 5, "1.0": 7, "+Inf": 8}, waiting=2, running=4))
    samples = new_samples(before, after, at=100.0)
    # 3 new requests under 0.1 s, 1 between 0.1 and 1 s, 1 past the last bound.
    assert sorted(v for _, v in samples) == [0.1, 0.1, 0.1, 1.0, 2.0]
    assert all(at == 100.0 for at, _ in samples)
    assert (after.waiting, after.running, after.kv_cache_usage) == (2, 4, 0.25)


def test_a_restarted_engine_counts_from_zero_and_no_change_adds_nothing() -> None:
    busy = parse_engine_metrics(_vllm_text({"0.1": 40, "+Inf": 50}))
    restarted = parse_engine_metrics(_vllm_text({"0.1": 1, "+Inf": 1}))
    assert [v for _, v in new_samples(busy, restarted, at=1.0)] == [0.1]
    assert new_samples(restarted, restarted, at=2.0) == []
    assert len(new_samples(None, busy, at=3.0)) == 50  # first sight: all of it is new


def test_sglang_names_are_read_too() -> None:
    text = (
        "# TYPE sglang:time_to_first_token_seconds histogram\n"
        'sglang:time_to_first_token_seconds_bucket{le="0.5"} 3\n'
        'sglang:time_to_first_token_seconds_bucket{le="+Inf"} 3\n'
        "sglang:time_to_first_token_seconds_count 3\n"
        "sglang:time_to_first_token_seconds_sum 0.9\n"
        "# TYPE sglang:num_queue_reqs gauge\nsglang:num_queue_reqs 7\n"
        "# TYPE sglang:num_running_reqs gauge\nsglang:num_running_reqs 2\n"
    )
    reading = parse_engine_metrics(text)
    assert (reading.waiting, reading.running) == (7, 2)
    assert [v for _, v in new_samples(None, reading, at=0.0)] == [0.5, 0.5, 0.5]


def test_the_ttft_rule_reads_the_worse_of_gateway_and_engines() -> None:
    now = datetime(2026, 11, 30, tzinfo=UTC)
    since = now - timedelta(seconds=60)
    recent = now - timedelta(seconds=1)
    gateway_only = Signals(ttft_samples=((recent, 0.3),))
    assert measured_ttft(gateway_only, q=0.95, since=since) == 0.3
    both = with_engine_ttft(gateway_only, [(recent.timestamp(), 2.5)])
    assert measured_ttft(both, q=0.95, since=since) == 2.5
    engines_only = with_engine_ttft(Signals(), [(recent.timestamp(), 0.05)])
    assert measured_ttft(engines_only, q=0.95, since=since) == 0.05
    assert measured_ttft(Signals(), q=0.95, since=since) is None


def test_unstreamed_answers_count_as_requests_but_not_as_ttft() -> None:
    from autoscaler.decide.queueing import recent_rate

    now = datetime(2026, 11, 30, tzinfo=UTC)
    recent = now - timedelta(seconds=5)
    signals = Signals(unstreamed_samples=tuple((recent, 3.0) for _ in range(30)))
    assert measured_ttft(signals, q=0.95, since=now - timedelta(seconds=60)) is None
    assert recent_rate(signals, now=now) == 30 / 60
