"""The live status page, driven in headless Chromium after a burst of load.

The page is loaded while long requests still hold the pool's slots and wait in
its lanes, so what it shows (slots in flight, lane depths, sheds, the latency
chart of both tiers) is read from the rendered DOM, and a screenshot is saved
to tests/artifacts/status.png for a human to look at. Skipped only when there
is no Chromium and CI is not set (.ci/run installs Debian's chromium).
"""

from __future__ import annotations

import asyncio
import html
import os
import re
import shutil
import time
from pathlib import Path

import aiohttp
import orjson
import pytest

from conftest import PRIORITY_MODEL, GatewayFactory, model_config

ARTIFACTS = Path(__file__).parent / "artifacts"


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    return None


CHROMIUM = _chromium()
pytestmark = pytest.mark.skipif(
    CHROMIUM is None and not os.environ.get("CI"),
    reason="no chromium binary (CI installs Debian's chromium; apt-get install chromium)",
)


async def _chat(s: aiohttp.ClientSession, url: str, tier: str, max_tokens: int,
                stream: bool = False) -> int:
    body = {"model": PRIORITY_MODEL, "service_tier": tier, "max_tokens": max_tokens,
            "stream": stream, "messages": [{"role": "user", "content": "status page"}]}
    async with s.post(url + "/chat/completions", data=orjson.dumps(body),
                      headers={"Content-Type": "application/json"}) as r:
        await r.read()
        return r.status


async def _browser(url: str, tmp: Path, *flags: str) -> str:
    assert CHROMIUM is not None, "CI is set but no chromium binary: .ci/run installs it"
    proc = await asyncio.create_subprocess_exec(
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
        "--no-first-run", "--hide-scrollbars", "--window-size=1280,900",
        f"--user-data-dir={tmp / 'chromium-profile'}", "--virtual-time-budget=4000",
        *flags, url,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode(errors="replace")[-2000:]
    return out.decode()


def _attr(dom: str, name: str) -> int:
    m = re.search(rf'<section [^>]*data-model="{re.escape(PRIORITY_MODEL)}"[^>]*>', dom)
    assert m, "the busy pool is not on the page"
    v = re.search(rf'{name}="(\d+)"', m.group(0))
    assert v, name
    return int(v.group(1))


@pytest.mark.timeout(150)
async def test_status_page_shows_lanes_in_flight_sheds_and_both_tiers_latency_after_a_burst(
    make_gateway: GatewayFactory, tmp_path: Path
) -> None:
    gw = await make_gateway(
        models=[model_config(PRIORITY_MODEL, max_concurrency=2, queue_depth=4)],
        sim={"slots": 2, "ttft_ms": 20.0, "tokens_per_s": 200.0})
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
        # A burst: 10 closed-loop clients (3 priority) on 2 slots and 4 queue places.
        stop = time.monotonic() + 5.0

        async def client(tier: str) -> list[int]:
            codes = []
            while time.monotonic() < stop:
                codes.append(await _chat(s, gw.url, tier, 4))
                if codes[-1] == 429:
                    await asyncio.sleep(0.05)
            return codes

        codes = await asyncio.gather(*(client("priority" if i < 3 else "default")
                                       for i in range(10)))
        assert any(c == 429 for cs in codes[3:] for c in cs), "the burst shed nothing"
        # Then long streams that hold both slots and wait in both lanes while
        # the browser looks.
        hold = [asyncio.create_task(_chat(s, gw.url, tier, 2000, stream=True))
                for tier in ("default", "default", "priority", "default", "priority")]
        for _ in range(100):
            st = gw.gw.pools[PRIORITY_MODEL].admission.stats()
            depth = st["depth"]
            assert isinstance(depth, dict)
            if st["in_flight"] == 2 and depth["priority"] == 2 and depth["default"] == 1:
                break
            await asyncio.sleep(0.02)
        else:
            raise AssertionError(f"load did not settle: {st}")
        try:
            ARTIFACTS.mkdir(exist_ok=True)
            shot = ARTIFACTS / "status.png"
            shot.unlink(missing_ok=True)
            dom = html.unescape(await _browser(gw.root + "/status", tmp_path, "--dump-dom"))
            await _browser(gw.root + "/status", tmp_path, f"--screenshot={shot}")
        finally:
            for t in hold:
                t.cancel()
            await asyncio.gather(*hold, return_exceptions=True)

    assert '<span id="ready-text">ready</span>' in dom
    assert '<span class="meta" id="error"></span>' in dom
    assert _attr(dom, "data-in-flight") == 2 and _attr(dom, "data-max-concurrency") == 2
    assert _attr(dom, "data-depth-priority") == 2 and _attr(dom, "data-depth-default") == 1
    assert _attr(dom, "data-shed") > 0
    # Totals: both tiers served, defaults shed.
    for tier in ("priority", "default"):
        card = re.search(rf'data-tier="{tier}">.*?</div></div></div>', dom, re.S)
        assert card, tier
        served = re.search(r'data-count="served"><b>(\d+)</b>', card.group(0))
        assert served and int(served.group(1)) > 0, tier
    shed = re.search(r'data-tier="default">.*?data-count="shed"><b>(\d+)</b>', dom, re.S)
    assert shed and int(shed.group(1)) > 0
    # The chart drew a line (or at least a point) for each tier.
    for tier in ("priority", "default"):
        assert re.search(rf'<path [^>]*data-tier="{tier}" data-points="[1-9]', dom), tier
    assert shot.exists() and shot.stat().st_size > 10_000
    # The pool's limit: fixed here, said so, and its history drawn.
    assert re.search(r'<div class="limit" data-limit="2" data-limit-mode="fixed"', dom)
    assert re.search(r'<path [^>]*class="limit-line"', dom)
    # Its flows: the one anonymous flow of a gateway without keys, which waited.
    assert re.search(r'<div class="flows" [^>]*data-backlogged="1" data-jain="1"', dom)
    assert re.search(r'top served: local [\d,]+ tok', dom)


@pytest.mark.timeout(150)
async def test_status_page_shows_a_learned_limit_and_the_signal_that_moved_it(
    make_gateway: GatewayFactory, tmp_path: Path
) -> None:
    # No max_concurrency: the pool learns the sim's 3 slots from its /metrics.
    gw = await make_gateway(models=[model_config(PRIORITY_MODEL)],
                            sim={"slots": 3, "ttft_ms": 20.0, "tokens_per_s": 200.0})
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
        stop = time.monotonic() + 4.5

        async def client(tier: str) -> None:
            while time.monotonic() < stop:
                await _chat(s, gw.url, tier, 8)

        await asyncio.gather(*(client("priority" if i < 2 else "default") for i in range(12)))
    st = gw.gw.pools[PRIORITY_MODEL].admission.stats()
    assert st["limit_mode"] == "adaptive" and st["limit_signal"] == "engine", st
    dom = html.unescape(await _browser(gw.root + "/status", tmp_path, "--dump-dom"))
    m = re.search(r'<div class="limit" data-limit="(\d+)" data-limit-mode="adaptive" '
                  r'data-limit-signal="engine">(.*?)</div>', dom, re.S)
    assert m, "no learned limit on the pool card"
    assert int(m.group(1)) == st["limit"]
    assert "learned from engine" in m.group(2)
    assert re.search(r'<path [^>]*class="limit-line"', m.group(2))


@pytest.mark.timeout(150)
async def test_status_page_shows_the_shadow_panel_with_what_a_limit_in_shadow_would_have_shed(
    make_gateway: GatewayFactory, tmp_path: Path
) -> None:
    gw = await make_gateway(models=[model_config(PRIORITY_MODEL, rate=0.01, burst=2,
                                                 priority_reserve=0.0, enforce=False)])
    async with aiohttp.ClientSession() as s:
        statuses = [await _chat(s, gw.url, "default", 1) for _ in range(7)]
    assert statuses == [200] * 7  # shadow mode sheds nothing
    assert gw.gw.pools[PRIORITY_MODEL].admission.stats()["shadow_rate_limited"] == 5
    dom = html.unescape(await _browser(gw.root + "/status", tmp_path, "--dump-dom"))
    panel = re.search(r'<section id="shadow-panel"( hidden="")?>(.*?)</section>', dom, re.S)
    assert panel and panel.group(1) is None, "the shadow panel is hidden"
    assert re.search(r'<span data-decision="rate_limited" class="shed"><b>5</b>', panel.group(2))
    assert f"{PRIORITY_MODEL} (5 would have been shed)" in panel.group(2)


@pytest.mark.timeout(150)
async def test_status_page_shows_the_downgrades_panel_with_each_models_count_by_reason(
    make_gateway: GatewayFactory, tmp_path: Path
) -> None:
    from tierq.config import Config, KeysConfig, LedgerConfig, UpstreamConfig

    gw = await make_gateway(config=Config(
        ledger=LedgerConfig(url=f"sqlite:///{tmp_path / 'unused.db'}"),
        upstreams=(UpstreamConfig("sim", "", "sim"),), models=(model_config(PRIORITY_MODEL),),
        keys=KeysConfig(path=str(tmp_path / "keys.db"))))
    assert gw.gw.keys is not None
    _, token = gw.gw.keys.create("no priority", priority_budget_usd=0)
    body = {"model": PRIORITY_MODEL, "service_tier": "priority", "max_tokens": 1,
            "messages": [{"role": "user", "content": "status page"}]}
    async with aiohttp.ClientSession() as s:
        for _ in range(3):
            async with s.post(gw.url + "/chat/completions", data=orjson.dumps(body),
                              headers={"Content-Type": "application/json",
                                       "Authorization": f"Bearer {token}"}) as r:
                await r.read()
                assert r.status == 200 and r.headers["x-tierq-service-tier-reason"] == "budget"
    dom = html.unescape(await _browser(gw.root + "/status", tmp_path, "--dump-dom"))
    panel = re.search(r'<section id="downgrades-panel"( hidden="")?>(.*?)</section>', dom, re.S)
    assert panel and panel.group(1) is None, "the downgrades panel is hidden"
    assert re.search(r'<span data-reason="budget" class="shed"><b>3</b> budget', panel.group(2))
    assert re.search(r'<span data-reason="ramp" class=""><b>0</b> ramp', panel.group(2))
    assert f"{PRIORITY_MODEL}: 0 ramp, 3 budget" in panel.group(2)
