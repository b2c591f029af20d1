"""Request rewriting per upstream kind: the applied tier in each engine's terms."""

from __future__ import annotations

from typing import Any

import pytest

from tierq.upstream import rewrite_request


def rewrite(kind: str, tier: str, scheduling: bool = True, endpoint: str = "chat/completions",
            **body: Any) -> dict[str, Any]:
    b: dict[str, Any] = {"model": "public/name", "messages": [], "service_tier": "fast",
                         "priority": -99, **body}
    rewrite_request(b, kind=kind, priority_scheduling=scheduling, applied_tier=tier,
                    endpoint=endpoint, upstream_model="engine-name")
    return b


@pytest.mark.parametrize(("kind", "priority", "default"), [
    ("vllm", -10, 0), ("sim", -10, 0), ("sglang", 10, 0), ("trtllm", 1.0, 0.5)])
def test_engines_get_the_tier_as_their_own_priority_field_and_no_service_tier(
    kind: str, priority: float, default: float
) -> None:
    assert rewrite(kind, "priority")["priority"] == priority
    assert rewrite(kind, "default")["priority"] == default
    assert "service_tier" not in rewrite(kind, "priority")


def test_without_priority_scheduling_neither_field_is_forwarded() -> None:
    for kind in ("openai", "vllm", "sglang", "trtllm"):
        b = rewrite(kind, "priority", scheduling=False)
        assert "priority" not in b and "service_tier" not in b


def test_openai_kind_gets_service_tier_priority_only_when_applied() -> None:
    assert rewrite("openai", "priority")["service_tier"] == "priority"
    assert "service_tier" not in rewrite("openai", "default")
    assert "priority" not in rewrite("openai", "priority")


def test_trtllm_embeddings_get_no_priority_field() -> None:
    assert "priority" not in rewrite("trtllm", "priority", endpoint="embeddings")
    assert rewrite("vllm", "priority", endpoint="embeddings")["priority"] == -10


def test_model_is_renamed_and_streams_always_ask_for_usage() -> None:
    b: dict[str, Any] = {"model": "m", "stream": True}
    info = rewrite_request(b, kind="vllm", priority_scheduling=False, applied_tier="default",
                           endpoint="completions", upstream_model="engine-name")
    assert b["model"] == "engine-name"
    assert b["stream_options"] == {"include_usage": True}
    assert info.stream and not info.client_wants_usage
    b = {"model": "m", "stream": True, "stream_options": {"include_usage": True}}
    info = rewrite_request(b, kind="vllm", priority_scheduling=False, applied_tier="default",
                           endpoint="completions", upstream_model="m")
    assert info.client_wants_usage
    b = {"model": "m"}
    rewrite_request(b, kind="trtllm", priority_scheduling=False, applied_tier="default",
                    endpoint="completions", upstream_model="m")
    assert "stream_options" not in b  # TensorRT-LLM rejects stream_options without stream
