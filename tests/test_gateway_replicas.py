"""Replicas under one pool (#20): `endpoints = [...]`, each endpoint its own
slots and limit, routed by prefix within a load bound. Real sockets: one
`tierq sim` process per replica, the gateway in front, the openai client."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from conftest import serve_app
from ports import free_port

from tierq.app import create_app
from tierq.config import load_config
from tierq.gateway import GATEWAY
from tierq.routing import (BLOCK_CHARS, FIRST, HOT_BOUND_SHARE, HOT_HALF_LIFE_S, HOT_MIN_ARRIVALS,
                           HOT_TABLE_MAX, ROUTE_BLOCKS, TWO_HOMES, Router, order_word, prompt_text,
                           rendezvous, route_key)
from tierq.toml_tables import ConfigError

MODEL = "meta-llama/Meta-Llama-3.1-8B-Instruct"


# ---- config ------------------------------------------------------------------------


def _load(tmp_path: Path, upstream: str) -> Any:
    cfg = tmp_path / "tierq.toml"
    cfg.write_text(f'[[upstreams]]\nname = "pool"\nkind = "vllm"\n{upstream}\n'
                   f'[[models]]\nid = "{MODEL}"\n')
    return load_config(str(cfg))


@pytest.mark.parametrize(("upstream", "key", "says"), [
    ('endpoints = []', "upstreams[0].endpoints", "must not be empty"),
    ('endpoints = ["http://a:1/v1", "http://a:1/v1/"]', "upstreams[0].endpoints", "duplicate URL"),
    ('base_url = "http://a:1/v1"\nendpoints = ["http://b:1/v1"]', "upstreams[0].endpoints",
     "set together with base_url"),
    ('', "upstreams[0].base_url", "required (or endpoints"),
    ('endpoints = ["http://a:1/v1", "http://b:1/v1"]\nmetrics_urls = ["http://a:1/metrics"]',
     "upstreams[0].metrics_urls", "expected 2 URLs"),
    ('endpoints = ["http://a:1/v1", "http://b:1/v1"]\nmetrics_url = "http://a:1/metrics"',
     "upstreams[0].metrics_url", "use metrics_urls"),
    ('base_url = "http://a:1/v1"\nmetrics_urls = ["http://a:1/metrics"]', "upstreams[0].metrics_urls",
     "only with endpoints"),
    ('endpoints = ["http://a:1/v1"]\nrouting = "random"', "upstreams[0].routing", "expected one of"),
    ('endpoints = ["ftp://a:1/v1"]', "upstreams[0].endpoints", "http:// or https://"),
])
def test_endpoints_refused_with_one_line_naming_the_key(tmp_path: Path, upstream: str, key: str,
                                                        says: str) -> None:
    with pytest.raises(ConfigError) as e:
        _load(tmp_path, upstream)
    line = str(e.value)
    assert "\n" not in line and key in line and says in line, line


def test_a_sim_upstream_takes_replicas_not_endpoints(tmp_path: Path) -> None:
    cfg = tmp_path / "tierq.toml"
    cfg.write_text('[[upstreams]]\nname = "sim"\nkind = "sim"\nendpoints = ["http://a:1/v1"]\n')
    with pytest.raises(ConfigError, match=r"upstreams\[0\]\.endpoints.*replicas = N"):
        load_config(str(cfg))
    cfg.write_text('[[upstreams]]\nname = "sim"\nkind = "sim"\n[upstreams.sim]\nreplicas = 17\n')
    with pytest.raises(ConfigError, match=r"upstreams\[0\]\.sim\.replicas"):
        load_config(str(cfg))


def test_endpoints_and_routing_are_read_in_order(tmp_path: Path) -> None:
    config = _load(tmp_path, 'endpoints = ["http://a:1/v1", "http://b:1/v1/", "http://c:1/v1"]\n'
                   'routing = "least_loaded"')
    u = config.upstreams[0]
    assert u.endpoints == ("http://a:1/v1", "http://b:1/v1", "http://c:1/v1") and u.replicas == 3
    assert u.routing == "least_loaded" and u.base_url == "http://a:1/v1"


def _write_model(tmp_path: Path) -> Path:
    cfg = tmp_path / "model.toml"
    cfg.write_text('[[upstreams]]\nname = "pool"\nkind = "vllm"\n'
                   'endpoints = ["http://a:1/v1", "http://b:1/v1", "http://c:1/v1"]\n'
                   f'[[models]]\nid = "{MODEL}"\n[models.admission]\nmax_concurrency = 5\n')
    return cfg


def test_a_fixed_limit_is_per_replica_and_the_pool_holds_their_sum(tmp_path: Path) -> None:
    from tierq.served import Catalog
    entry = Catalog.from_config(load_config(str(_write_model(tmp_path))))[MODEL]
    assert entry.replicas == 3
    assert entry.replica is not None and entry.replica.settings.limit_max == 5
    assert entry.admission.settings.limit_mode == "fixed" and entry.admission.settings.limit_max == 15


# ---- the order -----------------------------------------------------------------------


def test_the_route_key_is_the_leading_blocks_and_stable_across_processes() -> None:
    system = "s" * (BLOCK_CHARS * ROUTE_BLOCKS)
    a = {"messages": [{"role": "system", "content": system}, {"role": "user", "content": "one"}]}
    b = {"messages": [{"role": "system", "content": system}, {"role": "user", "content": "two"}]}
    assert route_key(prompt_text("chat/completions", a)) == route_key(prompt_text("chat/completions", b))
    c = {"messages": [{"role": "system", "content": "t" + system[1:]}]}
    assert route_key(prompt_text("chat/completions", a)) != route_key(prompt_text("chat/completions", c))
    # Pinned: BLAKE2b has no per-process salt, so every worker and host agrees.
    assert route_key("hello").hex() == "a7b6eda801e5347d"
    assert prompt_text("chat/completions", {"messages": [
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]}) \
        == "user\nab\n\n"
    assert prompt_text("completions", {"prompt": ["a", "b"]}) == "a\nb"


def test_rendezvous_keeps_a_prefix_home_when_the_endpoints_are_listed_in_another_order() -> None:
    urls = [f"http://10.0.0.{i}:8000/v1" for i in range(4)]
    for n in range(50):
        key = route_key(f"prompt {n}")
        home = urls[rendezvous(key, urls)[0]]
        shuffled = urls[::-1]
        assert shuffled[rendezvous(key, shuffled)[0]] == home
        # A replica leaving moves only its own prefixes.
        rest = [u for u in urls if u != urls[3]]
        if home != urls[3]:
            assert rest[rendezvous(key, rest)[0]] == home


def test_round_robin_takes_each_replica_in_turn() -> None:
    r = Router(["http://a/v1", "http://b/v1", "http://c/v1"], "round_robin")
    routes = [r.route("chat/completions", {}) for _ in range(6)]
    assert [x.order & 0xF for x in routes] == [0, 1, 2, 0, 1, 2]
    assert {(x.rule, x.homes) for x in routes} == {(FIRST, 0)}


class _Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def _body(text: str) -> dict[str, Any]:
    return {"prompt": text}


URLS = ["http://a/v1", "http://b/v1", "http://c/v1", "http://d/v1"]


def test_a_cold_prefix_has_one_home_and_goes_there_while_it_has_room() -> None:
    r = Router(URLS, "prefix", clock=_Clock())
    order = rendezvous(route_key("cold " * 300), URLS)
    route = r.route("completions", _body("cold " * 300))
    assert route == (order_word(order), FIRST, 1 << order[0])
    assert r.route("completions", _body("cold " * 300), count=False).rule == FIRST


def test_a_prefix_is_hot_once_its_share_passes_half_a_replicas_bound_seeded() -> None:
    """Zipf-like traffic over 32 prefixes (the bench's, s = 1) through one
    router on a manual clock: the prefixes above HOT_BOUND_SHARE / n of the
    arrivals (here only the first, 24.6%) get two homes and the two-homes rule;
    the rest keep one home and the first-with-room rule."""
    import random
    clock = _Clock()
    r = Router(URLS, "prefix", clock=clock)
    texts = [f"system prompt {i}: " + "be exact. " * 120 for i in range(32)]
    weights = [1 / (k + 1) for k in range(32)]
    share = [w / sum(weights) for w in weights]
    rng = random.Random(20)
    last: dict[int, Any] = {}
    for _ in range(2000):
        i = rng.choices(range(32), weights)[0]
        last[i] = r.route("completions", _body(texts[i]))
        clock.t += 0.01  # 100 arrivals a second: the counts halve every 10 s
    hot = {i for i, x in last.items() if x.rule == TWO_HOMES}
    assert hot == {i for i in last if share[i] > HOT_BOUND_SHARE / len(URLS)} == {0}, hot
    for i, x in last.items():
        order = rendezvous(route_key(texts[i]), URLS)
        assert x.order == order_word(order)
        want = (1 << order[0]) | (1 << order[1]) if i in hot else 1 << order[0]
        assert x.homes == want, (i, x)


def test_a_hot_prefix_cools_back_to_one_home_when_its_traffic_stops() -> None:
    clock = _Clock()
    r = Router(URLS, "prefix", clock=clock)
    hot, other = "hot prompt " * 100, "other prompt " * 100
    for k in range(int(HOT_MIN_ARRIVALS) - 1):
        assert r.route("completions", _body(hot)).rule == FIRST, f"hot after {k + 1} arrivals"
    assert r.route("completions", _body(hot)).rule == TWO_HOMES
    assert bin(r.route("completions", _body(hot)).homes).count("1") == 2
    # Then only the other prefix arrives: within a few half-lives the first
    # is below its share (and below the minimum count) and cold again.
    for _ in range(5):
        clock.t += HOT_HALF_LIFE_S
        for _ in range(10):
            r.route("completions", _body(other))
    assert r.route("completions", _body(hot), count=False).rule == FIRST


def test_the_arrival_counts_stay_bounded_under_unshared_prompts() -> None:
    r = Router(URLS, "prefix", clock=_Clock())
    for i in range(3 * HOT_TABLE_MAX):
        assert r.route("completions", _body(f"unique prompt {i} " * 80)).rule == FIRST
    assert len(r._counts) <= HOT_TABLE_MAX


# ---- through the gateway ----------------------------------------------------------


class Sim:
    def __init__(self, tmp: Path, i: int, slots: int, *extra: str) -> None:
        self.port = free_port()
        self.log = tmp / f"sim{i}.log"
        with self.log.open("wb") as err:
            self.p = subprocess.Popen(
                [sys.executable, "-m", "tierq", "sim", "--host", "127.0.0.1", "--port", str(self.port),
                 "--slots", str(slots), "--ttft-ms", "40", "--tokens-per-s", "200", *extra],
                stdout=subprocess.DEVNULL, stderr=err)
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.p.poll() is None:
            self.p.terminate()
            try:
                self.p.wait(15)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()


async def _up(session: aiohttp.ClientSession, url: str) -> None:
    t0 = time.monotonic()
    while True:
        try:
            async with session.get(url + "/sim/stats") as r:
                if r.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        if time.monotonic() - t0 > 30:
            raise AssertionError(f"sim at {url} never came up")
        await asyncio.sleep(0.05)


@pytest.fixture
async def replicas(tmp_path: Path) -> AsyncIterator[Any]:
    sims = [Sim(tmp_path, i, slots=8) for i in range(3)]
    runners = []
    starts: list[Any] = []
    session = aiohttp.ClientSession()

    async def start(admission: str, routing: str = "prefix") -> tuple[str, list[str]]:
        cfg = tmp_path / "tierq.toml"
        endpoints = ", ".join(f'"{s.url}/v1"' for s in sims)
        cfg.write_text(
            f'[ledger]\nurl = "sqlite:///{tmp_path}/ledger.db"\n'
            f'[[upstreams]]\nname = "pool"\nkind = "vllm"\npriority_scheduling = true\n'
            f'endpoints = [{endpoints}]\nrouting = "{routing}"\n'
            f'[[models]]\nid = "{MODEL}"\n[models.admission]\n{admission}\n')
        app = create_app(load_config(str(cfg)))
        root, runner = await serve_app(app)
        runners.append(runner)
        starts.append(app)
        return root, [s.url for s in sims]

    try:
        for s in sims:
            await _up(session, s.url)
        yield start, session, starts
    finally:
        for runner in runners:
            await runner.cleanup()
        await session.close()
        for s in sims:
            s.stop()


async def _stats(session: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    async with session.get(url + "/sim/stats") as r:
        data: dict[str, Any] = await r.json()
        return data


def _chat(system: str, user: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


@pytest.mark.timeout(120)
async def test_no_replica_ever_holds_more_than_its_limit(replicas: Any) -> None:
    start, session, apps = replicas
    root, sims = await start("max_concurrency = 2\nqueue_depth = 256")
    client = openai.AsyncOpenAI(base_url=root + "/v1", api_key="x", max_retries=0, timeout=60)
    systems = ["shared system prompt " * 80, "another one entirely " * 80]

    async def one(i: int) -> None:
        await client.chat.completions.create(model=MODEL, max_tokens=8,
                                             messages=_chat(systems[i % 2], f"turn {i}"))

    await asyncio.gather(*(one(i) for i in range(36)))
    stats = [await _stats(session, s) for s in sims]
    assert [s["max_in_flight_seen"] for s in stats] == [2, 2, 2], stats
    assert sum(s["completed"] for s in stats) == 36
    await client.close()


@pytest.mark.timeout(120)
async def test_requests_sharing_a_prefix_land_on_one_replica_while_not_saturated(replicas: Any) -> None:
    start, session, apps = replicas
    root, sims = await start("max_concurrency = 4")
    client = openai.AsyncOpenAI(base_url=root + "/v1", api_key="x", max_retries=0, timeout=60)
    homes = set()
    for p in range(6):
        system = f"system prompt number {p}: " + "be helpful and exact. " * 60
        before = [(await _stats(session, s))["requests"] for s in sims]
        for turn in range(4):  # one at a time: the pool is never saturated
            await client.chat.completions.create(model=MODEL, max_tokens=4,
                                                 messages=_chat(system, f"question {turn}"))
        after = [(await _stats(session, s))["requests"] for s in sims]
        moved = [b - a for a, b in zip(before, after)]
        assert sorted(moved) == [0, 0, 4], moved
        homes.add(moved.index(4))
    # Six prefixes over three replicas by rendezvous: more than one home.
    assert len(homes) > 1, homes
    await client.close()


@pytest.mark.timeout(120)
async def test_cold_prefixes_stay_home_past_the_load_bound_and_a_hot_one_spills(replicas: Any) -> None:
    """Limit 4 a replica, 12 for the pool. Five cold prefixes homed on one
    sim sent at once: the load bound (1.25 x its share: 2 of 5 held) would
    send all but two elsewhere; cold, four stay home (its limit) and the
    fifth takes the next in its order. Then a prefix heated by 8 arrivals
    in a row sent 6 at once: hot, it takes the less loaded of its two homes."""
    start, session, apps = replicas
    root, sims = await start("max_concurrency = 4")
    router = apps[-1][GATEWAY].pools[MODEL].upstream.router
    client = openai.AsyncOpenAI(base_url=root + "/v1", api_key="x", max_retries=0, timeout=60)

    def home(system: str) -> int:
        text = prompt_text("chat/completions", {"messages": _chat(system, "q")})
        return rendezvous(route_key(text), router.endpoints)[0]

    cold = [f"cold prompt {p}: " + "answer plainly. " * 80 for p in range(200)]
    cold = [c for c in cold if home(c) == 0][:5]
    assert len(cold) == 5

    async def one(system: str) -> None:
        await client.chat.completions.create(model=MODEL, max_tokens=200, messages=_chat(system, "q"))

    before = [await _stats(session, s) for s in sims]
    await asyncio.gather(*(one(c) for c in cold))
    after = [await _stats(session, s) for s in sims]
    moved = [b["requests"] - a["requests"] for a, b in zip(before, after)]
    assert moved[0] == 4 and sum(moved) == 5, moved
    assert after[0]["max_in_flight_seen"] == 4, after[0]
    assert all(s["max_in_flight_seen"] <= 4 for s in after), after

    hot = "hot prompt: " + "answer at length. " * 80
    text = prompt_text("chat/completions", {"messages": _chat(hot, "q")})
    h, h2 = rendezvous(route_key(text), router.endpoints)[:2]
    for _ in range(int(HOT_MIN_ARRIVALS)):
        await client.chat.completions.create(model=MODEL, max_tokens=2, messages=_chat(hot, "warm"))
    before = [await _stats(session, s) for s in sims]
    await asyncio.gather(*(one(hot) for _ in range(6)))
    after = [await _stats(session, s) for s in sims]
    moved = [b["requests"] - a["requests"] for a, b in zip(before, after)]
    # Hot: the less loaded of its two homes each time, so three on each
    # (home alone has room for four) and none elsewhere.
    assert moved[h] == moved[h2] == 3, (h, h2, moved)
    assert all(s["max_in_flight_seen"] <= 4 for s in after), after
    await client.close()


@pytest.mark.timeout(120)
async def test_priority_keeps_its_lead_across_replicas(replicas: Any) -> None:
    start, session, apps = replicas
    root, sims = await start("max_concurrency = 1\nqueue_depth = 256")
    client = openai.AsyncOpenAI(base_url=root + "/v1", api_key="x", max_retries=0, timeout=120)
    done: list[str] = []

    async def one(tier: str, i: int) -> None:
        await client.chat.completions.create(model=MODEL, max_tokens=16, service_tier=tier,  # type: ignore[arg-type]
                                             messages=_chat(f"prefix {i % 5} " * 40, "hi"))
        done.append(tier)

    defaults = [asyncio.create_task(one("default", i)) for i in range(18)]

    pool = apps[-1][GATEWAY].pools[MODEL]
    t0 = time.monotonic()
    while pool.admission.stats()["depth"]["default"] < 12:
        assert time.monotonic() - t0 < 30, "the default requests never queued"
        await asyncio.sleep(0.01)
    prio = [asyncio.create_task(one("priority", i)) for i in range(3)]
    await asyncio.gather(*defaults, *prio)
    # Three slots over three replicas: the priority requests go next on
    # whichever replica frees first, ahead of every default still queued.
    last_priority = max(i for i, t in enumerate(done) if t == "priority")
    assert last_priority < 3 + 3 + 3, done
    await client.close()


@pytest.mark.timeout(60)
async def test_sim_replicas_run_that_many_in_process_engines_each_its_own_endpoint(tmp_path: Path) -> None:
    from tierq.embedded import start_sims
    cfg = tmp_path / "tierq.toml"
    cfg.write_text(f'[ledger]\nurl = "sqlite:///{tmp_path}/ledger.db"\n'
                   '[[upstreams]]\nname = "sim"\nkind = "sim"\n[upstreams.sim]\nreplicas = 3\nslots = 2\n'
                   f'[[models]]\nid = "{MODEL}"\n[models.admission]\nmax_concurrency = 1\n')
    app = create_app(load_config(str(cfg)), start_sims=start_sims)
    root, runner = await serve_app(app)
    try:
        gw = app[GATEWAY]
        pool = gw.pools[MODEL]
        assert len(set(gw.upstreams["sim"].endpoints)) == 3 and pool.admission.limit == 3
        client = openai.AsyncOpenAI(base_url=root + "/v1", api_key="x", max_retries=0, timeout=60)
        await asyncio.gather(*(client.chat.completions.create(
            model=MODEL, max_tokens=4, messages=_chat(f"prefix {i}", "hi")) for i in range(9)))
        assert pool.replicas is not None
        grants = [r["grants"] for r in pool.replicas.stats()]
        assert sum(grants) == 9 and all(r["in_flight"] == 0 for r in pool.replicas.stats()), grants
        await client.close()
    finally:
        await runner.cleanup()


def test_the_gateway_renders_a_prompt_as_the_sims_prefix_cache_does() -> None:
    from tierq.sim import rendered_prompt
    bodies = [
        {"messages": [{"role": "system", "content": "Be brief."},
                      {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "image_url"}]}]},
        {"messages": [{"role": "user", "content": "x" * 700}]},
    ]
    for body in bodies:
        assert prompt_text("chat/completions", body) == rendered_prompt(body, True)
    for prompt in ("one prompt", ["two", "prompts"]):
        assert prompt_text("completions", {"prompt": prompt}) == rendered_prompt({"prompt": prompt}, False)


# ---- several workers -------------------------------------------------------------------


def test_two_workers_on_one_region_count_each_replica_once_and_a_dead_ones_slots_come_back() -> None:
    from tierq._core import PoolSettings
    from tierq.workers import SharedPools
    settings = PoolSettings(max_concurrency=2)
    shared = SharedPools({MODEL: PoolSettings(max_concurrency=4)}, 2,
                         replicas={MODEL: (2, settings)})
    try:
        w0, w1 = shared.attach(0), shared.attach(1)
        r0, r1 = w0.replicas[MODEL], w1.replicas[MODEL]
        # Replica 0 is the home of both: two slots, one per worker, then replica 1.
        assert [r0.pick(0x10, 0), r1.pick(0x10, 0), r0.pick(0x10, 0)] == [0, 0, 1]
        assert [r["in_flight"] for r in shared.replica_stats(MODEL)] == [2, 1]
        # Worker 0 dies holding one on each: its reclaim gives both back.
        shared.reclaim(0)
        assert [r["in_flight"] for r in shared.replica_stats(MODEL)] == [1, 0]
        r1.release(0)
        assert [r["in_flight"] for r in shared.replica_stats(MODEL)] == [0, 0]
    finally:
        shared.close()


class _Between:
    """An Admission whose next `withhold` first lets `then` run: another
    worker's step landing in the middle of this one's."""

    def __init__(self, adm: Any, then: Any) -> None:
        self._adm, self._then = adm, then

    def __getattr__(self, name: str) -> Any:
        return getattr(self._adm, name)

    def withhold(self, n: int) -> int:
        then, self._then = self._then, None
        if then is not None:
            then()
        return int(self._adm.withhold(n))


async def test_two_workers_that_both_eject_a_replica_withhold_its_slots_once_and_give_them_back() -> None:
    """A fixed pool of two replicas at 2 over two workers' handles on one block
    and region: each worker's own detector ejects replica 1 (each saw its
    failures), and the pool withholds 2 slots, not 4 (two deltas on the
    host-wide withheld count did); a slot busy when it was ejected is owed and
    withheld as it is released; back in rotation, the slots come back once."""
    from tierq._core import PoolSettings
    from tierq.admission import ReplicaPool
    from tierq.workers import SharedPools
    settings = PoolSettings(max_concurrency=2)
    shared = SharedPools({MODEL: PoolSettings(max_concurrency=4)}, 2,
                         replicas={MODEL: (2, settings)})
    try:
        w0, w1 = shared.attach(0), shared.attach(1)
        p0, p1 = (ReplicaPool(w[MODEL], 2, settings, core=w.replicas[MODEL]) for w in (w0, w1))

        def withheld() -> tuple[int, int, int]:
            st = shared.stats()[MODEL]
            return int(str(st["in_flight"])), int(str(st["withheld"])), int(str(st["owed"]))

        held = [w0[MODEL].acquire("priority") for _ in range(3)]
        for slot in held:
            await slot.__aenter__()
        # Worker 1 sees the same ejection in the middle of worker 0's sync:
        # after worker 0 read the pool's state, before it withheld.
        p0.admission = _Between(w0[MODEL], lambda: p1.set_health(1, True))  # type: ignore[assignment]
        p0.set_health(1, True)
        assert withheld() == (3, 1, 1)  # the free slot taken, one of the busy ones owed
        assert p0.core.withheld == p1.core.withheld == 2
        p0.admission = w0[MODEL]
        p0.set_health(1, True)  # told again: nothing moves
        assert withheld() == (3, 1, 1)
        await held[0].__aexit__(None, None, None)
        assert withheld() == (2, 2, 0)  # the owed slot withheld as it freed
        # Two in flight on the survivor's two: a third request waits.
        waiter = asyncio.ensure_future(w1[MODEL].acquire("priority").__aenter__())
        for _ in range(5):
            await asyncio.sleep(0)
        assert not waiter.done()
        # Back in slow start at 1, told by both workers: one slot back, to the waiter.
        p1.set_health(1, False, 1)
        p0.set_health(1, False, 1)
        third = await waiter
        assert withheld() == (3, 1, 0)
        # Whole again: the last withheld slot back, and a fourth goes straight in.
        p0.set_health(1, False)
        p1.set_health(1, False)
        assert withheld() == (3, 0, 0)
        fourth = await w1[MODEL].acquire("priority").__aenter__()
        assert withheld() == (4, 0, 0) and p0.core.withheld == 0
        for slot in (*held[1:], third, fourth):
            await slot.__aexit__(None, None, None)
        assert withheld() == (0, 0, 0)
    finally:
        shared.close()


@pytest.mark.timeout(180)
async def test_two_workers_share_one_view_of_every_replica(tmp_path: Path) -> None:
    """`tierq serve --workers 2` over three `tierq sim` processes at two slots
    each: 48 requests at once through both workers, and no sim ever runs more
    than two of them (each worker counting alone would let four through)."""
    sims = [Sim(tmp_path, i, slots=8) for i in range(3)]
    port = free_port()
    cfg = tmp_path / "tierq.toml"
    endpoints = ", ".join(f'"{s.url}/v1"' for s in sims)
    cfg.write_text(
        f'[ledger]\nurl = "sqlite:///{tmp_path}/ledger.db"\n'
        f'[[upstreams]]\nname = "pool"\nkind = "vllm"\nendpoints = [{endpoints}]\n'
        f'[[models]]\nid = "{MODEL}"\n[models.admission]\nmax_concurrency = 2\nqueue_depth = 256\n')
    log = tmp_path / "serve.log"
    with log.open("wb") as err:
        serve = subprocess.Popen([sys.executable, "-m", "tierq", "serve", "--config", str(cfg),
                                  "--port", str(port), "--workers", "2", "--no-access-log"],
                                 stdout=subprocess.DEVNULL, stderr=err)
    root = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as session:
            for s in sims:
                await _up(session, s.url)
            t0 = time.monotonic()
            while True:
                try:
                    async with session.get(root + "/status.json") as r:
                        if r.status == 200 and (await r.json())["ready"]:
                            break
                except aiohttp.ClientError:
                    pass
                assert serve.poll() is None and time.monotonic() - t0 < 60, log.read_text()[-2000:]
                await asyncio.sleep(0.05)
            # Several clients, so both workers take connections.
            clients = [openai.AsyncOpenAI(base_url=root + "/v1", api_key="x", max_retries=0, timeout=120)
                       for _ in range(8)]
            await asyncio.gather(*(clients[i % 8].chat.completions.create(
                model=MODEL, max_tokens=8, messages=_chat(f"prefix {i % 3} " * 50, f"turn {i}"))
                for i in range(48)))
            stats = [await _stats(session, s.url) for s in sims]
            assert [s["max_in_flight_seen"] for s in stats] == [2, 2, 2], stats
            assert sum(s["completed"] for s in stats) == 48
            for c in clients:
                await c.close()
    finally:
        serve.terminate()
        serve.wait(30)
        for s in sims:
            s.stop()


@pytest.mark.timeout(120)
async def test_each_replica_learns_its_own_limit_from_its_own_engine(tmp_path: Path) -> None:
    """Two `tierq sim` processes, 2 and 6 slots, an adaptive pool: under load
    each endpoint's scraper moves its own limit to what its engine runs, and
    the pool's limit is their sum."""
    sims = [Sim(tmp_path, 0, slots=2), Sim(tmp_path, 1, slots=6)]
    cfg = tmp_path / "tierq.toml"
    endpoints = ", ".join(f'"{s.url}/v1"' for s in sims)
    cfg.write_text(
        f'[ledger]\nurl = "sqlite:///{tmp_path}/ledger.db"\n'
        f'[[upstreams]]\nname = "pool"\nkind = "vllm"\nendpoints = [{endpoints}]\nrouting = "least_loaded"\n'
        f'[[models]]\nid = "{MODEL}"\n[models.admission]\nqueue_depth = 512\n')
    app = create_app(load_config(str(cfg)))
    runner = None
    stop = asyncio.Event()
    try:
        async with aiohttp.ClientSession() as session:
            for s in sims:
                await _up(session, s.url)
            root, runner = await serve_app(app)
            pool = app[GATEWAY].pools[MODEL]
            assert pool.replicas is not None
            client = openai.AsyncOpenAI(base_url=root + "/v1", api_key="x", max_retries=0, timeout=120)

            async def loop(i: int) -> None:
                while not stop.is_set():
                    await client.chat.completions.create(model=MODEL, max_tokens=16,
                                                         messages=_chat(f"client {i}", "go"))

            tasks = [asyncio.create_task(loop(i)) for i in range(24)]
            t0 = time.monotonic()
            while True:
                limits = [r["limit"] for r in pool.replicas.stats()]
                if limits[0] == 2 and limits[1] >= 5:
                    break
                assert time.monotonic() - t0 < 60, limits
                await asyncio.sleep(0.05)
            assert pool.admission.limit == sum(limits)
            stop.set()
            await asyncio.gather(*tasks)
            await client.close()
    finally:
        stop.set()
        if runner is not None:
            await runner.cleanup()
        for s in sims:
            s.stop()


@pytest.mark.timeout(180)
@pytest.mark.parametrize("routing", ["prefix", "round_robin"])
async def test_prefix_routing_finds_the_prompt_cached_where_round_robin_misses(
        tmp_path: Path, routing: str) -> None:
    """Three `tierq sim` processes with a prefix cache each (the sim's block
    rule is the gateway's, docs/sim.md): seven system prompts of about 2,000
    characters, four turns each, one request at a time (seven, so round robin
    does not happen to send a prompt to the same sim every turn). Prefix routing sends
    every turn of a prompt to the sim that cached it, so only the first turn
    of each misses; round robin spreads the turns over all three."""
    sims = [Sim(tmp_path, i, 4, "--prefix-cache-tokens", "100000") for i in range(3)]
    cfg = tmp_path / "tierq.toml"
    endpoints = ", ".join(f'"{s.url}/v1"' for s in sims)
    cfg.write_text(
        f'[ledger]\nurl = "sqlite:///{tmp_path}/ledger.db"\n'
        f'[[upstreams]]\nname = "pool"\nkind = "vllm"\nendpoints = [{endpoints}]\nrouting = "{routing}"\n'
        f'[[models]]\nid = "{MODEL}"\n[models.admission]\nmax_concurrency = 4\n')
    app = create_app(load_config(str(cfg)))
    runner = None
    try:
        async with aiohttp.ClientSession() as session:
            for s in sims:
                await _up(session, s.url)
            root, runner = await serve_app(app)
            client = openai.AsyncOpenAI(base_url=root + "/v1", api_key="x", max_retries=0, timeout=60)
            for turn in range(4):
                for p in range(7):
                    system = f"You are assistant number {p}. " + f"rule {p}: answer exactly. " * 80
                    await client.chat.completions.create(model=MODEL, max_tokens=4,
                                                         messages=_chat(system, f"question {turn}"))
            stats = [await _stats(session, s.url) for s in sims]
            queries = sum(s["prefix_cache_queries"] for s in stats)
            hits = sum(s["prefix_cache_hits"] for s in stats)
            await client.close()
    finally:
        if runner is not None:
            await runner.cleanup()
        for s in sims:
            s.stop()
    rate = hits / queries
    if routing == "prefix":
        # 21 of 28 requests find their system prompt cached (all but its last, partial block).
        assert rate > 0.65, (hits, queries)
    else:
        # Each prompt meets each of the three sims cold once: 7 of 28 hit.
        assert rate < 0.35, (hits, queries)


@pytest.mark.timeout(60)
def test_the_demo_runs_over_several_sims(capsys: pytest.CaptureFixture[str]) -> None:
    from tierq.cli import main
    assert main(["demo", "--duration", "1", "--clients", "6", "--replicas", "2"]) == 0
    out = capsys.readouterr()
    assert "against 2 sims" in out.err and "requests per sim" in out.err, out.err
    assert out.out.splitlines()[0].startswith("TIER")
    assert main(["demo", "--replicas", "17"]) == 2
