"""A simulated OpenAI-compatible inference backend (`tierq sim`).

It behaves like a continuous-batching engine (vLLM's scheduler in miniature) and
counts what it receives, so tests and benchmarks can prove what a gateway sent it.

The engine model (slots, its own queue, prefill, the shared decode step) is
tierq.sim_engine; this module is its HTTP face: the OpenAI routes (chat and
completions, streamed or not, embeddings, models), a request past `max_waiting`
refused with an OpenAI-shaped 429 (or 503) as a hosted provider answers when
overloaded, `/metrics` in vLLM's Prometheus names, and `/sim/stats`, `/sim/reset`,
`/sim/fault`, `/sim/capacity` (docs/sim.md).

It can also misbehave on purpose (`FAULTS`), chosen per request by the
`x-sim-fault` header or a `sim_fault` body field (which passes through a gateway),
or for every request by `--fault`: that is how the reliability tests break an
upstream in each way a real one breaks.

It imports nothing of tierq but its engine: it stands in for an independent one.
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
from typing import Any, Final

import orjson
from aiohttp import web

from tierq.sim_engine import (
    METRICS_MODEL_NAME,
    SCHEDULING,
    Seq,
    SimState,
    check_cache_tokens,
    check_knee,
    check_number,
    check_slots,
    prometheus_text,
    token_interval,
)

__all__ = ["FAULTS", "FAULT_HEADER", "METRICS_MODEL_NAME", "SCHEDULING", "SimServer", "SimState",
           "create_sim_app", "prometheus_text", "rendered_prompt", "run_sim", "start_sim"]

DEFAULT_MAX_TOKENS: Final = 16
MAX_OUTPUT_TOKENS: Final = 131_072
SYSTEM_FINGERPRINT: Final = "fp_tierq_sim"
# Real upstreams echo a tier of their own; the gateway must overwrite it, so the
# sim always says "default" whatever it was asked.
UPSTREAM_TIER: Final = "default"
_WORDS: Final = (
    "the quick brown fox jumps over a lazy dog while "
    "seven tired engines hum under heavy load tonight"
).split()
_JSON: Final = "application/json"

OVERLOAD_STATUSES: Final = (429, 503)
_METRICS_CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"

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


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: their text, joined with nothing between
        parts = (p.get("text") if isinstance(p, dict) else p for p in content)
        return "".join(p for p in parts if isinstance(p, str))
    return ""


def rendered_prompt(body: dict[str, Any], chat: bool) -> str:
    """The prompt as one text, the prefix cache's input (docs/sim.md, "Prefix cache").

    Chat: each message as its role, a newline, its text and a blank line.
    Completions: the prompt (a list of prompts: its strings joined by newlines).
    """
    if chat:
        return "".join(f"{m.get('role', '')}\n{_content_text(m.get('content'))}\n\n"
                       for m in body["messages"] if isinstance(m, dict))
    prompt = body["prompt"]
    if isinstance(prompt, list):
        return "\n".join(p for p in prompt if isinstance(p, str))
    return prompt if isinstance(prompt, str) else ""


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
            # The W3C trace context the gateway passed on ([tracing]).
            "traceparent": request.headers.get("traceparent"),
            "tracestate": request.headers.get("tracestate"),
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
        state.background.add(task)
        task.add_done_callback(state.background.discard)
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
        prompt = rendered_prompt(body, self.chat) if self.state.prefix_cache_tokens else None
        seq = self.state.submit(self.n_tokens, self.prompt_tokens, self.priority, body["model"],
                                finish, prompt)
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

    async def _json(self, seq: Seq, finish: str) -> web.StreamResponse:
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

    async def _stream(self, seq: Seq, finish: str) -> web.StreamResponse:
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


async def _reset_prefix_cache(request: web.Request) -> web.StreamResponse:
    """Forget every cached prefix block, as vLLM's POST /reset_prefix_cache."""
    request.app[SIM_STATE].clear_prefix_cache()
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
    """POST {"slots": N, "ttft_ms": .., "tokens_per_s": .., "batch_knee": ..,
    "prefill_tokens_per_s": ..} (any subset)."""
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


_CAPACITY_FIELDS: Final = ("slots", "ttft_ms", "tokens_per_s", "batch_knee",
                           "prefill_tokens_per_s")


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
    prefill_tokens_per_s: float = 0.0,
    prefix_cache_tokens: int = 0,
) -> web.Application:
    """The sim as an aiohttp app. Serve it with handler cancellation on (see start_sim).

    slots: sequences running at once (max_num_seqs); ttft_ms: prefill time;
    tokens_per_s: a lone sequence's decode speed (0 or inf: instant);
    batch_knee: the step-time model's knee (None: 2 * slots; inf: no slow-down);
    scheduling: "fcfs" or "priority" (the body's int priority, lower first);
    max_waiting: refuse with overload_status (429 or 503) once this many wait
    (None: never); metrics: serve /metrics (False: 404, an opaque backend).
    prefill_tokens_per_s: the engine's prefill speed for prompt tokens not in
    its prefix cache (0: prefill is ttft_ms alone); prefix_cache_tokens: the
    prefix cache's size in tokens (0: no cache).
    fault: one of FAULTS applied to every chat/completions request that does not
    name its own (x-sim-fault header or sim_fault body field); None by default.
    """
    if fault is not None and fault not in FAULTS:
        raise ValueError(f"fault must be one of {sorted(FAULTS)}")
    check_number("fault_delay_ms", fault_delay_ms)
    check_slots(slots)
    check_number("ttft_ms", ttft_ms)
    check_number("tokens_per_s", tokens_per_s, allow_inf=True)
    knee = check_knee(batch_knee)
    check_number("prefill_tokens_per_s", prefill_tokens_per_s, allow_inf=True)
    check_cache_tokens(prefix_cache_tokens)
    if scheduling not in SCHEDULING:
        raise ValueError(f"scheduling must be one of {list(SCHEDULING)}")
    if max_waiting is not None and (not isinstance(max_waiting, int)
                                    or isinstance(max_waiting, bool) or max_waiting < 0):
        raise ValueError("max_waiting must be an integer >= 0 (or None: no limit)")
    if overload_status not in OVERLOAD_STATUSES:
        raise ValueError(f"overload_status must be one of {list(OVERLOAD_STATUSES)}")
    app = web.Application()
    state = SimState(slots, ttft_ms / 1000.0, token_interval(tokens_per_s), embedding_dim,
                     batch_knee=knee, scheduling=scheduling, max_waiting=max_waiting,
                     overload_status=overload_status, metrics=metrics,
                     prefill_tokens_per_s=float(prefill_tokens_per_s),
                     prefix_cache_tokens=prefix_cache_tokens)
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
    app.router.add_post("/reset_prefix_cache", _reset_prefix_cache)
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
                     tokens_per_s: float | None = None, batch_knee: float | None = None,
                     prefill_tokens_per_s: float | None = None) -> dict[str, Any]:
        """SimState.set_capacity; call it on the sim's event loop."""
        return self.state.set_capacity(slots, ttft_ms, tokens_per_s, batch_knee,
                                       prefill_tokens_per_s)

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
    prefill_tokens_per_s: float = 0.0,
    prefix_cache_tokens: int = 0,
) -> None:
    """Serve the sim until interrupted (the `tierq sim` command)."""
    import uvloop

    app = create_sim_app(slots=slots, ttft_ms=ttft_ms, tokens_per_s=tokens_per_s, fault=fault,
                         fault_delay_ms=fault_delay_ms, batch_knee=batch_knee,
                         scheduling=scheduling, max_waiting=max_waiting,
                         overload_status=overload_status, metrics=metrics,
                         prefill_tokens_per_s=prefill_tokens_per_s,
                         prefix_cache_tokens=prefix_cache_tokens)
    state = app[SIM_STATE]
    limits = (f" max_waiting={max_waiting} (then {overload_status})"
              if max_waiting is not None else "")
    if prefill_tokens_per_s:
        limits += f" prefill_tokens_per_s={prefill_tokens_per_s:g}"
    if prefix_cache_tokens:
        limits += f" prefix_cache_tokens={prefix_cache_tokens}"
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
