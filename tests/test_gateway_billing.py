"""Billed == echoed, over a randomized mixed load of the three tiers with sheds and hang-ups, flows
(fairness ids) and deadlines."""

from __future__ import annotations

import asyncio
import random
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from conftest import PLAIN_MODEL, PRIORITY_MODEL, GatewayFactory, exact_json, model_config
from ports import free_port

from tierq.stores import open_ledger


TIERS = [None, "auto", "default", "flex", "scale", "priority", "fast"]


@dataclass
class Outcome:
    model: str
    requested: str | None
    endpoint: str
    stream: bool
    hang_up: bool
    status: int = 0
    request_id: str = ""
    header_tier: str = ""
    echoed_tiers: set[str] = field(default_factory=set)
    echoed_cost: Decimal | None = None
    done: bool = False
    # Flows and deadlines (loopback without keys honours the fairness id).
    headers: dict[str, str] = field(default_factory=dict)


def make_case(rng: random.Random) -> Outcome:
    endpoint = rng.choice(["chat/completions", "chat/completions", "completions", "embeddings"])
    stream = endpoint != "embeddings" and rng.random() < 0.6
    headers = {}
    fid = rng.choice(["tenant-a", "tenant-b", "tenant-c", None])
    if fid is not None:
        headers["x-tierq-fairness-id"] = fid
    deadline = rng.choice([None, None, "30", "5000"])
    if deadline is not None:
        headers["x-tierq-max-queue-ms"] = deadline
    return Outcome(model=rng.choice([PRIORITY_MODEL, PLAIN_MODEL]), requested=rng.choice(TIERS),
                   endpoint=endpoint, stream=stream, hang_up=stream and rng.random() < 0.25,
                   headers=headers)


async def run_case(s: aiohttp.ClientSession, base: str, o: Outcome, rng: random.Random) -> None:
    await asyncio.sleep(rng.random() * 0.5)  # arrivals spread over half a second
    body: dict[str, Any] = {"model": o.model}
    if o.endpoint == "chat/completions":
        body |= {"messages": [{"role": "user", "content": "a b c d e"}], "max_tokens": rng.randint(1, 12)}
    elif o.endpoint == "completions":
        body |= {"prompt": "one two three", "max_tokens": rng.randint(1, 12)}
    else:
        body |= {"input": ["x y z"] * rng.randint(1, 3)}
    if o.requested is not None:
        body["service_tier"] = o.requested
    if o.stream:
        body["stream"] = True
        if rng.random() < 0.5:
            body["stream_options"] = {"include_usage": True}
        if o.hang_up:
            body["max_tokens"] = 400  # long enough to be cut short
    resp = await s.post(f"{base}/{o.endpoint}", data=orjson.dumps(body),
                        headers={"Content-Type": "application/json", **o.headers})
    o.status = resp.status
    o.request_id = resp.headers["x-request-id"]
    o.header_tier = resp.headers.get("x-tierq-service-tier", "")
    if resp.status != 200 or not o.stream:
        data = exact_json(await resp.read())
        if resp.status == 200:
            o.echoed_tiers.add(data["service_tier"])
            o.echoed_cost = data["usage"]["estimated_cost"]
        resp.release()
        return
    chunks = 0
    async for line in resp.content:
        if line.startswith(b"data: {"):
            chunk = exact_json(line[6:])
            o.echoed_tiers.add(chunk["service_tier"])
            if chunk.get("usage"):
                o.echoed_cost = chunk["usage"]["estimated_cost"]
            chunks += 1
            if o.hang_up and chunks >= 2:
                resp.close()
                return
        elif line.startswith(b"data: [DONE]"):
            o.done = True
    resp.release()


# The two models' prices (USD per 1M tokens, input / output) as the seed table
# gives them, written out here rather than read from the gateway's own catalog.
PRICES: Any = {PRIORITY_MODEL: (Decimal("0.03"), Decimal("0.05")),
               PLAIN_MODEL: (Decimal("0.02"), Decimal("0.03"))}


def expected_cost(model: str, prompt: int, completion: int, tier: str) -> Decimal:
    """The bill by the rule of docs/billing.md, computed apart from tierq.pricing."""
    inp, out = PRICES[model]
    usd = (prompt * inp + completion * out) / Decimal(10**6)
    return usd * {"priority": Decimal("1.5"), "flex": Decimal("0.5")}.get(tier, Decimal(1))


def expected_tier(model: str, requested: str | None) -> str:
    """The tier table of docs/billing.md: PRIORITY_MODEL sells all three tiers here."""
    if model == PRIORITY_MODEL and requested in ("priority", "fast"):
        return "priority"
    return "flex" if model == PRIORITY_MODEL and requested == "flex" else "default"


async def test_billed_equals_echoed_over_randomized_mixed_load(make_gateway: GatewayFactory) -> None:
    rng = random.Random(20261122)
    admission = {"max_concurrency": 3, "queue_depth": 8, "max_wait_ms": {"default": 400}}
    gw = await make_gateway(
        models=[model_config(PRIORITY_MODEL, flex=True, **admission), model_config(PLAIN_MODEL, **admission)],
        sim={"slots": 6, "ttft_ms": 30.0, "tokens_per_s": 400.0})
    cases = [make_case(rng) for _ in range(90)]

    async def all_rows() -> list[Any]:
        # Hang-ups are recorded when the gateway notices the disconnect: give it a moment.
        for _ in range(200):
            rows = await gw.rows()
            if len(rows) == len(cases):
                break
            await asyncio.sleep(0.01)
        return rows

    async with aiohttp.ClientSession() as s:
        await asyncio.gather(*(run_case(s, gw.url, o, random.Random(i)) for i, o in enumerate(cases)))
        await all_rows()
        # Flex is served from idle capacity only, which the mix may never leave:
        # two more flex requests once it is over, one at a time, so every run
        # serves flex (JSON and a stream) beside the ones the mix refused.
        idle = [Outcome(model=PRIORITY_MODEL, requested="flex", endpoint="chat/completions",
                        stream=stream, hang_up=False) for stream in (False, True)]
        for i, o in enumerate(idle):
            await run_case(s, gw.url, o, random.Random(1000 + i))
        cases += idle
    rows = await all_rows()
    by_id = {r.request_id: r for r in rows}
    assert len(rows) == len(cases)  # one row per request decision, no more, no less
    for o in cases:  # the flow it was fair by, recorded
        assert by_id[o.request_id].fairness_id == o.headers.get("x-tierq-fairness-id")
    statuses = {"served": 0, "shed": 0, "cancelled": 0}
    for o in cases:
        row = by_id[o.request_id]
        assert row.applied_tier == o.header_tier
        assert row.requested_tier == o.requested
        assert row.applied_tier == expected_tier(o.model, o.requested)
        statuses[row.status] = statuses.get(row.status, 0) + 1
        if o.status == 429:
            assert row.status == "shed" and row.cost == 0 and row.completion_tokens == 0
            if row.applied_tier == "flex" and row.code != "rate_limit_exceeded":
                assert row.code == "resource_unavailable"
            continue
        assert o.status == 200
        assert o.echoed_tiers == {row.applied_tier}  # every chunk said the applied tier
        assert row.cost == expected_cost(o.model, row.prompt_tokens, row.completion_tokens,
                                         row.applied_tier)
        if o.hang_up:
            assert row.status == "cancelled" and row.partial and 1 <= row.completion_tokens < 400
        else:
            assert row.status == "served" and not row.partial and o.done == o.stream
            if o.echoed_cost is not None:
                assert o.echoed_cost == row.cost
            else:
                assert o.stream  # only a stream without include_usage echoes no cost
    # The mix really exercised every path.
    assert statuses["served"] > 20 and statuses["shed"] > 0 and statuses["cancelled"] > 0
    assert {r.applied_tier for r in rows} == {"priority", "default", "flex"}
    assert any(r.applied_tier == "flex" and r.status == "served" for r in rows)


# ---- two workers ----------------------------------------------------------------

WORKERS_APP = Path(__file__).with_name("_gateway_workers_app.py")


async def test_billed_equals_echoed_for_three_tiers_across_two_workers(tmp_path: Path) -> None:
    """`tierq serve --workers 2` (tests/_gateway_workers_app.py) on shared
    pools: the same randomized load as above, each request sent to one
    worker's own port, every tier's echo, header and row agreeing."""
    ledger = tmp_path / "ledger.db"
    cfg = tmp_path / "tierq.toml"
    cfg.write_text(f"""
[ledger]
url = "sqlite:///{ledger}"
[[upstreams]]
name = "sim"
kind = "sim"
[upstreams.sim]
slots = 6
ttft_ms = 30
tokens_per_s = 400
[[models]]
id = "{PRIORITY_MODEL}"
priority = true
flex = true
[models.admission]
max_concurrency = 3
queue_depth = 8
max_wait_ms = {{ default = 400, flex = 300 }}
[[models]]
id = "{PLAIN_MODEL}"
[models.admission]
max_concurrency = 3
queue_depth = 8
max_wait_ms = {{ default = 400 }}
""")
    debug = [free_port(), free_port()]
    log = tmp_path / "gw.log"
    with log.open("wb") as err:
        proc = subprocess.Popen([sys.executable, str(WORKERS_APP), str(cfg), str(free_port()),
                                 ",".join(map(str, debug))], stdout=subprocess.DEVNULL, stderr=err)
    roots = [f"http://127.0.0.1:{p}" for p in debug]
    rng = random.Random(20261207)
    cases = [make_case(rng) for _ in range(90)]
    try:
        async with aiohttp.ClientSession() as s:
            for _ in range(3000):
                try:
                    ok = [(await s.get(r + "/readyz")).status == 200 for r in roots]
                    if all(ok):
                        break
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.01)
            else:
                raise AssertionError(f"workers never came up: {log.read_text()[-2000:]}")
            await asyncio.gather(*(run_case(s, roots[i % 2] + "/v1", o, random.Random(i))
                                   for i, o in enumerate(cases)))
            # Hang-ups are recorded when a worker notices the disconnect.
            await asyncio.sleep(0.5)
            # Flex is served from idle capacity only, which the mix may never leave
            # (a full-suite run at load 8-16 left none): a flex stream on each
            # worker once it is over, one at a time, as the one-worker test does.
            idle = [Outcome(model=PRIORITY_MODEL, requested="flex", endpoint="chat/completions",
                            stream=True, hang_up=False) for _ in roots]
            for i, o in enumerate(idle):
                await run_case(s, roots[i] + "/v1", o, random.Random(1000 + i))
            cases += idle
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, log.read_text()[-2000:]
    rows = open_ledger(f"sqlite:///{ledger}").rows()
    by_id = {r.request_id: r for r in rows}
    assert len(rows) == len(cases)
    served_flex = 0
    for o in cases:
        row = by_id[o.request_id]
        assert row.applied_tier == o.header_tier == expected_tier(o.model, o.requested)
        if o.status == 429:
            assert row.status == "shed" and row.cost == 0 and row.completion_tokens == 0
            continue
        assert o.status == 200 and o.echoed_tiers == {row.applied_tier}
        assert row.cost == expected_cost(o.model, row.prompt_tokens, row.completion_tokens, row.applied_tier)
        if not o.hang_up and o.echoed_cost is not None:
            assert o.echoed_cost == row.cost
        served_flex += row.applied_tier == "flex" and o.stream
    assert {r.applied_tier for r in rows} == {"priority", "default", "flex"}
    assert served_flex > 0, "a flex stream was served and billed"
