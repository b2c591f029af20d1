"""What feeds each pool's learned concurrency limit (the controller itself is in the core).

Three signals, one per kind of upstream knowledge:
- an engine that publishes its load (vLLM, SGLang, the sim) is scraped every
  `metrics_interval_ms`: its running and waiting counts go to
  `Admission.observe_engine`, so the limit holds the engine's own queue, which is
  first come first served, near zero while tierq's lanes hold the line;
- an opaque upstream (a hosted provider, or an engine whose /metrics cannot be
  read) gives only what tierq sees: each stream's time to first token goes to
  `Admission.observe_latency`;
- any upstream's 429/503 "overloaded" answer goes to `Admission.observe_overload`.

`parse_engine_load` reads Prometheus text with vLLM's or SGLang's names, so the
sim's /metrics and a real vLLM's go through the same code.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final, Protocol

import aiohttp

__all__ = [
    "ENGINE_KINDS",
    "OVERLOAD_STATUSES",
    "Capacity",
    "EngineLoad",
    "EngineScraper",
    "LimitWatch",
    "metrics_url_for",
    "overload_backoff_s",
    "overload_hint_s",
    "parse_engine_load",
    "prefix_cache_of",
]

log = logging.getLogger("tierq.capacity")

# Upstream kinds whose engines publish vLLM- or SGLang-style load metrics.
ENGINE_KINDS: Final = frozenset({"vllm", "sglang", "sim"})

# (running, waiting, KV-cache usage in [0, 1]) metric names, newest first.
_RUNNING: Final = ("vllm:num_requests_running", "sglang:num_running_reqs")
_WAITING: Final = ("vllm:num_requests_waiting", "sglang:num_queue_reqs")
# vLLM renamed gpu_cache_usage_perc to kv_cache_usage_perc (v0.10); both are 0..1.
_KV: Final = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc", "sglang:token_usage")
# The engine's prefix cache, in tokens since it started: vLLM v1's counters
# (vllm:prefix_cache_queries / _hits, exposed with _total), the older
# gpu_-prefixed names after them. Shown per replica (hit rate), never a signal.
_PREFIX_QUERIES: Final = ("vllm:prefix_cache_queries_total", "vllm:gpu_prefix_cache_queries_total")
_PREFIX_HITS: Final = ("vllm:prefix_cache_hits_total", "vllm:gpu_prefix_cache_hits_total")
_WANTED: Final = frozenset(_RUNNING + _WAITING + _KV + _PREFIX_QUERIES + _PREFIX_HITS)

# An upstream's "overloaded, try again" answers. Arriving before anything
# reached the client, they back the limit off and the request keeps its slot
# and is sent again after a back-off, as often as its max wait allows, instead
# of being passed on (DESIGN.md, Slots).
OVERLOAD_STATUSES: Final = frozenset({429, 503})
# The first back-off when the upstream gives no Retry-After: about one engine
# step batch's worth of decode, long enough for a sequence to end; doubled on
# each answer after, up to the second value (jittered, see overload_backoff_s).
DEFAULT_OVERLOAD_BACKOFF_S: Final = 0.1
MAX_OVERLOAD_BACKOFF_S: Final = 1.0


async def _cancelled(task: asyncio.Task[None] | None) -> None:
    """Cancels a background loop and waits until it has stopped."""
    if task is not None:
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass


@dataclass(frozen=True, slots=True)
class EngineLoad:
    """One scrape of an engine, for one model (or the whole engine)."""

    running: int
    waiting: int
    kv_usage: float | None  # fraction of the KV cache in use, if the engine says


def _labels(text: str) -> dict[str, str]:
    """`a="x",b="y"` -> {"a": "x", "b": "y"} (Prometheus label escapes honoured)."""
    out: dict[str, str] = {}
    i, n = 0, len(text)
    while i < n:
        eq = text.find("=", i)
        if eq < 0:
            break
        name = text[i:eq].strip().lstrip(",").strip()
        j = eq + 1
        if j >= n or text[j] != '"':
            break
        j += 1
        value: list[str] = []
        while j < n and text[j] != '"':
            if text[j] == "\\" and j + 1 < n:
                j += 1
                value.append({"n": "\n"}.get(text[j], text[j]))
            else:
                value.append(text[j])
            j += 1
        out[name] = "".join(value)
        i = j + 1
    return out


def _samples(text: str) -> Iterable[tuple[str, dict[str, str], float]]:
    """(name, labels, value) of every sample whose name tierq reads."""
    for line in text.splitlines():
        if not line or line[0] == "#":
            continue
        brace = line.find("{")
        space = line.find(" ")
        if brace >= 0 and (space < 0 or brace < space):
            name = line[:brace]
            close = line.rfind("}")
            if close < brace:
                continue
            labels_text, rest = line[brace + 1:close], line[close + 1:]
        else:
            if space < 0:
                continue
            name, labels_text, rest = line[:space], "", line[space:]
        if name not in _WANTED:
            continue
        fields = rest.split()
        if not fields:
            continue
        try:
            value = float(fields[0])
        except ValueError:
            continue
        if math.isfinite(value):
            yield name, _labels(labels_text) if labels_text else {}, value


def parse_engine_load(text: str, model: str | None = None) -> EngineLoad | None:
    """The load an engine's /metrics text reports, or None if it has no load metrics.

    With `model`, only series labelled `model_name=<model>` count when any
    series carries that label value; otherwise every series counts (one engine
    per model, as vLLM and SGLang are usually run). Counts add up over series
    (vLLM v1 labels each engine core); KV usage is the highest.
    """
    return load_of(list(_samples(text)), model)


Samples = list[tuple[str, dict[str, str], float]]


def load_of(samples: Samples, model: str | None) -> EngineLoad | None:
    """`parse_engine_load` over samples already read (one page, many models)."""
    if model is not None and any(lb.get("model_name") == model for _, lb, _ in samples):
        samples = [s for s in samples if s[1].get("model_name") == model]
    found: dict[str, float] = {}
    kv: dict[str, float] = {}
    for name, _, value in samples:
        if name in _KV:
            kv[name] = max(kv.get(name, 0.0), value)
        else:
            found[name] = found.get(name, 0.0) + value
    running = next((found[n] for n in _RUNNING if n in found), None)
    waiting = next((found[n] for n in _WAITING if n in found), None)
    if running is None or waiting is None:
        return None
    kv_usage = next((kv[n] for n in _KV if n in kv), None)
    return EngineLoad(max(0, round(running)), max(0, round(waiting)),
                      None if kv_usage is None else min(1.0, max(0.0, kv_usage)))


def prefix_cache_of(samples: Samples) -> tuple[int, int] | None:
    """The engine's prefix-cache (queries, hits) in tokens, summed over its
    series (every model and engine core it runs), or None when it has none."""
    found: dict[str, float] = {}
    for name, _, value in samples:
        if name in _PREFIX_QUERIES or name in _PREFIX_HITS:
            found[name] = found.get(name, 0.0) + value
    for queries, hits in zip(_PREFIX_QUERIES, _PREFIX_HITS):
        if queries in found and hits in found:
            return max(0, round(found[queries])), max(0, round(found[hits]))
    return None


def metrics_url_for(base_url: str) -> str:
    """Where an engine whose API is at `base_url` publishes /metrics: vLLM and
    SGLang serve it at the server's root, beside /v1."""
    root = base_url.rstrip("/")
    if root.endswith("/v1"):
        root = root[: -len("/v1")]
    return root + "/metrics"


class Observer(Protocol):
    """The admission face the signals feed (tierq.Admission)."""

    @property
    def limit(self) -> int: ...

    def observe_engine(self, running: int, waiting: int, kv_usage: float | None = None) -> object: ...

    def observe_latency(self, seconds: float) -> object: ...

    def observe_overload(self) -> object: ...


@dataclass(slots=True)
class _Target:
    model: str
    admission: Observer


class EngineScraper:
    """Scrapes one upstream's /metrics and feeds every pool it serves.

    `available` says whether the last scrapes worked: while it is False the
    gateway feeds those pools time to first token instead. An engine that
    answers without load metrics (404, an unknown format) is asked again every
    `RETRY_S`, not every interval.
    """

    RETRY_S: Final = 5.0
    # Scrapes missed in a row before the engine signal counts as gone.
    STALE_AFTER: Final = 3

    def __init__(self, upstream: str, url: str, interval_s: float) -> None:
        self.upstream = upstream
        self.url = url
        self.interval_s = interval_s
        self.available = False
        self._timeout = aiohttp.ClientTimeout(total=max(1.0, 4 * interval_s))
        self._session: aiohttp.ClientSession | None = None
        self._targets: list[_Target] = []
        self._missed = 0
        self._task: asyncio.Task[None] | None = None
        # The engine's prefix-cache (queries, hits) at the last scrape that had them.
        self.prefix_cache: tuple[int, int] | None = None

    def add(self, model: str, admission: Observer) -> None:
        self._targets.append(_Target(model, admission))

    def start(self, session: aiohttp.ClientSession) -> None:
        self._session = session
        self._task = asyncio.create_task(self._run(), name=f"tierq-scrape-{self.upstream}")

    async def stop(self) -> None:
        await _cancelled(self._task)
        self._task = None

    async def scrape_once(self) -> bool:
        """One scrape; feeds the pools and returns True when it read load metrics."""
        assert self._session is not None, "start() first"
        try:
            async with self._session.get(self.url, timeout=self._timeout,
                                         allow_redirects=False) as r:
                text = await r.text() if r.status == 200 else ""
        except (aiohttp.ClientError, TimeoutError, UnicodeDecodeError):
            text = ""
        samples = list(_samples(text)) if text else []
        prefix = prefix_cache_of(samples)
        if prefix is not None:
            self.prefix_cache = prefix
        loads = [load_of(samples, t.model) for t in self._targets] if samples else []
        if not loads or any(load is None for load in loads):
            self._missed += 1
            if self.available and self._missed >= self.STALE_AFTER:
                self.available = False
                log.warning("upstream %s: no load metrics at %s; the limit follows time to "
                            "first token until they are back", self.upstream, self.url)
            return False
        if not self.available:
            log.info("upstream %s: engine load metrics at %s feed the concurrency limit",
                     self.upstream, self.url)
        self.available = True
        self._missed = 0
        for target, load in zip(self._targets, loads):
            assert load is not None
            target.admission.observe_engine(load.running, load.waiting, load.kv_usage)
        return True

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while True:
            ok = await self.scrape_once()
            step = self.interval_s if ok or self.available else self.RETRY_S
            next_at = max(next_at + step, loop.time())
            await asyncio.sleep(next_at - loop.time())


def overload_hint_s(headers: Mapping[str, str]) -> float | None:
    """The upstream's own wait on a 429/503: `retry-after-ms`, else `Retry-After`
    in seconds (an HTTP date, a negative or unreadable value: no hint)."""
    for name, scale in (("retry-after-ms", 1e-3), ("retry-after", 1.0)):
        raw = headers.get(name)
        if raw is None:
            continue
        try:
            hinted = float(raw) * scale
        except ValueError:
            continue
        if math.isfinite(hinted) and hinted >= 0:
            return hinted
    return None


def overload_backoff_s(headers: Mapping[str, str], attempt: int, remaining_s: float,
                       jitter: Callable[[], float] = random.random) -> float | None:
    """How long to hold a request an upstream answered 429/503 (its `attempt`th
    such answer, from 1) before sending it again, keeping its slot.

    The upstream's own hint (`overload_hint_s`) when it gave one, else a short
    jittered back-off: DEFAULT_OVERLOAD_BACKOFF_S doubled per attempt up to
    MAX_OVERLOAD_BACKOFF_S, times a uniform draw in [0.5, 1) (`jitter()` in [0, 1))
    so that requests refused together do not come back together. At most the
    `remaining_s` of the request's max wait, so its last try lands within it.
    None when waiting is of no use: nothing is left, or the upstream's hint is
    past what is left. The request is then shed by tierq with its own honest
    Retry-After (DESIGN.md, Slots; docs/gateway.md)."""
    hint = overload_hint_s(headers)
    if remaining_s <= 0 or (hint is not None and hint >= remaining_s):
        return None
    if hint:
        return hint
    step = min(MAX_OVERLOAD_BACKOFF_S, DEFAULT_OVERLOAD_BACKOFF_S * 2.0 ** min(attempt - 1, 16))
    return min(step * (0.5 + jitter() / 2), remaining_s)


class LimitWatch:
    """Logs a pool's limit when it has moved a lot since the last line: by a
    quarter or by 8 slots, whichever is less, at most once per `every_s`."""

    def __init__(self, pools: Sequence[tuple[str, Observer]], every_s: float = 1.0,
                 record: Callable[[list[tuple[str, int]]], None] | None = None) -> None:
        self._pools = list(pools)
        self._logged = {model: adm.limit for model, adm in self._pools}
        self._every_s = every_s
        self._record = record
        self._task: asyncio.Task[None] | None = None

    def check(self) -> None:
        if self._record is not None:
            self._record([(model, adm.limit) for model, adm in self._pools])
        for model, adm in self._pools:
            now, before = adm.limit, self._logged[model]
            if abs(now - before) >= max(1, min(8, math.ceil(before / 4))):
                log.info("pool %s: concurrency limit %d -> %d", model, before, now)
                self._logged[model] = now

    def start(self) -> None:
        async def run() -> None:
            while True:
                await asyncio.sleep(self._every_s)
                self.check()

        self._task = asyncio.create_task(run(), name="tierq-limit-watch")

    async def stop(self) -> None:
        await _cancelled(self._task)
        self._task = None



@dataclass(slots=True)
class _Feed:
    admission: Observer
    scraper: EngineScraper | None


class Capacity:
    """Every pool's signals, wired once at start-up (tierq's lifecycle).

    `first_token` and `overloaded` are what the request path calls; each is a
    dict lookup and, at most, one call into the core.
    """

    def __init__(self) -> None:
        self._feeds: dict[str, _Feed] = {}
        # A pool over several endpoints: a feed per replica, in endpoint order.
        self._replica_feeds: dict[str, list[_Feed]] = {}
        self.scrapers: dict[str, EngineScraper] = {}
        # An upstream with several endpoints: a scraper per endpoint.
        self.replica_scrapers: dict[str, list[EngineScraper]] = {}
        self.watch: LimitWatch | None = None
        self._session: aiohttp.ClientSession | None = None

    def add_upstream(self, name: str, kind: str, base_url: str | Sequence[str], metrics: bool,
                     metrics_url: str | Sequence[str] | None, interval_s: float) -> None:
        """Scrape this upstream if it is an engine kind and scraping is not off:
        each of its endpoints (`base_url`: one, or the list) at its metrics URL
        (`metrics_url`: one, the list in the same order, or None: derived)."""
        urls = (base_url,) if isinstance(base_url, str) else tuple(base_url)
        if kind not in ENGINE_KINDS or not metrics or not urls or not urls[0]:
            return
        given = (metrics_url,) if isinstance(metrics_url, str) else tuple(metrics_url or ())
        metrics_urls = [given[i] if i < len(given) else metrics_url_for(u) for i, u in enumerate(urls)]
        if len(urls) == 1:
            self.scrapers[name] = EngineScraper(name, metrics_urls[0], interval_s)
        else:
            self.replica_scrapers[name] = [EngineScraper(f"{name}[{i}]", url, interval_s)
                                           for i, url in enumerate(metrics_urls)]

    def add_pool(self, model: str, upstream_model: str, upstream: str,
                 admission: Observer, replicas: Sequence[Observer] = ()) -> None:
        """`replicas`: with several endpoints, each replica's feed in endpoint
        order (tierq.admission.ReplicaFeed); their signals move their own
        limits and, through them, the pool's."""
        if replicas:
            scrapers = self.replica_scrapers.get(upstream, [])
            feeds = []
            for i, feed in enumerate(replicas):
                scraper = scrapers[i] if i < len(scrapers) else None
                if scraper is not None:
                    scraper.add(upstream_model, feed)
                feeds.append(_Feed(feed, scraper))
            self._replica_feeds[model] = feeds
            self._feeds[model] = _Feed(admission, None)
            return
        scraper = self.scrapers.get(upstream)
        if scraper is not None:
            scraper.add(upstream_model, admission)
        self._feeds[model] = _Feed(admission, scraper)

    def _feed(self, model: str, replica: int) -> _Feed | None:
        feeds = self._replica_feeds.get(model)
        if feeds is not None:
            return feeds[replica] if replica < len(feeds) else None
        return self._feeds.get(model)

    def first_token(self, model: str, seconds: float, replica: int = 0) -> None:
        """A stream's upstream time to first token (sent to first content)."""
        feed = self._feed(model, replica)
        if feed is not None and (feed.scraper is None or not feed.scraper.available):
            feed.admission.observe_latency(seconds)

    def overloaded(self, model: str, replica: int = 0) -> None:
        feed = self._feed(model, replica)
        if feed is not None:
            feed.admission.observe_overload()

    def _all_scrapers(self) -> list[EngineScraper]:
        return [*self.scrapers.values(), *(s for ss in self.replica_scrapers.values() for s in ss)]

    def start(self, record: Callable[[list[tuple[str, int]]], None] | None = None) -> None:
        scrapers = self._all_scrapers()
        if scrapers:
            # Its own small pool: the upstream's connections can all be busy
            # with requests exactly when the engine's load matters most.
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=max(2, len(scrapers))),
                skip_auto_headers=("User-Agent",))
        for scraper in scrapers:
            assert self._session is not None
            scraper.start(self._session)
        self.watch = LimitWatch([(m, f.admission) for m, f in self._feeds.items()],
                                record=record)
        self.watch.start()

    async def stop(self) -> None:
        for scraper in self._all_scrapers():
            await scraper.stop()
        if self._session is not None:
            await self._session.close()
            self._session = None
        if self.watch is not None:
            await self.watch.stop()
