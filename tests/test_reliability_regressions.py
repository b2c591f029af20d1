"""Regression tests for bugs the reliability work found, each named after its bug."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import GatewayFactory
from test_reliability_faults import _hang_up_after, body, fault_config, send, settled

pytestmark = pytest.mark.reliability


async def test_bug_stream_of_unparseable_events_ending_in_done_was_billed_as_served(
    make_gateway: GatewayFactory, tmp_path: Path
) -> None:
    # Non-JSON SSE payloads were skipped and the [DONE] after them billed the
    # prompt as a served request; the client had received nothing usable.
    gw = await make_gateway(config=fault_config(tmp_path))
    reply = await send(gw, body(True, "bad-json"))
    assert "[DONE]" not in reply.events and reply.error is not None
    assert reply.error["code"] == "upstream_stream_error"
    rows = await settled(gw)
    assert [(r.status, r.cost) for r in rows] == [("failed", 0)]


async def test_bug_stream_cut_before_its_first_token_was_billed_the_prompt(
    make_gateway: GatewayFactory, tmp_path: Path
) -> None:
    # A client that left after the stream's headers but before any token was
    # billed the estimated prompt as "partial"; nothing had been delivered.
    gw = await make_gateway(config=fault_config(tmp_path), sim={"ttft_ms": 3000.0})
    await _hang_up_after(gw, body(True), lambda: gw.sim.state.generating == 1)
    rows = await settled(gw)
    assert [(r.status, r.cost, r.partial, r.prompt_tokens) for r in rows] == [
        ("cancelled", 0, False, 0)]


@pytest.mark.parametrize("target", [
    "http://127.0.0.1:8000%40169.254.169.254/v1/chat/completions",
    "http://127.0.0.1:80:80/v1/chat/completions",
    "http://127.0.0.1:99999/v1/chat/completions",
    "http://[::1/v1/chat/completions",
])
def test_bug_forward_target_with_an_unparseable_port_was_a_500(target: str) -> None:
    # yarl parses the authority lazily, so `url.port` raised ValueError outside
    # the try around URL(): the forward route answered 500 instead of 403.
    from tierq.upstream import match_forward_target

    assert match_forward_target(target, {"sim": "http://127.0.0.1:8000/v1"}) is None
