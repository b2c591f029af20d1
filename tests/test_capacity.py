"""The engine-load signal: vLLM's and SGLang's /metrics read by one parser."""

from __future__ import annotations

from pathlib import Path

import pytest

from tierq.config import Config, ConfigError, load_config
from tierq.capacity import EngineLoad, metrics_url_for, overload_backoff_s, parse_engine_load

# The shape of a vLLM v1 (0.10+) /metrics page: one series per engine core,
# labelled with the served model's name, HELP/TYPE lines, float values.
VLLM_V1 = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 7.0
vllm:num_requests_running{engine="1",model_name="meta-llama/Llama-3.1-8B-Instruct"} 5.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 3.0
vllm:num_requests_waiting{engine="1",model_name="meta-llama/Llama-3.1-8B-Instruct"} 0.0
# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 0.62
vllm:kv_cache_usage_perc{engine="1",model_name="meta-llama/Llama-3.1-8B-Instruct"} 0.41
# HELP vllm:request_success_total Count of successfully processed requests.
# TYPE vllm:request_success_total counter
vllm:request_success_total{engine="0",finished_reason="stop",model_name="meta-llama/Llama-3.1-8B-Instruct"} 1234.0
"""

# vLLM before v1: no engine label, gpu_cache_usage_perc.
VLLM_V0 = """\
vllm:num_requests_running{model_name="m"} 4.0
vllm:num_requests_swapped{model_name="m"} 0.0
vllm:num_requests_waiting{model_name="m"} 0.0
vllm:gpu_cache_usage_perc{model_name="m"} 0.25
"""

SGLANG = """\
# HELP sglang:num_running_reqs The number of running requests.
# TYPE sglang:num_running_reqs gauge
sglang:num_running_reqs{model_name="Qwen/Qwen2-7B"} 16.0
# HELP sglang:num_queue_reqs The number of requests in the waiting queue.
# TYPE sglang:num_queue_reqs gauge
sglang:num_queue_reqs{model_name="Qwen/Qwen2-7B"} 9.0
sglang:token_usage{model_name="Qwen/Qwen2-7B"} 0.93
"""


def test_vllm_v1_counts_add_up_over_engine_cores_and_kv_usage_is_the_highest() -> None:
    assert parse_engine_load(VLLM_V1) == EngineLoad(running=12, waiting=3, kv_usage=0.62)


def test_vllm_v0_names_are_read_too() -> None:
    assert parse_engine_load(VLLM_V0) == EngineLoad(running=4, waiting=0, kv_usage=0.25)


def test_sglang_names_are_read() -> None:
    assert parse_engine_load(SGLANG) == EngineLoad(running=16, waiting=9, kv_usage=0.93)


def test_a_model_label_selects_its_series_when_the_engine_serves_several() -> None:
    text = ('vllm:num_requests_running{model_name="a"} 2\n'
            'vllm:num_requests_waiting{model_name="a"} 1\n'
            'vllm:num_requests_running{model_name="b"} 6\n'
            'vllm:num_requests_waiting{model_name="b"} 0\n')
    assert parse_engine_load(text, "a") == EngineLoad(2, 1, None)
    assert parse_engine_load(text, "b") == EngineLoad(6, 0, None)
    # A name no series carries: the engine is taken as a whole.
    assert parse_engine_load(text, "served-under-another-name") == EngineLoad(8, 1, None)


def test_label_values_with_escapes_braces_and_spaces_do_not_confuse_the_parser() -> None:
    text = ('vllm:num_requests_running{model_name="we\\"ird} name, x=1"} 3 1700000000000\n'
            'vllm:num_requests_waiting{model_name="we\\"ird} name, x=1"} 2\n')
    assert parse_engine_load(text, 'we"ird} name, x=1') == EngineLoad(3, 2, None)


@pytest.mark.parametrize("text", [
    "",
    "<html>404 Not Found</html>",
    "vllm:num_requests_running 3\n",  # no waiting count: not enough to act on
    "vllm:num_requests_running{model_name=\"m\"} NaN\nvllm:num_requests_waiting 1\n",
    "process_cpu_seconds_total 12.5\n",
])
def test_pages_without_load_metrics_give_none(text: str) -> None:
    assert parse_engine_load(text) is None


def test_garbage_lines_are_skipped_not_fatal() -> None:
    text = ("vllm:num_requests_running{model_name=\"m\" 4\n"  # unclosed brace
            "vllm:num_requests_running{model_name=\"m\"} four\n"
            "vllm:num_requests_running{model_name=\"m\"} 1\n"
            "vllm:num_requests_waiting{model_name=\"m\"} 0\n")
    assert parse_engine_load(text) == EngineLoad(1, 0, None)


@pytest.mark.parametrize("base, url", [
    ("http://10.0.0.5:8000/v1", "http://10.0.0.5:8000/metrics"),
    ("http://engine:30000/v1/", "http://engine:30000/metrics"),
    ("https://gw.example/prefix/v1", "https://gw.example/prefix/metrics"),
    ("http://engine:8000", "http://engine:8000/metrics"),
])
def test_metrics_url_is_derived_from_the_api_base(base: str, url: str) -> None:
    assert metrics_url_for(base) == url


@pytest.mark.parametrize("headers, remaining, wait", [
    ({"retry-after-ms": "250"}, 10.0, 0.25),
    ({"retry-after": "2"}, 10.0, 2.0),
    ({"retry-after-ms": "40", "retry-after": "3"}, 10.0, 0.04),  # the exact one wins
    ({"retry-after": "5"}, 1.0, None),  # the upstream's own wait is past the max wait left
    ({"retry-after": "1"}, 1.0, None),
    ({"retry-after-ms": "900"}, 1.0, 0.9),
])
def test_an_upstream_overload_is_retried_after_its_own_hint_when_shorter_than_the_wait_left(
        headers: dict[str, str], remaining: float, wait: float | None) -> None:
    for attempt in (1, 2, 7):
        got = overload_backoff_s(headers, attempt, remaining)
        assert got == (pytest.approx(wait) if wait else None), attempt


@pytest.mark.parametrize("headers", [
    {}, {"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"},  # a date: no hint
    {"retry-after": "-1"}, {"retry-after": "nan"}, {"retry-after-ms": "0"},
])
def test_without_a_hint_the_back_off_doubles_per_answer_jittered_and_capped(
        headers: dict[str, str]) -> None:
    def backoff(attempt: int, draw: float, remaining: float = 60.0) -> float | None:
        return overload_backoff_s(headers, attempt, remaining, jitter=lambda: draw)

    # 0.1 s doubled per answer up to 1 s, times a draw in [0.5, 1).
    assert [backoff(n, 0.0) for n in (1, 2, 3, 4, 5, 40)] == pytest.approx(
        [0.05, 0.1, 0.2, 0.4, 0.5, 0.5])
    assert [backoff(n, 0.999) for n in (1, 4, 5)] == pytest.approx([0.09995, 0.7996, 0.9995])
    # The last try lands within the wait left; nothing left, no try.
    assert backoff(3, 0.5, remaining=0.12) == pytest.approx(0.12)
    assert backoff(1, 0.5, remaining=0.0) is None
    assert backoff(1, 0.5, remaining=-0.5) is None


def _config(tmp_path: Path, upstream: str) -> Config:
    p = tmp_path / "tierq.toml"
    p.write_text('[[upstreams]]\nname = "e"\n' + upstream)
    return load_config(p)


def test_metrics_url_and_interval_are_read_and_default_to_derived_and_100_ms(tmp_path: Path) -> None:
    u = _config(tmp_path, 'base_url = "http://127.0.0.1:8000/v1"\nkind = "vllm"\n').upstreams[0]
    assert (u.metrics, u.metrics_url, u.metrics_interval_ms) == (True, None, 100.0)
    u = _config(tmp_path, 'base_url = "http://127.0.0.1:8000/v1"\nkind = "vllm"\n'
                          'metrics_url = "http://127.0.0.1:8001/metrics/"\n'
                          'metrics_interval_ms = 250\n').upstreams[0]
    assert (u.metrics_url, u.metrics_interval_ms) == ("http://127.0.0.1:8001/metrics", 250.0)
    u = _config(tmp_path, 'base_url = "http://127.0.0.1:8000/v1"\nkind = "vllm"\n'
                          'metrics = false\n').upstreams[0]
    assert u.metrics is False


@pytest.mark.parametrize("upstream, expected", [
    ('base_url = "http://x/v1"\nmetrics_url = "ftp://x/metrics"\n',
     'upstreams[0].metrics_url: expected an http:// or https:// URL with a host, got "ftp://x/metrics"'),
    ('base_url = "http://x/v1"\nmetrics_url = "http://u:p@x/metrics"\n',
     "upstreams[0].metrics_url: must not carry credentials (use api_key_env)"),
    ('base_url = "http://x/v1"\nmetrics_interval_ms = 1\n',
     "upstreams[0].metrics_interval_ms: must be at least 10 and at most 60000, got 1"),
    ('kind = "sim"\nmetrics_url = "http://x/metrics"\n',
     'upstreams[0].metrics_url: not allowed for kind "sim" (its own /metrics is read)'),
])
def test_bad_metrics_settings_are_one_line_config_errors(tmp_path: Path, upstream: str,
                                                         expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        _config(tmp_path, upstream)
    assert str(info.value).split(": ", 1)[1] == expected


def test_an_engines_prefix_cache_counters_are_read_summed_over_its_series() -> None:
    from tierq.capacity import _samples, prefix_cache_of

    v1 = """
# TYPE vllm:prefix_cache_queries_total counter
vllm:prefix_cache_queries_total{engine="0",model_name="m"} 1200.0
vllm:prefix_cache_queries_total{engine="1",model_name="m"} 800.0
vllm:prefix_cache_hits_total{engine="0",model_name="m"} 900.0
vllm:prefix_cache_hits_total{engine="1",model_name="m"} 100.0
vllm:num_requests_running{model_name="m"} 1
"""
    assert prefix_cache_of(list(_samples(v1))) == (2000, 1000)
    old = "vllm:gpu_prefix_cache_queries_total 10\nvllm:gpu_prefix_cache_hits_total 4\n"
    assert prefix_cache_of(list(_samples(old))) == (10, 4)
    # Half a pair, or none: no figure (a hit rate needs both).
    assert prefix_cache_of(list(_samples("vllm:prefix_cache_hits_total 3\n"))) is None
    assert prefix_cache_of(list(_samples(v1.replace("prefix_cache", "other")))) is None
    # Never a load signal: the load read from the page is unchanged by them.
    assert parse_engine_load(v1 + "vllm:num_requests_waiting 0\n") == EngineLoad(1, 0, None)
