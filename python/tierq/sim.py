"""A simulated OpenAI-compatible inference backend (`tierq sim`).

It behaves like a continuous-batching engine (vLLM's scheduler in miniature) and
counts what it receives, so tests and benchmarks can prove what a gateway sent it.

Engine model:
- At most `slots` sequences run at once (vLLM's max_num_seqs). The rest wait in
  the sim's own queue: first come first served, or with `scheduling="priority"`
  by the body's int `priority` (lower first, FCFS among equals), as
  `vllm serve --scheduling-policy priority` (without its preemption).
- A sequence that leaves the queue prefills for `ttft_ms` and then has its first
  token; streams get their response headers when it leaves the queue.
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
- Past `max_waiting` queued requests a new one is refused with an OpenAI-shaped
  429 (or 503), as a hosted provider answers when overloaded.
- `/metrics` speaks vLLM's Prometheus names; capacity can change while it runs
  (`POST /sim/capacity`, `SimState.set_capacity`).

It can also misbehave on purpose (`FAULTS`), chosen per request by the
`x-sim-fault` header or a `sim_fault` body field (which passes through a gateway),
or for every request by `--fault`: that is how the reliability tests break an
upstream in each way a real one breaks.

It imports nothing of tierq: it stands in for an independent engine.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import heapq
import math
import socket
import struct
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Final

import orjson
from aiohttp import web

__all__ = ["FAULTS", "FAULT_HEADER", "METRICS_MODEL_NAME", "SCHEDULING", "SimServer", "SimState",
           "create_sim_app", "prometheus_text", "run_sim", "start_sim"]

DEFAULT_MAX_TOKENS: Final = 16
MAX_OUTPUT_TOKENS: Final = 131_072
LAST_REQUESTS_KEPT: Final = 100
SYSTEM_FINGERPRINT: Final = "fp_tierq_sim"
# Real upstreams echo a tier of their own; the gateway must overwrite it, so the
# sim always says "default" whatever it was asked.
UPSTREAM_TIER: Final = "default"
_WORDS: Final = (
    "the quick brown fox jumps over a lazy dog while "
    "seven tired engines hum under heavy load tonight"
).split()
_JSON: Final = "application/json"

SCHEDULING: Final = ("fcfs", "priority")
OVERLOAD_STATUSES: Final = (429, 503)
# /metrics copies the names, labels (model_name, engine) and text format of vLLM
# v0.10's PrometheusStatLogger (vllm/v1/metrics/loggers.py); the sim serves any
# model name, so its series carry this one, as vLLM's carry --served-model-name.
METRICS_MODEL_NAME: Final = "sim-chat"
_METRICS_CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"
FINISH_REASONS: Final = ("stop", "length", "abort")

# Ways the sim can break a chat/completions request on purpose:
#   slow-first-byte  wait `fault_delay_s` before the response starts
#   stall            start the answer (a few tokens, or half a JSON body), then go silent
#   reset            start the answer, then reset the TCP connection (RST)
#   500              an OpenAI-shaped HTTP 500
#   bad-json         200 with a body (or SSE payloads) that is not valid JSON
#   bad-sse          SSE with broken framing (no blank lines, garbage bytes) and no [DONE]
#   long-line        a stream with one valid 256 KiB SSE event (a big delta)
#   ignore-cancel    keep generating (holding the slot) after the client hangs up
#   redirect         307 to `redirect_to` (a gateway must not follow it)
FAULTS: Final = frozenset({"slow-first-byte", "stall", "reset", "500", "bad-json", "bad-sse",
                           "long-line", "ignore-cancel", "redirect"})
FAULT_HEADER: Final = "x-sim-fault"
FAULT_FIELD: Final = "sim_fault"
_FAULT_TOKENS: Final = 3  # tokens sent before a stall or reset

# How far the decode steps may fall behind their schedule and still catch up.
_MAX_LAG_S: Final = 0.1
# A sequence's life in the engine, in order.
_WAITING, _PREFILL, _DECODE, _DONE, _DROPPED = range(5)


class _Seq:
    """One sequence: waits in the queue, prefills, decodes in the batch, then is over.

    The engine advances it (`emitted` tokens exist so far); its handler awaits
    changes and writes the tokens out at its own pace, as an engine's output
    stream is decoupled from the client reading it.
    """

    __slots__ = ("n", "prompt_tokens", "priority", "model", "finish", "order", "phase",
                 "emitted", "queued_at", "started_at", "timer", "waiter")

    def __init__(self, n: int, prompt_tokens: int, priority: int | None, model: str,
                 finish: str, order: int, now: float) -> None:
        self.n = n
        self.prompt_tokens = prompt_tokens
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


def _check_slots(slots: Any) -> int:
    if not isinstance(slots, int) or isinstance(slots, bool) or slots < 1:
        raise ValueError("slots must be an integer >= 1")
    return slots


def _check_number(name: str, value: Any, *, allow_inf: bool = False) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or math.isnan(value) \
            or value < 0 or (math.isinf(value) and not allow_inf):
        raise ValueError(f"{name} must be a {'' if allow_inf else 'finite '}number >= 0")
    return float(value)


def _check_knee(knee: Any) -> float | None:
    if knee is None:
        return None
    if _check_number("batch_knee", knee, allow_inf=True) == 0:
        raise ValueError("batch_knee must be > 0 (inf: no slow-down with batch size)")
    return float(knee)


def _interval(tokens_per_s: float) -> float:
    return 0.0 if tokens_per_s in (0.0, math.inf) else 1.0 / tokens_per_s


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
    finished: dict[str, int] = field(default_factory=lambda: dict.fromkeys(FINISH_REASONS, 0))
    zombies: int = 0  # generations still running after their client left (ignore-cancel)
    _background: set[asyncio.Task[Any]] = field(default_factory=set)
    last_requests: deque[dict[str, Any]] = field(
        default_factory=lambda: deque(maxlen=LAST_REQUESTS_KEPT)
    )
    # Sequences in the order they left the waiting queue, so a test sees the
    # scheduling order without timing anything.
    last_started: deque[dict[str, Any]] = field(
        default_factory=lambda: deque(maxlen=LAST_REQUESTS_KEPT)
    )
    _queue: list[tuple[int, int, _Seq]] = field(default_factory=list)  # heap; may hold dropped
    _decoding: dict[_Seq, None] = field(default_factory=dict)  # the batch, in join order
    _step_timer: asyncio.TimerHandle | None = None
    _step_at: float = 0.0  # when the pending step ends (deadlines chain, so no drift)
    _order: int = 0
    _admitting: bool = False

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
                "tokens_per_s": self.tokens_per_s, "batch_knee": self.knee}

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
            "finished": dict(self.finished),
            "zombies": self.zombies,
            "last_requests": list(self.last_requests),
            "last_started": list(self.last_started),
        }

    # ------------------------------------------------------------ the engine

    def set_capacity(self, slots: int | None = None, ttft_ms: float | None = None,
                     tokens_per_s: float | None = None,
                     batch_knee: float | None = None) -> dict[str, Any]:
        """Change capacity while running; None leaves a setting as it is.

        More slots start waiters at once; fewer let the running sequences finish
        (no preemption). A new decode speed applies from the next step, a new
        time to first token to sequences that start from now on.
        """
        new_slots = self.slots if slots is None else _check_slots(slots)
        new_ttft = self.ttft_s if ttft_ms is None else _check_number("ttft_ms", ttft_ms) / 1000.0
        new_interval = (self.token_interval_s if tokens_per_s is None
                        else _interval(_check_number("tokens_per_s", tokens_per_s,
                                                     allow_inf=True)))
        new_knee = self.batch_knee if batch_knee is None else _check_knee(batch_knee)
        self.slots, self.ttft_s, self.batch_knee = new_slots, new_ttft, new_knee
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
               finish: str) -> _Seq | None:
        """Hand a sequence to the engine; None if it is refused (queue full)."""
        now = asyncio.get_running_loop().time()
        if (self.running >= self.slots and self.max_waiting is not None
                and self.waiting >= self.max_waiting):
            self.rejected += 1
            return None
        self._order += 1
        seq = _Seq(n_tokens, prompt_tokens, priority, model, finish, self._order, now)
        if self.running < self.slots and not self.waiting:
            self._start(seq, now)
        else:
            rank = priority if self.scheduling == "priority" and priority is not None else 0
            heapq.heappush(self._queue, (rank, seq.order, seq))
            self.waiting += 1
            self.max_waiting_seen = max(self.max_waiting_seen, self.waiting)
        return seq

    def drop(self, seq: _Seq) -> None:
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

    def _release(self, seq: _Seq) -> None:
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

    def _start(self, seq: _Seq, now: float) -> None:
        self.running += 1
        self.max_running_seen = max(self.max_running_seen, self.running)
        seq.phase = _PREFILL
        seq.started_at = now
        self.last_started.append({"model": seq.model, "priority": seq.priority,
                                  "order": seq.order, "queued_s": now - seq.queued_at})
        seq.wake()
        if self.ttft_s > 0:
            seq.timer = asyncio.get_running_loop().call_at(now + self.ttft_s, self._prefilled, seq)
        else:
            self._prefilled(seq)

    def _prefilled(self, seq: _Seq) -> None:
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

    def _finish(self, seq: _Seq) -> None:
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
        done: list[_Seq] = []
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


SIM_STATE: Final = web.AppKey("tierq_sim_state", SimState)


class _BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


def _error(status: int, message: str, param: str | None = None) -> web.Response:
    kind = "invalid_request_error" if status < 500 else "server_error"
    body = {"error": {"message": message, "type": kind, "param": param, "code": None}}
    return web.Response(status=status, body=orjson.dumps(body), content_type=_JSON)


def _json(obj: Any) -> web.Response:
    return web.Response(body=orjson.dumps(obj), content_type=_JSON)


async def _read_body(request: web.Request) -> dict[str, Any]:
    raw = await request.read()
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise _BadRequest("request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise _BadRequest("request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _BadRequest("'model' is required", "model")
    return body


def _count_words(value: Any) -> int:
    """Deterministic prompt token count: whitespace words, or list lengths for token ids."""
    if isinstance(value, str):
        return len(value.split())
    if isinstance(value, int):
        return 1
    if isinstance(value, list):
        return sum(_count_words(v) for v in value)
    if isinstance(value, dict):
        # chat content parts ({"type": "text", "text": ...}) and messages
        return _count_words(value.get("text")) + _count_words(value.get("content"))
    return 0


def _max_tokens(body: dict[str, Any]) -> int:
    for name in ("max_completion_tokens", "max_tokens"):
        value = body.get(name)
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise _BadRequest(f"'{name}' must be a non-negative integer", name)
        if value > MAX_OUTPUT_TOKENS:
            # An engine refuses beyond its context; the sim would build a huge reply.
            raise _BadRequest(f"'{name}' exceeds the sim's limit of {MAX_OUTPUT_TOKENS}", name)
        return value
    return DEFAULT_MAX_TOKENS


def _word(i: int) -> str:
    w = _WORDS[i % len(_WORDS)]
    return w if i == 0 else " " + w


_FIRST_WORD_JSON: Final = orjson.dumps(_WORDS[0])
_SPACED_WORDS_JSON: Final = tuple(orjson.dumps(" " + w) for w in _WORDS)
# Stands for a token's text in a pre-encoded stream event (see _Answer._stream).
_MARK: Final = "\x00tierq-sim-token\x00"
_MARK_JSON: Final = orjson.dumps(_MARK)


def _word_json(i: int) -> bytes:
    """orjson.dumps(_word(i)), from a table."""
    return _FIRST_WORD_JSON if i == 0 else _SPACED_WORDS_JSON[i % len(_WORDS)]


def _record(state: SimState, request: web.Request, endpoint: str, body: dict[str, Any]) -> None:
    auth = request.headers.get("Authorization")
    state.last_requests.append(
        {
            "endpoint": endpoint,
            "model": body.get("model"),
            "priority": body.get("priority"),
            "service_tier": body.get("service_tier"),
            "stream": body.get("stream"),
            "stream_options": body.get("stream_options"),
            "max_tokens": body.get("max_tokens", body.get("max_completion_tokens")),
            "keys": sorted(body),
            # A hash, never the credential itself, so a test can prove which
            # upstream key the gateway attached without the sim storing it.
            "authorization_sha256": (
                hashlib.sha256(auth.encode()).hexdigest() if auth is not None else None
            ),
        }
    )


class _Tracked:
    """Counts a request as in flight for its whole life, however it ends."""

    def __init__(self, state: SimState) -> None:
        self.state = state
        self.finished = False
        self.gone = False  # the client closed the connection under a write

    def __enter__(self) -> _Tracked:
        s = self.state
        s.requests += 1
        s.in_flight += 1
        s.max_in_flight_seen = max(s.max_in_flight_seen, s.in_flight)
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        s = self.state
        s.in_flight -= 1
        if self.gone:
            s.cancelled += 1
        elif exc_type is None:
            s.completed += 1
        elif isinstance(exc, (asyncio.CancelledError, ConnectionError)):
            s.cancelled += 1


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def _fault(request: web.Request, body: dict[str, Any], state: SimState) -> str | None:
    name = request.headers.get(FAULT_HEADER) or body.pop(FAULT_FIELD, None) or state.fault
    if name is None:
        return None
    if not isinstance(name, str) or name not in FAULTS:
        raise _BadRequest(f"unknown sim fault {name!r}; one of {sorted(FAULTS)}", FAULT_FIELD)
    state.faults[name] = state.faults.get(name, 0) + 1
    return name


def _rst(request: web.Request) -> None:
    """Abort the connection with a TCP RST, as a crashing engine's kernel would."""
    transport = request.transport
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


async def _generate(request: web.Request, chat: bool) -> web.StreamResponse:
    state = request.app[SIM_STATE]
    endpoint = "chat.completions" if chat else "completions"
    with _Tracked(state) as tracked:
        try:
            body = await _read_body(request)
            fault = _fault(request, body, state)
            if chat:
                messages = body.get("messages")
                if not isinstance(messages, list) or not messages:
                    raise _BadRequest("'messages' must be a non-empty list", "messages")
                prompt_tokens = max(1, _count_words(messages))
            else:
                if "prompt" not in body:
                    raise _BadRequest("'prompt' is required", "prompt")
                prompt_tokens = max(1, _count_words(body["prompt"]))
            n_tokens = _max_tokens(body)
            priority = body.get("priority")
            if priority is not None and (not isinstance(priority, int) or isinstance(priority, bool)):
                raise _BadRequest("'priority' must be an integer", "priority")
        except _BadRequest as e:
            return _error(400, str(e), e.param)
        _record(state, request, endpoint, body)
        if fault == "500":
            return _error(500, "simulated upstream failure (sim fault 500)")
        if fault == "redirect":
            return web.Response(status=307, headers={"Location": state.redirect_to})
        if fault == "slow-first-byte":
            await asyncio.sleep(state.fault_delay_s)
        gen = _Answer(request, state, chat, body, prompt_tokens, n_tokens, priority, fault)
        if fault != "ignore-cancel":
            try:
                return await gen.run()
            except ConnectionResetError:
                # The client hung up between two writes, before the cancellation
                # reached this handler: an engine just drops the request.
                tracked.gone = True
                return web.Response(status=499)
        # The generation outlives its request: a client (or gateway) hanging up
        # cancels the handler, not the work, and the slot stays taken until done.
        task = asyncio.ensure_future(gen.run())
        state._background.add(task)
        task.add_done_callback(state._background.discard)
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            if not task.done():
                state.zombies += 1
                task.add_done_callback(lambda _: _unzombie(state))
            raise


def _unzombie(state: SimState) -> None:
    state.zombies -= 1


class _Answer:
    """One chat/completions answer, JSON or SSE, with its fault applied."""

    def __init__(self, request: web.Request, state: SimState, chat: bool, body: dict[str, Any],
                 prompt_tokens: int, n_tokens: int, priority: int | None,
                 fault: str | None) -> None:
        self.request = request
        self.state = state
        self.chat = chat
        self.body = body
        self.prompt_tokens = prompt_tokens
        self.n_tokens = n_tokens
        self.priority = priority
        self.fault = fault
        self.dead = False  # a write failed: the rest is generated, not sent

    async def write(self, resp: web.StreamResponse, data: bytes) -> None:
        if self.dead:
            return
        try:
            await resp.write(data)
        except (ConnectionError, RuntimeError):
            if self.fault != "ignore-cancel":
                raise
            self.dead = True

    async def run(self) -> web.StreamResponse:
        body, fault = self.body, self.fault
        if body.get("stream") is not True and fault == "bad-sse":
            return web.Response(body=b"data: {\"id\": 1}\n\ndata: [DONE]\n\n",
                                content_type="text/event-stream")
        # A request that asked for a length gets "length", as an engine stops on the cap.
        finish = "length" if _max_tokens_given(body) else "stop"
        seq = self.state.submit(self.n_tokens, self.prompt_tokens, self.priority, body["model"],
                                finish)
        if seq is None:
            return _overloaded(self.state)
        try:
            if body.get("stream") is True:
                return await self._stream(seq, finish)
            return await self._json(seq, finish)
        finally:
            self.state.drop(seq)

    def _head(self, stream: bool) -> dict[str, Any]:
        chat = self.chat
        return {
            "id": ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex,
            "object": ("chat.completion.chunk" if stream else "chat.completion")
            if chat
            else "text_completion",
            "created": int(time.time()),
            "model": self.body["model"],
            "system_fingerprint": SYSTEM_FINGERPRINT,
            "service_tier": UPSTREAM_TIER,
        }

    async def _json(self, seq: _Seq, finish: str) -> web.StreamResponse:
        fault, n_tokens = self.fault, self.n_tokens
        await seq.finished()
        text = "".join(_word(i) for i in range(n_tokens))
        choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": finish}
        if self.chat:
            choice["message"] = {"role": "assistant", "content": text, "refusal": None}
        else:
            choice["text"] = text
        out = orjson.dumps({**self._head(False), "choices": [choice],
                            "usage": _usage(self.prompt_tokens, n_tokens)})
        if fault == "bad-json":
            return web.Response(body=out[: len(out) // 2], content_type=_JSON)
        if fault in ("stall", "reset"):
            # Headers promise the whole body; half of it arrives, then silence or RST.
            resp = web.StreamResponse(headers={"Content-Type": _JSON})
            resp.content_length = len(out)
            await resp.prepare(self.request)
            await resp.write(out[: len(out) // 2])
            if fault == "reset":
                _rst(self.request)
                return resp
            await asyncio.sleep(3600)
        return web.Response(body=out, content_type=_JSON)

    async def _stream(self, seq: _Seq, finish: str) -> web.StreamResponse:
        state, chat, fault, n_tokens = self.state, self.chat, self.fault, self.n_tokens
        opts = self.body.get("stream_options")
        include_usage = isinstance(opts, dict) and opts.get("include_usage") is True
        head = self._head(True)
        extra: dict[str, Any] = {"usage": None} if include_usage else {}
        sep = b"\n" if fault == "bad-sse" else b"\n\n"

        def event(obj: Any) -> bytes:
            if fault == "bad-json":
                return b"data: {" + orjson.dumps(obj)[1:-1] + b"\n\n"  # unbalanced
            return b"data: " + orjson.dumps(obj) + sep

        # Token events differ only in their text: encode the rest once, and
        # splice each token's JSON string between the two halves.
        if chat:
            choice: dict[str, Any] = {"index": 0, "delta": {"content": _MARK},
                                      "logprobs": None, "finish_reason": None}
        else:
            choice = {"index": 0, "text": _MARK, "logprobs": None, "finish_reason": None}
        pre, post = event({**head, "choices": [choice], **extra}).split(_MARK_JSON)

        await seq.started()  # headers go out as the sequence leaves the waiting queue
        resp = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await resp.prepare(self.request)
        if chat:
            # The role arrives with the first token, as engines send it.
            await seq.until(1)
            role = {"index": 0, "delta": {"role": "assistant", "content": ""},
                    "logprobs": None, "finish_reason": None}
            await self.write(resp, event({**head, "choices": [role], **extra}))
        for i in range(n_tokens):
            if seq.emitted <= i:
                await seq.until(i + 1)
            if fault in ("stall", "reset", "bad-sse") and i == _FAULT_TOKENS:
                if fault == "reset":
                    _rst(self.request)
                    return resp
                if fault == "bad-sse":
                    await self.write(resp, b"garbage without a field name\n\xff\xfe\x00\n"
                                     b"data: {\"half\": \n")
                    return resp  # the connection closes with no [DONE]
                await asyncio.sleep(3600)
            word = _word_json(i)
            if fault == "long-line" and i == 1:
                word = orjson.dumps(" " + "x" * (256 * 1024))
            await self.write(resp, pre + word + post)
            state.tokens_sent += 1
        await seq.finished()
        if chat:
            last = {"index": 0, "delta": {}, "logprobs": None, "finish_reason": finish}
        else:
            last = {"index": 0, "text": "", "logprobs": None, "finish_reason": finish}
        await self.write(resp, event({**head, "choices": [last], **extra}))
        if include_usage:
            await self.write(resp, event({**head, "choices": [],
                                          "usage": _usage(self.prompt_tokens, n_tokens)}))
        await self.write(resp, b"data: [DONE]\n\n")
        if not self.dead:
            with contextlib.suppress(ConnectionError, RuntimeError):
                await resp.write_eof()
        return resp


def _overloaded(state: SimState) -> web.Response:
    """A hosted provider's answer when its queue is full: OpenAI-shaped, with Retry-After."""
    message = (f"the engine is overloaded: {state.waiting} requests waiting "
               f"(max {state.max_waiting}); retry later")
    if state.overload_status == 429:
        kind, code = "rate_limit_error", "rate_limit_exceeded"
    else:
        kind, code = "server_error", "server_overloaded"
    body = {"error": {"message": message, "type": kind, "param": None, "code": code}}
    return web.Response(status=state.overload_status, body=orjson.dumps(body),
                        content_type=_JSON, headers={"Retry-After": "1"})


def _max_tokens_given(body: dict[str, Any]) -> bool:
    return body.get("max_completion_tokens") is not None or body.get("max_tokens") is not None


async def _chat(request: web.Request) -> web.StreamResponse:
    return await _generate(request, chat=True)


async def _completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, chat=False)


def _inputs(value: Any) -> list[Any]:
    """Split `input` into items: a string, a token list, or a list of either."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value:
        if all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            return [value]  # one token list
        if all(isinstance(v, (str, list)) for v in value):
            return list(value)
    raise _BadRequest("'input' must be a string, a list of strings or token lists", "input")


def _vector(item: Any, dim: int) -> list[float]:
    """A deterministic unit vector derived from the input's bytes."""
    seed = orjson.dumps(item)
    raw = b""
    counter = 0
    while len(raw) < 4 * dim:
        raw += hashlib.sha256(seed + counter.to_bytes(4, "little")).digest()
        counter += 1
    ints = struct.unpack(f"<{dim}I", raw[: 4 * dim])
    vec = [x / 2**31 - 1.0 for x in ints]
    norm = math.sqrt(sum(v * v for v in vec)) or 1.0
    # Rounded through float32 so the base64 and float encodings agree exactly.
    return [struct.unpack("<f", struct.pack("<f", v / norm))[0] for v in vec]


async def _embeddings(request: web.Request) -> web.StreamResponse:
    state = request.app[SIM_STATE]
    with _Tracked(state):
        try:
            body = await _read_body(request)
            items = _inputs(body.get("input"))
            dim = body.get("dimensions", state.embedding_dim)
            if dim is None:
                dim = state.embedding_dim
            if not isinstance(dim, int) or isinstance(dim, bool) or not 1 <= dim <= 4096:
                raise _BadRequest("'dimensions' must be an integer in [1, 4096]", "dimensions")
            fmt = body.get("encoding_format") or "float"
            if fmt not in ("float", "base64"):
                raise _BadRequest("'encoding_format' must be 'float' or 'base64'", "encoding_format")
        except _BadRequest as e:
            return _error(400, str(e), e.param)
        _record(state, request, "embeddings", body)
        prompt_tokens = max(1, _count_words(items))
        # An embedding is a prefill with no decode: it holds a slot for ttft_ms.
        seq = state.submit(0, prompt_tokens, None, body["model"], "stop")
        if seq is None:
            return _overloaded(state)
        try:
            await seq.finished()
        finally:
            state.drop(seq)
        data = []
        for i, item in enumerate(items):
            vec = _vector(item, dim)
            emb: Any = vec
            if fmt == "base64":
                emb = base64.b64encode(struct.pack(f"<{dim}f", *vec)).decode()
            data.append({"object": "embedding", "index": i, "embedding": emb})
        return _json(
            {
                "object": "list",
                "data": data,
                "model": body["model"],
                "service_tier": UPSTREAM_TIER,
                "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
            }
        )


async def _models(request: web.Request) -> web.StreamResponse:
    # The sim serves any model name; it lists a few so clients that probe it see a list.
    names = ("sim-chat", "sim-embed", "meta-llama/Meta-Llama-3.1-8B-Instruct")
    created = int(time.time())
    data = [{"id": n, "object": "model", "created": created, "owned_by": "tierq-sim"} for n in names]
    return _json({"object": "list", "data": data})


async def _stats(request: web.Request) -> web.StreamResponse:
    return _json(request.app[SIM_STATE].snapshot())


async def _reset(request: web.Request) -> web.StreamResponse:
    request.app[SIM_STATE].reset()
    return _json({"ok": True})


async def _set_fault(request: web.Request) -> web.StreamResponse:
    """POST {"fault": name | null}: the default fault from now on (for a sim in another process)."""
    state = request.app[SIM_STATE]
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        return _error(400, "request body is not valid JSON")
    name = body.get("fault") if isinstance(body, dict) else None
    if name is not None and name not in FAULTS:
        return _error(400, f"unknown sim fault {name!r}; one of {sorted(FAULTS)}", "fault")
    state.fault = name
    return _json({"ok": True, "fault": name})


async def _set_capacity(request: web.Request) -> web.StreamResponse:
    """POST {"slots": N, "ttft_ms": .., "tokens_per_s": .., "batch_knee": ..} (any subset)."""
    state = request.app[SIM_STATE]
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        return _error(400, "request body is not valid JSON")
    if not isinstance(body, dict):
        return _error(400, "request body must be a JSON object")
    unknown = sorted(set(body) - set(_CAPACITY_FIELDS))
    if unknown:
        return _error(400, f"unknown capacity field(s) {unknown}; one of {list(_CAPACITY_FIELDS)}",
                      unknown[0])
    try:
        capacity = state.set_capacity(**body)
    except ValueError as e:
        return _error(400, str(e))
    return _json({"ok": True, **capacity})


_CAPACITY_FIELDS: Final = ("slots", "ttft_ms", "tokens_per_s", "batch_knee")


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
    metric("vllm:request_success_total", "counter", "Requests finished, by reason.",
           [(f'{labels},finished_reason="{r}"', n) for r, n in state.finished.items()])
    return "".join(out)


async def _metrics(request: web.Request) -> web.StreamResponse:
    text = prometheus_text(request.app[SIM_STATE])
    return web.Response(body=text.encode(), headers={"Content-Type": _METRICS_CONTENT_TYPE})


def create_sim_app(
    slots: int = 8,
    ttft_ms: float = 50.0,
    tokens_per_s: float = 50.0,
    embedding_dim: int = 8,
    fault: str | None = None,
    fault_delay_ms: float = 2000.0,
    redirect_to: str | None = None,
    batch_knee: float | None = None,
    scheduling: str = "fcfs",
    max_waiting: int | None = None,
    overload_status: int = 429,
    metrics: bool = True,
) -> web.Application:
    """The sim as an aiohttp app. Serve it with handler cancellation on (see start_sim).

    slots: sequences running at once (max_num_seqs); ttft_ms: prefill time;
    tokens_per_s: a lone sequence's decode speed (0 or inf: instant);
    batch_knee: the step-time model's knee (None: 2 * slots; inf: no slow-down);
    scheduling: "fcfs" or "priority" (the body's int priority, lower first);
    max_waiting: refuse with overload_status (429 or 503) once this many wait
    (None: never); metrics: serve /metrics (False: 404, an opaque backend).
    fault: one of FAULTS applied to every chat/completions request that does not
    name its own (x-sim-fault header or sim_fault body field); None by default.
    """
    if fault is not None and fault not in FAULTS:
        raise ValueError(f"fault must be one of {sorted(FAULTS)}")
    _check_number("fault_delay_ms", fault_delay_ms)
    _check_slots(slots)
    _check_number("ttft_ms", ttft_ms)
    _check_number("tokens_per_s", tokens_per_s, allow_inf=True)
    knee = _check_knee(batch_knee)
    if scheduling not in SCHEDULING:
        raise ValueError(f"scheduling must be one of {list(SCHEDULING)}")
    if max_waiting is not None and (not isinstance(max_waiting, int)
                                    or isinstance(max_waiting, bool) or max_waiting < 0):
        raise ValueError("max_waiting must be an integer >= 0 (or None: no limit)")
    if overload_status not in OVERLOAD_STATUSES:
        raise ValueError(f"overload_status must be one of {list(OVERLOAD_STATUSES)}")
    app = web.Application()
    state = SimState(slots, ttft_ms / 1000.0, _interval(tokens_per_s), embedding_dim,
                     batch_knee=knee, scheduling=scheduling, max_waiting=max_waiting,
                     overload_status=overload_status, metrics=metrics)
    state.fault = fault
    state.fault_delay_s = fault_delay_ms / 1000.0
    if redirect_to is not None:
        state.redirect_to = redirect_to
    app[SIM_STATE] = state
    for prefix in ("/v1", "/v1/openai"):
        app.router.add_post(prefix + "/chat/completions", _chat)
        app.router.add_post(prefix + "/completions", _completions)
        app.router.add_post(prefix + "/embeddings", _embeddings)
        app.router.add_get(prefix + "/models", _models)
    if metrics:
        app.router.add_get("/metrics", _metrics)
    app.router.add_get("/sim/stats", _stats)
    app.router.add_post("/sim/reset", _reset)
    app.router.add_post("/sim/fault", _set_fault)
    app.router.add_post("/sim/capacity", _set_capacity)
    return app


class SimServer:
    """A running sim on a real socket; `url` is the OpenAI base URL (ends in /v1)."""

    def __init__(self, runner: web.AppRunner, app: web.Application, host: str, port: int) -> None:
        self._runner = runner
        self.app = app
        self.host = host
        self.port = port
        self.root = f"http://{host}:{port}"
        self.url = f"{self.root}/v1"

    @property
    def state(self) -> SimState:
        return self.app[SIM_STATE]

    def set_capacity(self, slots: int | None = None, ttft_ms: float | None = None,
                     tokens_per_s: float | None = None,
                     batch_knee: float | None = None) -> dict[str, Any]:
        """SimState.set_capacity; call it on the sim's event loop."""
        return self.state.set_capacity(slots, ttft_ms, tokens_per_s, batch_knee)

    async def close(self) -> None:
        await self._runner.cleanup()

    async def __aenter__(self) -> SimServer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


async def start_sim(host: str = "127.0.0.1", port: int = 0, **kw: Any) -> SimServer:
    """Start the sim on host:port (0 picks a free port); kw goes to create_sim_app."""
    app = create_sim_app(**kw)
    # Without handler cancellation a client that hangs up mid-stream would keep
    # its slot until the whole answer was generated; engines free it at once.
    runner = web.AppRunner(
        app, handler_cancellation=True, access_log=None, shutdown_timeout=1.0
    )
    await runner.setup()
    # A backlog as deep as the gateway's (1024): a gateway in front may open
    # hundreds of upstream connections at once, and past the default 128 the
    # kernel drops SYNs, which come back only after a 1 s retransmit.
    site = web.TCPSite(runner, host, port, backlog=1024)
    await site.start()
    bound = _bound_port(runner)
    return SimServer(runner, app, host, bound)


def _bound_port(runner: web.AppRunner) -> int:
    for addr in runner.addresses:
        if isinstance(addr, tuple) and len(addr) >= 2:
            return int(addr[1])
    raise RuntimeError("sim is not listening on a TCP port")


def run_sim(
    host: str = "127.0.0.1",
    port: int = 9000,
    slots: int = 8,
    ttft_ms: float = 50.0,
    tokens_per_s: float = 50.0,
    fault: str | None = None,
    fault_delay_ms: float = 2000.0,
    *,
    batch_knee: float | None = None,
    scheduling: str = "fcfs",
    max_waiting: int | None = None,
    overload_status: int = 429,
    metrics: bool = True,
) -> None:
    """Serve the sim until interrupted (the `tierq sim` command)."""
    import uvloop

    app = create_sim_app(slots=slots, ttft_ms=ttft_ms, tokens_per_s=tokens_per_s, fault=fault,
                         fault_delay_ms=fault_delay_ms, batch_knee=batch_knee,
                         scheduling=scheduling, max_waiting=max_waiting,
                         overload_status=overload_status, metrics=metrics)
    state = app[SIM_STATE]
    limits = (f" max_waiting={max_waiting} (then {overload_status})"
              if max_waiting is not None else "")
    print(
        f"tierq sim: http://{host}:{port}/v1 slots={slots} ttft_ms={ttft_ms:g} "
        f"tokens_per_s={tokens_per_s:g} batch_knee={state.knee:g} scheduling={scheduling}"
        f"{limits}{'' if metrics else ' no-metrics'}{f' fault={fault}' if fault else ''} "
        "(any model name)",
        flush=True,
    )
    web.run_app(
        app,
        host=host,
        port=port,
        handler_cancellation=True,
        access_log=None,
        print=None,
        shutdown_timeout=1.0,
        loop=uvloop.new_event_loop(),
    )
