"""A simulated OpenAI-compatible inference backend (`tierq sim`).

It behaves like an engine with a fixed number of generation slots, a time to first
token and a decode speed, and counts what it receives so tests can prove what a
gateway sent it (concurrency, priority fields, stream options).

It can also misbehave on purpose (`FAULTS`), chosen per request by the
`x-sim-fault` header or a `sim_fault` body field (which passes through a gateway),
or for every request by `--fault`: that is how the reliability tests break an
upstream in each way a real one breaks.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
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

__all__ = ["FAULTS", "FAULT_HEADER", "SimServer", "SimState", "create_sim_app", "run_sim",
           "start_sim"]

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


@dataclass(slots=True)
class SimState:
    """Counters behind `/sim/stats`; reset by `POST /sim/reset`."""

    slots: int
    ttft_s: float
    token_interval_s: float  # 0.0 means instant decode
    embedding_dim: int
    semaphore: asyncio.Semaphore = field(init=False)
    requests: int = 0
    in_flight: int = 0
    max_in_flight_seen: int = 0
    generating: int = 0
    max_generating_seen: int = 0
    completed: int = 0
    cancelled: int = 0
    busy_s: float = 0.0  # slot-seconds spent generating
    fault: str | None = None  # applied to every request that names none
    fault_delay_s: float = 2.0  # slow-first-byte delay
    redirect_to: str = "http://169.254.169.254/latest/meta-data/"
    faults: dict[str, int] = field(default_factory=dict)  # injected, by name
    tokens_sent: int = 0  # token chunks written to streams
    zombies: int = 0  # generations still running after their client left (ignore-cancel)
    _background: set[asyncio.Task[Any]] = field(default_factory=set)
    last_requests: deque[dict[str, Any]] = field(
        default_factory=lambda: deque(maxlen=LAST_REQUESTS_KEPT)
    )

    def __post_init__(self) -> None:
        # asyncio.Semaphore wakes waiters in FIFO order, as an engine's queue would.
        self.semaphore = asyncio.Semaphore(self.slots)

    def reset(self) -> None:
        # Gauges (in_flight, generating) describe live requests and are not zeroed;
        # their high-water marks restart from the current level.
        self.requests = self.completed = self.cancelled = self.tokens_sent = 0
        self.busy_s = 0.0
        self.faults.clear()
        self.max_in_flight_seen = self.in_flight
        self.max_generating_seen = self.generating
        self.last_requests.clear()

    def snapshot(self) -> dict[str, Any]:
        return {
            "slots": self.slots,
            "requests": self.requests,
            "in_flight": self.in_flight,
            "max_in_flight_seen": self.max_in_flight_seen,
            "generating": self.generating,
            "max_generating_seen": self.max_generating_seen,
            "waiting": self.in_flight - self.generating,
            "completed": self.completed,
            "cancelled": self.cancelled,
            "busy_s": self.busy_s,
            "fault": self.fault,
            "faults": dict(self.faults),
            "tokens_sent": self.tokens_sent,
            "zombies": self.zombies,
            "last_requests": list(self.last_requests),
        }


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


@dataclass(slots=True)
class _Generation:
    """A slot held while tokens are produced, paced from one start instant."""

    state: SimState
    n_tokens: int
    started: float = 0.0

    async def tokens(self) -> AsyncIterator[int]:
        # Deadlines are computed from the start, not slept one after another, so
        # timer slack does not accumulate into a slower stream than asked for.
        s = self.state
        for i in range(self.n_tokens):
            deadline = self.started + s.ttft_s + i * s.token_interval_s
            delay = deadline - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            yield i


class _Slot:
    def __init__(self, state: SimState) -> None:
        self.state = state
        self.t0 = 0.0

    async def __aenter__(self) -> float:
        s = self.state
        await s.semaphore.acquire()
        s.generating += 1
        s.max_generating_seen = max(s.max_generating_seen, s.generating)
        self.t0 = time.monotonic()
        return self.t0

    async def __aexit__(self, exc_type: object, exc: object, tb: object) -> None:
        s = self.state
        s.generating -= 1
        s.busy_s += time.monotonic() - self.t0
        s.semaphore.release()


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def _sse(obj: Any) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


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
        gen = _Answer(request, state, chat, body, prompt_tokens, n_tokens, fault)
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
                 prompt_tokens: int, n_tokens: int, fault: str | None) -> None:
        self.request = request
        self.state = state
        self.chat = chat
        self.body = body
        self.prompt_tokens = prompt_tokens
        self.n_tokens = n_tokens
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
        state, chat, body, fault = self.state, self.chat, self.body, self.fault
        n_tokens = self.n_tokens
        stream = body.get("stream") is True
        opts = body.get("stream_options")
        include_usage = stream and isinstance(opts, dict) and opts.get("include_usage") is True
        # A request that asked for a length gets "length", as an engine stops on the cap.
        finish = "length" if _max_tokens_given(body) else "stop"
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        head = {
            "id": rid,
            "object": ("chat.completion.chunk" if stream else "chat.completion")
            if chat
            else "text_completion",
            "created": int(time.time()),
            "model": body["model"],
            "system_fingerprint": SYSTEM_FINGERPRINT,
            "service_tier": UPSTREAM_TIER,
        }
        gen = _Generation(state, n_tokens)
        if not stream:
            if fault == "bad-sse":
                return web.Response(body=b"data: {\"id\": 1}\n\ndata: [DONE]\n\n",
                                    content_type="text/event-stream")
            async with _Slot(state) as gen.started:
                async for _ in gen.tokens():
                    pass
                if n_tokens == 0:
                    await _sleep_until(gen.started + state.ttft_s)
            text = "".join(_word(i) for i in range(n_tokens))
            choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": finish}
            if chat:
                choice["message"] = {"role": "assistant", "content": text, "refusal": None}
            else:
                choice["text"] = text
            out = orjson.dumps({**head, "choices": [choice],
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

        resp = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        async with _Slot(state) as gen.started:
            await resp.prepare(self.request)
            extra: dict[str, Any] = {"usage": None} if include_usage else {}
            sep = b"\n" if fault == "bad-sse" else b"\n\n"

            def event(obj: Any) -> bytes:
                if fault == "bad-json":
                    return b"data: {" + orjson.dumps(obj)[1:-1] + b"\n\n"  # unbalanced
                return b"data: " + orjson.dumps(obj) + sep

            if chat:
                # The role arrives with the first token, as engines send it.
                await _sleep_until(gen.started + state.ttft_s)
                role = {"index": 0, "delta": {"role": "assistant", "content": ""},
                        "logprobs": None, "finish_reason": None}
                await self.write(resp, event({**head, "choices": [role], **extra}))
            async for i in gen.tokens():
                if fault in ("stall", "reset", "bad-sse") and i == _FAULT_TOKENS:
                    if fault == "reset":
                        _rst(self.request)
                        return resp
                    if fault == "bad-sse":
                        await self.write(resp, b"garbage without a field name\n\xff\xfe\x00\n"
                                         b"data: {\"half\": \n")
                        return resp  # the connection closes with no [DONE]
                    await asyncio.sleep(3600)
                word = _word(i)
                if fault == "long-line" and i == 1:
                    word = " " + "x" * (256 * 1024)
                if chat:
                    choice = {"index": 0, "delta": {"content": word},
                              "logprobs": None, "finish_reason": None}
                else:
                    choice = {"index": 0, "text": word, "logprobs": None,
                              "finish_reason": None}
                await self.write(resp, event({**head, "choices": [choice], **extra}))
                state.tokens_sent += 1
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


def _max_tokens_given(body: dict[str, Any]) -> bool:
    return body.get("max_completion_tokens") is not None or body.get("max_tokens") is not None


async def _sleep_until(deadline: float) -> None:
    delay = deadline - time.monotonic()
    if delay > 0:
        await asyncio.sleep(delay)


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
        async with _Slot(state) as started:
            await _sleep_until(started + state.ttft_s)
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


def create_sim_app(
    slots: int = 8,
    ttft_ms: float = 50.0,
    tokens_per_s: float = 50.0,
    embedding_dim: int = 8,
    fault: str | None = None,
    fault_delay_ms: float = 2000.0,
    redirect_to: str | None = None,
) -> web.Application:
    """The sim as an aiohttp app. Serve it with handler cancellation on (see start_sim).

    fault: one of FAULTS applied to every chat/completions request that does not
    name its own (x-sim-fault header or sim_fault body field); None by default.
    """
    if fault is not None and fault not in FAULTS:
        raise ValueError(f"fault must be one of {sorted(FAULTS)}")
    if fault_delay_ms < 0 or not math.isfinite(fault_delay_ms):
        raise ValueError("fault_delay_ms must be a finite number >= 0")
    if slots < 1:
        raise ValueError("slots must be at least 1")
    if ttft_ms < 0 or not math.isfinite(ttft_ms):
        raise ValueError("ttft_ms must be a finite number >= 0")
    if tokens_per_s < 0 or math.isnan(tokens_per_s):
        raise ValueError("tokens_per_s must be >= 0 (0 or inf means instant)")
    interval = 0.0 if tokens_per_s in (0.0, math.inf) else 1.0 / tokens_per_s
    app = web.Application()
    state = SimState(slots, ttft_ms / 1000.0, interval, embedding_dim)
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
    app.router.add_get("/sim/stats", _stats)
    app.router.add_post("/sim/reset", _reset)
    app.router.add_post("/sim/fault", _set_fault)
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
) -> None:
    """Serve the sim until interrupted (the `tierq sim` command)."""
    import uvloop

    app = create_sim_app(slots=slots, ttft_ms=ttft_ms, tokens_per_s=tokens_per_s, fault=fault,
                         fault_delay_ms=fault_delay_ms)
    print(
        f"tierq sim: http://{host}:{port}/v1 slots={slots} ttft_ms={ttft_ms} "
        f"tokens_per_s={tokens_per_s}{f' fault={fault}' if fault else ''} (any model name)",
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
