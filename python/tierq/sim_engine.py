"""The simulated backend's engine model (tierq.sim serves it over HTTP).

A continuous-batching engine (vLLM's scheduler in miniature):
- At most `slots` sequences run at once (vLLM's max_num_seqs). The rest wait in
  the sim's own queue: first come first served, or with `scheduling="priority"`
  by the body's int `priority` (lower first, FCFS among equals), as
  `vllm serve --scheduling-policy priority` (without its preemption).
- A sequence that leaves the queue prefills and then has its first token
  (tierq.sim starts a stream's response when it leaves the queue). Prefill is
  `ttft_ms` per sequence, plus, with `prefill_tokens_per_s`, its prompt tokens
  not already in the prefix cache at that speed on one prefill unit the engine
  shares (first come first served), as an engine's prefill compute is shared.
- The prefix cache (`prefix_cache_tokens`, 0: off) is an LRU of prompt blocks:
  the leading fixed-size blocks of the prompt text, each keyed by a hash
  chained on the block before, so a block hits only if every block before it
  does.
  Its queries and hits are counted in tokens, as vLLM counts them.
- Every further token comes from a decode step shared by all decoding sequences
  (one step timer per sim, not a timer per token per sequence): each step emits
  one token to every sequence in the batch. A step over a batch of b takes

      step(b) = (1 / tokens_per_s) * (1 + (b - 1) / batch_knee)

  so a lone sequence decodes at tokens_per_s (the flag's old meaning), each one
  slows as the batch grows, and total throughput b / step(b) still rises with b
  towards tokens_per_s * batch_knee: the knee. batch_knee defaults to 2 * slots,
  so a full batch decodes each sequence at about 2/3 of tokens_per_s while it
  produces about 2/3 * slots * tokens_per_s in total. tokens_per_s 0 (or inf)
  means instant decode. Prefilling sequences do not count in b. (docs/sim.md)
- Past `max_waiting` queued sequences a new one is refused (`submit` -> None).
- `prometheus_text` is its load in vLLM's Prometheus names; capacity can change
  while it runs (`SimState.set_capacity`).

It imports nothing of tierq and nothing of HTTP: it stands in for an engine.
"""

from __future__ import annotations

import asyncio
import hashlib
import heapq
import math
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any, Final

__all__ = ["BLOCK_CHARS", "FINISH_REASONS", "METRICS_MODEL_NAME", "SCHEDULING", "Seq", "SimState",
           "check_cache_tokens", "check_knee", "check_number", "check_slots", "prefix_blocks",
           "prometheus_text", "token_interval"]

LAST_REQUESTS_KEPT: Final = 100
SCHEDULING: Final = ("fcfs", "priority")
# /metrics copies the names, labels (model_name, engine) and text format of vLLM
# v0.10's PrometheusStatLogger (vllm/v1/metrics/loggers.py); the sim serves any
# model name, so its series carry this one, as vLLM's carry --served-model-name.
METRICS_MODEL_NAME: Final = "sim-chat"
FINISH_REASONS: Final = ("stop", "length", "abort")
# The prefix cache's block: this many characters of the rendered prompt, the
# size the gateway's prefix routing hashes (docs/sim.md states the rule).
BLOCK_CHARS: Final = 256

# How far the decode steps may fall behind their schedule and still catch up.
_MAX_LAG_S: Final = 0.1
# A sequence's life in the engine, in order.
_WAITING, _PREFILL, _DECODE, _DONE, _DROPPED = range(5)


class Seq:
    """One sequence: waits in the queue, prefills, decodes in the batch, then is over.

    The engine advances it (`emitted` tokens exist so far); its handler awaits
    changes and writes the tokens out at its own pace, as an engine's output
    stream is decoupled from the client reading it.
    """

    __slots__ = ("n", "prompt_tokens", "blocks", "priority", "model", "finish", "order", "phase",
                 "emitted", "queued_at", "started_at", "timer", "waiter")

    def __init__(self, n: int, prompt_tokens: int, priority: int | None, model: str,
                 finish: str, order: int, now: float,
                 blocks: tuple[tuple[bytes, int], ...] = ()) -> None:
        self.n = n
        self.prompt_tokens = prompt_tokens
        self.blocks = blocks  # (key, tokens) of its prompt's prefix blocks, in order
        self.priority = priority
        self.model = model
        self.finish = finish
        self.order = order  # arrival order in the engine: FCFS tie-break
        self.phase = _WAITING
        self.emitted = 0
        self.queued_at = now
        self.started_at = now
        self.timer: asyncio.TimerHandle | None = None  # end of prefill
        self.waiter: asyncio.Future[None] | None = None

    def wake(self) -> None:
        w = self.waiter
        if w is not None:
            self.waiter = None
            if not w.done():
                w.set_result(None)

    async def _change(self) -> None:
        self.waiter = asyncio.get_running_loop().create_future()
        await self.waiter

    async def started(self) -> None:
        """Until it leaves the waiting queue."""
        while self.phase == _WAITING:
            await self._change()

    async def until(self, tokens: int) -> None:
        """Until `tokens` tokens exist, or the generation is over."""
        while self.emitted < tokens and self.phase < _DONE:
            await self._change()

    async def finished(self) -> None:
        while self.phase < _DONE:
            await self._change()


def check_slots(slots: Any) -> int:
    if not isinstance(slots, int) or isinstance(slots, bool) or slots < 1:
        raise ValueError("slots must be an integer >= 1")
    return slots


def check_number(name: str, value: Any, *, allow_inf: bool = False) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or math.isnan(value) \
            or value < 0 or (math.isinf(value) and not allow_inf):
        raise ValueError(f"{name} must be a {'' if allow_inf else 'finite '}number >= 0")
    return float(value)


def check_knee(knee: Any) -> float | None:
    if knee is None:
        return None
    if check_number("batch_knee", knee, allow_inf=True) == 0:
        raise ValueError("batch_knee must be > 0 (inf: no slow-down with batch size)")
    return float(knee)


def check_cache_tokens(tokens: Any) -> int:
    if not isinstance(tokens, int) or isinstance(tokens, bool) or tokens < 0:
        raise ValueError("prefix_cache_tokens must be an integer >= 0 (0: no prefix cache)")
    return tokens


def token_interval(tokens_per_s: float) -> float:
    return 0.0 if tokens_per_s in (0.0, math.inf) else 1.0 / tokens_per_s


def prefix_blocks(text: str, tokens: int) -> tuple[tuple[bytes, int], ...]:
    """The prefix cache's blocks of a prompt: (key, tokens) for each full block.

    A block is BLOCK_CHARS characters of `text` (a trailing partial block is not
    cached, as an engine caches only full blocks). Its key chains on the one
    before, BLAKE2b-64(key before || block's UTF-8) from empty, as the gateway's
    route key does: equal keys mean equal prefixes. The prompt's `tokens` are
    spread over its characters: the first k blocks hold
    tokens * (k * BLOCK_CHARS) // len(text) of them.
    """
    full = len(text) // BLOCK_CHARS
    out: list[tuple[bytes, int]] = []
    key = b""
    before = 0
    for i in range(full):
        end = (i + 1) * BLOCK_CHARS
        key = hashlib.blake2b(key + text[i * BLOCK_CHARS:end].encode(), digest_size=8).digest()
        upto = tokens * end // len(text)
        out.append((key, upto - before))
        before = upto
    return tuple(out)


@dataclass(slots=True)
class SimState:
    """The engine (queue, batch, step timer) and the counters behind `/sim/stats`.

    Counters are reset by `POST /sim/reset`; capacity is changed by
    `set_capacity` (`POST /sim/capacity`).
    """

    slots: int
    ttft_s: float
    token_interval_s: float  # 0.0 means instant decode
    embedding_dim: int
    batch_knee: float | None = None  # None: 2 * slots (see knee)
    scheduling: str = "fcfs"
    max_waiting: int | None = None  # refuse new requests once this many wait
    overload_status: int = 429
    metrics: bool = True
    prefill_tokens_per_s: float = 0.0  # 0: prefill is ttft_s alone, whatever the prompt
    prefix_cache_tokens: int = 0  # the LRU's size in tokens; 0: no prefix cache
    requests: int = 0  # received (any endpoint, however they end)
    in_flight: int = 0  # received and not yet answered: waiting, running, or neither yet
    max_in_flight_seen: int = 0
    running: int = 0  # out of the waiting queue: prefilling or decoding (<= slots)
    max_running_seen: int = 0
    waiting: int = 0  # in the engine's waiting queue
    max_waiting_seen: int = 0
    completed: int = 0
    cancelled: int = 0
    rejected: int = 0  # refused past max_waiting (429/503)
    busy_s: float = 0.0  # slot-seconds spent running
    fault: str | None = None  # applied to every request that names none
    fault_delay_s: float = 2.0  # slow-first-byte delay
    redirect_to: str = "http://169.254.169.254/latest/meta-data/"
    faults: dict[str, int] = field(default_factory=dict)  # injected, by name
    tokens_sent: int = 0  # token chunks written to streams
    tokens_generated: int = 0  # tokens the engine produced (streamed or not)
    prompt_tokens: int = 0  # prefilled
    steps: int = 0  # decode steps run
    prefix_cache_queries: int = 0  # prompt tokens looked up in the prefix cache
    prefix_cache_hits: int = 0  # of those, tokens found cached (not prefilled again)
    finished: dict[str, int] = field(default_factory=lambda: dict.fromkeys(FINISH_REASONS, 0))
    zombies: int = 0  # generations still running after their client left (ignore-cancel)
    background: set[asyncio.Task[Any]] = field(default_factory=set)
    last_requests: deque[dict[str, Any]] = field(
        default_factory=lambda: deque(maxlen=LAST_REQUESTS_KEPT)
    )
    # Sequences in the order they left the waiting queue, so a test sees the
    # scheduling order without timing anything.
    last_started: deque[dict[str, Any]] = field(
        default_factory=lambda: deque(maxlen=LAST_REQUESTS_KEPT)
    )
    _queue: list[tuple[int, int, Seq]] = field(default_factory=list)  # heap; may hold dropped
    _decoding: dict[Seq, None] = field(default_factory=dict)  # the batch, in join order
    _step_timer: asyncio.TimerHandle | None = None
    _step_at: float = 0.0  # when the pending step ends (deadlines chain, so no drift)
    _order: int = 0
    _admitting: bool = False
    # The prefix cache: block key -> its tokens, least recently used first.
    _cache: OrderedDict[bytes, int] = field(default_factory=OrderedDict)
    _cache_used: int = 0  # tokens held (sum of _cache's values)
    _prefill_free_at: float = 0.0  # when the shared prefill unit has done all it was given

    @property
    def generating(self) -> int:
        """The older name of `running`."""
        return self.running

    @property
    def knee(self) -> float:
        return self.batch_knee if self.batch_knee is not None else 2.0 * self.slots

    @property
    def tokens_per_s(self) -> float:
        return 1.0 / self.token_interval_s if self.token_interval_s else 0.0

    def step_s(self, batch: int) -> float:
        """One decode step's duration for a batch of `batch` sequences (module docstring)."""
        return self.token_interval_s * (1.0 + (max(batch, 1) - 1) / self.knee)

    def reset(self) -> None:
        # Gauges (in_flight, running, waiting) describe live requests and are not
        # zeroed; their high-water marks restart from the current level.
        self.requests = self.completed = self.cancelled = self.tokens_sent = 0
        self.rejected = self.tokens_generated = self.prompt_tokens = self.steps = 0
        self.prefix_cache_queries = self.prefix_cache_hits = 0
        self.busy_s = 0.0
        self.faults.clear()
        self.finished = dict.fromkeys(FINISH_REASONS, 0)
        self.max_in_flight_seen = self.in_flight
        self.max_running_seen = self.running
        self.max_waiting_seen = self.waiting
        self.last_requests.clear()
        self.last_started.clear()

    def capacity(self) -> dict[str, Any]:
        return {"slots": self.slots, "ttft_ms": self.ttft_s * 1000.0,
                "tokens_per_s": self.tokens_per_s, "batch_knee": self.knee,
                "prefill_tokens_per_s": self.prefill_tokens_per_s}

    def clear_prefix_cache(self) -> None:
        """Forget every cached block (vLLM's POST /reset_prefix_cache)."""
        self._cache.clear()
        self._cache_used = 0

    def snapshot(self) -> dict[str, Any]:
        return {
            **self.capacity(),
            "scheduling": self.scheduling,
            "max_waiting": self.max_waiting,
            "overload_status": self.overload_status,
            "requests": self.requests,
            "in_flight": self.in_flight,
            "max_in_flight_seen": self.max_in_flight_seen,
            "running": self.running,
            "max_running_seen": self.max_running_seen,
            "waiting": self.waiting,
            "max_waiting_seen": self.max_waiting_seen,
            "batch": len(self._decoding),
            # older names of running and max_running_seen
            "generating": self.running,
            "max_generating_seen": self.max_running_seen,
            "completed": self.completed,
            "cancelled": self.cancelled,
            "rejected": self.rejected,
            "busy_s": self.busy_s,
            "fault": self.fault,
            "faults": dict(self.faults),
            "tokens_sent": self.tokens_sent,
            "tokens_generated": self.tokens_generated,
            "steps": self.steps,
            "prefix_cache_tokens": self.prefix_cache_tokens,
            "prefix_cache_queries": self.prefix_cache_queries,
            "prefix_cache_hits": self.prefix_cache_hits,
            "prefix_cache_used_tokens": self._cache_used,
            "prefix_cache_blocks": len(self._cache),
            "finished": dict(self.finished),
            "zombies": self.zombies,
            "last_requests": list(self.last_requests),
            "last_started": list(self.last_started),
        }

    # ------------------------------------------------------------ the engine

    def set_capacity(self, slots: int | None = None, ttft_ms: float | None = None,
                     tokens_per_s: float | None = None, batch_knee: float | None = None,
                     prefill_tokens_per_s: float | None = None) -> dict[str, Any]:
        """Change capacity while running; None leaves a setting as it is.

        More slots start waiters at once; fewer let the running sequences finish
        (no preemption). A new decode speed applies from the next step, a new
        time to first token or prefill speed to sequences that start from now on.
        """
        new_prefill = (self.prefill_tokens_per_s if prefill_tokens_per_s is None
                       else check_number("prefill_tokens_per_s", prefill_tokens_per_s,
                                         allow_inf=True))
        new_slots = self.slots if slots is None else check_slots(slots)
        new_ttft = self.ttft_s if ttft_ms is None else check_number("ttft_ms", ttft_ms) / 1000.0
        new_interval = (self.token_interval_s if tokens_per_s is None
                        else token_interval(check_number("tokens_per_s", tokens_per_s,
                                                     allow_inf=True)))
        new_knee = self.batch_knee if batch_knee is None else check_knee(batch_knee)
        self.slots, self.ttft_s, self.batch_knee = new_slots, new_ttft, new_knee
        self.prefill_tokens_per_s = new_prefill
        if new_interval != self.token_interval_s:
            self.token_interval_s = new_interval
            if self._step_timer is not None:
                # Restart the pending step at the new speed, counted from now.
                self._step_timer.cancel()
                self._step_timer = None
                if new_interval == 0.0:
                    self._step()  # instant decode: the batch completes at once
                else:
                    self._kick()
        self._admit()
        return self.capacity()

    def submit(self, n_tokens: int, prompt_tokens: int, priority: int | None, model: str,
               finish: str, prompt: str | None = None) -> Seq | None:
        """Hand a sequence to the engine; None if it is refused (queue full).

        `prompt` is its rendered prompt text, for the prefix cache (None: not cached).
        """
        now = asyncio.get_running_loop().time()
        if (self.running >= self.slots and self.max_waiting is not None
                and self.waiting >= self.max_waiting):
            self.rejected += 1
            return None
        self._order += 1
        blocks = (prefix_blocks(prompt, prompt_tokens)
                  if prompt is not None and self.prefix_cache_tokens else ())
        seq = Seq(n_tokens, prompt_tokens, priority, model, finish, self._order, now, blocks)
        if self.running < self.slots and not self.waiting:
            self._start(seq, now)
        else:
            rank = priority if self.scheduling == "priority" and priority is not None else 0
            heapq.heappush(self._queue, (rank, seq.order, seq))
            self.waiting += 1
            self.max_waiting_seen = max(self.max_waiting_seen, self.waiting)
        return seq

    def drop(self, seq: Seq) -> None:
        """Its handler is gone (answered, hung up, failed): free whatever it holds."""
        phase = seq.phase
        if phase >= _DONE:
            return
        seq.phase = _DROPPED
        self.finished["abort"] += 1
        if phase == _WAITING:
            self.waiting -= 1
            if not self.waiting:
                self._queue.clear()  # only dropped entries are left
            return
        if seq.timer is not None:
            seq.timer.cancel()
            seq.timer = None
        if seq in self._decoding:
            del self._decoding[seq]
            if not self._decoding and self._step_timer is not None:
                self._step_timer.cancel()
                self._step_timer = None
        self._release(seq)

    def _release(self, seq: Seq) -> None:
        self.running -= 1
        self.busy_s += asyncio.get_running_loop().time() - seq.started_at
        self._admit()

    def _admit(self) -> None:
        # Not re-entrant: a sequence that starts and finishes at once (no prefill,
        # instant decode) calls back here, and this loop already goes on.
        if self._admitting:
            return
        self._admitting = True
        try:
            q = self._queue
            while q and self.running < self.slots:
                seq = heapq.heappop(q)[2]
                if seq.phase == _WAITING:
                    self.waiting -= 1
                    self._start(seq, asyncio.get_running_loop().time())
        finally:
            self._admitting = False

    def _start(self, seq: Seq, now: float) -> None:
        self.running += 1
        self.max_running_seen = max(self.max_running_seen, self.running)
        seq.phase = _PREFILL
        seq.started_at = now
        cached = self._lookup(seq)
        # The uncached tokens queue for the one prefill unit; ttft_s is each
        # sequence's own and overlaps the others'.
        speed = self.prefill_tokens_per_s
        compute = 0.0
        first = now + self.ttft_s
        if speed and speed != math.inf:
            compute = (seq.prompt_tokens - cached) / speed
            self._prefill_free_at = max(now, self._prefill_free_at) + compute
            first = self._prefill_free_at + self.ttft_s
        self.last_started.append({"model": seq.model, "priority": seq.priority,
                                  "order": seq.order, "queued_s": now - seq.queued_at,
                                  "prompt_tokens": seq.prompt_tokens, "cached_tokens": cached,
                                  "prefill_s": compute, "first_token_in_s": first - now})
        seq.wake()
        if first > now:
            seq.timer = asyncio.get_running_loop().call_at(first, self._prefilled, seq)
        else:
            self._prefilled(seq)

    def _lookup(self, seq: Seq) -> int:
        """Its cached prompt tokens; then its blocks are the most recently used.

        A block hits only while every block before it did. At least the prompt's
        last token is always computed, as an engine computes it to sample from.
        The blocks enter the cache as the sequence starts: the prefill unit is
        first come first served, so a later sequence's prefill begins only
        after they are computed.
        """
        if not self.prefix_cache_tokens:
            return 0
        cache = self._cache
        hit = 0
        for key, tokens in seq.blocks:
            if key not in cache:
                break
            hit += tokens
        cached = max(0, min(hit, seq.prompt_tokens - 1))
        self.prefix_cache_queries += seq.prompt_tokens
        self.prefix_cache_hits += cached
        # Last block first, so the first block is the most recent of them and a
        # prompt's tail is evicted before its head (vLLM frees blocks in the
        # same reverse order): a head without its tail still hits.
        for key, tokens in reversed(seq.blocks):
            if key in cache:
                cache.move_to_end(key)
            else:
                cache[key] = tokens
                self._cache_used += tokens
        while self._cache_used > self.prefix_cache_tokens:
            self._cache_used -= cache.popitem(last=False)[1]
        return cached

    def _prefilled(self, seq: Seq) -> None:
        # Prefill produces the first token; instant decode produces them all.
        seq.timer = None
        self.prompt_tokens += seq.prompt_tokens
        made = min(seq.n, 1 if self.token_interval_s else seq.n)
        seq.emitted = made
        self.tokens_generated += made
        if made >= seq.n:
            self._finish(seq)
            return
        seq.phase = _DECODE
        self._decoding[seq] = None
        self._kick()
        seq.wake()

    def _finish(self, seq: Seq) -> None:
        seq.phase = _DONE
        self.finished[seq.finish] += 1
        seq.wake()
        self._release(seq)

    def _kick(self) -> None:
        """Start the step timer if the batch has sequences and no step is pending."""
        if self._step_timer is None and self._decoding:
            loop = asyncio.get_running_loop()
            self._step_at = loop.time() + self.step_s(len(self._decoding))
            self._step_timer = loop.call_at(self._step_at, self._step)

    def _step(self) -> None:
        """One decode step: a token to every sequence in the batch."""
        self._step_timer = None
        self.steps += 1
        instant = not self.token_interval_s
        done: list[Seq] = []
        made = 0
        for seq in self._decoding:
            add = seq.n - seq.emitted if instant else 1
            seq.emitted += add
            made += add
            if seq.emitted >= seq.n:
                done.append(seq)
            else:
                seq.wake()
        self.tokens_generated += made
        for seq in done:
            del self._decoding[seq]
        if self._decoding:
            # The next step's deadline chains on this one's, so a late timer
            # (a busy host) does not slow decoding: the steps it missed run at
            # once. Further behind than _MAX_LAG_S it resyncs instead of bursting.
            loop = asyncio.get_running_loop()
            step = self.step_s(len(self._decoding))
            now = loop.time()
            at = self._step_at + step
            if at < now - _MAX_LAG_S:
                at = now
            self._step_at = at
            self._step_timer = loop.call_at(at, self._step)
        for seq in done:
            self._finish(seq)


def prometheus_text(state: SimState) -> str:
    """The engine's gauges and counters as vLLM's /metrics writes them (text format 0.0.4).

    kv_cache_usage_perc is running / slots (0..1): the sim's KV cache is its slots.
    """
    labels = f'engine="0",model_name="{METRICS_MODEL_NAME}"'
    usage = min(1.0, state.running / state.slots)
    out: list[str] = []

    def metric(name: str, kind: str, doc: str, samples: list[tuple[str, float]]) -> None:
        out.append(f"# HELP {name} {doc}\n# TYPE {name} {kind}\n")
        out.extend(f"{name}{{{lab}}} {float(value)!r}\n" for lab, value in samples)

    metric("vllm:num_requests_running", "gauge", "Requests in the running batch.",
           [(labels, state.running)])
    metric("vllm:num_requests_waiting", "gauge", "Requests in the waiting queue.",
           [(labels, state.waiting)])
    metric("vllm:kv_cache_usage_perc", "gauge", "KV-cache usage, 1 is full (sim: running/slots).",
           [(labels, usage)])
    # The name before vLLM 0.9, for scrapers written against older releases.
    metric("vllm:gpu_cache_usage_perc", "gauge", "Deprecated name of vllm:kv_cache_usage_perc.",
           [(labels, usage)])
    metric("vllm:num_preemptions_total", "counter", "Preemptions (the sim never preempts).",
           [(labels, 0)])
    metric("vllm:prompt_tokens_total", "counter", "Prefill tokens processed.",
           [(labels, state.prompt_tokens)])
    metric("vllm:generation_tokens_total", "counter", "Generation tokens processed.",
           [(labels, state.tokens_generated)])
    # vLLM v1 counts both in tokens: every prompt's tokens are queried, the
    # cached ones hit (hits / queries is the token hit rate).
    metric("vllm:prefix_cache_queries_total", "counter",
           "Prefix cache queries, in terms of number of queried tokens.",
           [(labels, state.prefix_cache_queries)])
    metric("vllm:prefix_cache_hits_total", "counter",
           "Prefix cache hits, in terms of number of cached tokens.",
           [(labels, state.prefix_cache_hits)])
    metric("vllm:request_success_total", "counter", "Requests finished, by reason.",
           [(f'{labels},finished_reason="{r}"', n) for r, n in state.finished.items()])
    return "".join(out)
