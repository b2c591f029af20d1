"""The relays: an upstream's answer sent on to the client, its tier echoed and its
cost added, as one JSON body or as a stream of SSE events, each write under the
client write timeout, the bill committed before the client sees the end.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Final, NoReturn

import aiohttp
import orjson
from aiohttp import web

from tierq.errors import JSON_TYPE, ApiError
from tierq.gateway import GATEWAY
from tierq.intake import estimate_output_tokens
from tierq.outcome import (CLIENT_CLOSED, DRAIN_CODE, Exchange, Refused, cancelled, failed, partial,
                           served)
from tierq.pricing import render_femto
from tierq.sse import (DONE_EVENT, Rewritten, StreamRewriter, UpstreamStreamError, encode_event,
                       usage_tokens)
from tierq.tracing import response_model
from tierq.upstream_core import CoreResponse, SseBatch
from tierq.watchdog import ClientWriteTimeout

__all__ = ["relay_json", "relay_stream", "upstream_error", "write"]

# A JSON answer up to this size is sent in one write after its bill is committed
# (see relay_json); half the transport's 64 KiB high-water mark.
_ONE_WRITE_MAX: Final = 32 * 1024
SSE_TYPE: Final = "text/event-stream; charset=utf-8"


Upstream = aiohttp.ClientResponse | CoreResponse  # what either client answers


async def upstream_error(ex: Exchange, up: Upstream) -> NoReturn:
    """The upstream answered an error status: its own 4xx error body passed on, else a 502."""
    raw = await up.read()
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        data = None
    code = f"upstream_{up.status}"
    if up.status < 500 and isinstance(data, dict) and isinstance(data.get("error"), dict):
        # The engine's own 4xx (bad parameter, context too long): the client's to fix.
        raise Refused(failed(code, up.status, upstream_status=up.status),
                      ApiError(up.status, str(data["error"].get("message")), body=data))
    raise Refused(failed(code, 502, upstream_status=up.status),
                  ApiError(502, f"The upstream serving this model answered HTTP {up.status}.",
                           "server_error", None, "upstream_error"))


async def write(request: web.Request, resp: web.StreamResponse, data: bytes, *,
                 last: bool = False) -> None:
    """Send `data` (and end the response if `last`), waiting for the client to
    read (aiohttp's drain is the backpressure) at most `write_timeout_s`
    (tierq.watchdog); past it the connection is cut and ClientWriteTimeout raised."""
    transport = request.transport
    if transport is None:
        raise ConnectionResetError("Cannot write to closing transport")
    watchdog = request.app[GATEWAY].watchdog
    watchdog.begin(transport)
    try:
        await (resp.write_eof(data) if last else resp.write(data))
    except BaseException as e:
        if not watchdog.end(transport):
            raise
        if isinstance(e, asyncio.CancelledError):
            # The cancel came from aiohttp seeing the aborted connection, not
            # from anyone who wants this task to stop: it is the timeout.
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
        raise ClientWriteTimeout() from None
    if watchdog.end(transport):
        raise ClientWriteTimeout()


async def relay_json(request: web.Request, ex: Exchange,
                     up: Upstream) -> web.StreamResponse:
    raw = await up.read()
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        data = None
    if not isinstance(data, dict):
        raise Refused(failed("upstream_bad_response"), ApiError(
            502, "The upstream answered with something that is not a JSON object.",
            "server_error", None, "upstream_bad_response"))
    usage = data.get("usage")
    tokens = usage_tokens(usage)
    code = None
    if tokens is None:
        # An upstream that reports no usage is billed on an estimate, and the
        # estimate is what the response says, so billed still equals echoed.
        tokens = (ex.est_prompt, estimate_output_tokens(data))
        usage = {"prompt_tokens": tokens[0], "completion_tokens": tokens[1],
                 "total_tokens": tokens[0] + tokens[1]}
        data["usage"] = usage
        code = "usage_estimated"
    amount = ex.cost(*tokens)
    if ex.trace is not None:
        model = data.get("model")
        ex.response_model = model if isinstance(model, str) else None
    data["service_tier"] = ex.tier
    assert isinstance(usage, dict)
    usage["estimated_cost"] = render_femto(amount)
    out = orjson.dumps(data)
    transport = request.transport
    if transport is None or transport.is_closing():
        # The client left while the upstream answered: nothing was delivered
        # (and nobody reads the answer).
        raise Refused(cancelled("client_disconnected"),
                      ApiError(CLIENT_CLOSED, "The client closed the request.", code="client_disconnected"))
    # The usual case: a body this small goes into the socket without waiting on
    # the client (nothing is queued ahead of it and it is below the transport's
    # high-water mark), so no write timeout is needed: the bill is committed,
    # then aiohttp sends headers and body in one write.
    one_write = len(out) <= _ONE_WRITE_MAX and transport.get_write_buffer_size() == 0
    resp: web.StreamResponse | None = None
    if not one_write:
        # A large body may have to wait for the client to read: it is written
        # here, under the write timeout, as all but the last byte, then the
        # bill (committed before the client can see a complete response), then
        # the last byte.
        resp = web.StreamResponse(headers=ex.headers())
        resp.content_length = len(out)
        await resp.prepare(request)
        try:
            await write(request, resp, out[:-1])
        except (ClientWriteTimeout, ConnectionResetError) as e:
            # A JSON body cut short is of no use to the client: nothing is billed.
            ex.finish(cancelled("client_write_timeout" if isinstance(e, ClientWriteTimeout)
                                else "client_disconnected"))
            return resp
    await ex.commit(served(tokens[0], tokens[1], code, cost=amount))
    if resp is None:
        return web.Response(body=out, headers=ex.headers())
    try:
        await write(request, resp, out[-1:], last=True)
    except (ClientWriteTimeout, ConnectionResetError):
        pass  # billed already: all but one byte was delivered
    return resp


async def relay_stream(
    request: web.Request, ex: Exchange, up: Upstream, client_wants_usage: bool,
) -> web.StreamResponse:
    # The upstream's first read comes before the response begins: an engine
    # that breaks before sending anything (killed, reset) leaves the client
    # untouched, so the request may still go to another replica (tierq.app).
    # The core client's reads come rewritten already (its last one is the
    # rewriter's close); aiohttp's are raw.
    core_reads: AsyncIterator[tuple[SseBatch, bool]] | None = None
    core_first: tuple[SseBatch, bool] | None = None
    chunks: AsyncIterator[bytes] | None
    if isinstance(up, CoreResponse):
        core_reads = up.batches()
        core_first = await anext(core_reads, None)
        chunks = None
        first = b""
    else:
        chunks = up.content.iter_any()
        first = await anext(chunks, b"")
    headers = ex.headers(SSE_TYPE)
    headers["Cache-Control"] = "no-cache"
    headers["X-Accel-Buffering"] = "no"
    resp = web.StreamResponse(status=200, headers=headers)
    ex.replied = True
    await resp.prepare(request)
    rewriter = StreamRewriter(ex.tier, client_wants_usage, ex.cost)
    delivered = 0  # tokens written to the client

    async def relay(read: Rewritten) -> bool:
        """Send what one read completed, in one write; True at [DONE]."""
        nonlocal delivered
        if read.data:  # sent even when a later event is [DONE] or broken
            if ex.trace is not None and ex.response_model is None and ex.trace.sampled:
                ex.response_model = response_model(read.data)
            await write(request, resp, read.data)
            delivered += read.tokens
            if delivered and ex.ttft_s is None:
                now = time.monotonic()
                ex.ttft_s = now - ex.t0
                # The upstream's own time to first token (from sending), which
                # an opaque upstream's learned limit holds against its floor.
                ex.gw.capacity.first_token(ex.pool.entry.id, now - ex.sent_at, ex.replica)
        if read.error is not None:
            raise read.error
        return read.done

    def bill_cut_short(code: str | None = None) -> None:
        # The client went away (or stopped reading) mid-stream: bill what was
        # delivered, mark it partial. Leaving `up`'s context closes the upstream
        # connection, which cancels the generation there; leaving the admission
        # context frees the slot.
        if ex.done:
            return
        if code is None:
            code = DRAIN_CODE if ex.gw.draining else "client_disconnected"
        # A drain cuts a stream the client was still reading (answered 200);
        # otherwise the client is the one who left.
        status = 200 if code == DRAIN_CODE else CLIENT_CLOSED
        usage = rewriter.usage
        # Nothing the client could use delivered: nothing is billed.
        ex.finish(cancelled(code, status) if delivered == 0 else
                  partial(usage[0] if usage else ex.est_prompt,
                          min(delivered, usage[1]) if usage else delivered, code, status))

    try:
        try:
            # Everything one read brings is rewritten and sent in one write: one
            # event per write while the client keeps up, fewer writes (and system
            # calls) per event when the gateway is behind.
            if core_reads is not None:
                assert isinstance(up, CoreResponse)
                complete = False
                read = core_first
                while read is not None:
                    batch, last = read
                    if await relay(rewriter.rewritten(*batch)):
                        complete = True
                        break
                    up.ack(len(batch[0]))  # written: the core reads on
                    read = None if last else await anext(core_reads, None)
            else:
                assert chunks is not None
                complete = bool(first) and await relay(rewriter.feed(first))
                if not complete:
                    async for chunk in chunks:
                        if await relay(rewriter.feed(chunk)):
                            complete = True
                            break
                if not complete:
                    complete = await relay(rewriter.close())
            if not complete:
                raise UpstreamStreamError(None)
        except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, TimeoutError,
                UpstreamStreamError) as e:
            if isinstance(e, ConnectionResetError):
                raise  # our write to the client failed: handled below as a disconnect
            # The upstream broke the stream: nothing is billed for a broken answer.
            if not ex.done:
                ex.finish(failed("upstream_stream_error", 200, prompt=ex.est_prompt,
                                 completion=delivered, delivered=delivered > 0))
            err = e.obj if isinstance(e, UpstreamStreamError) and e.obj is not None else {
                "error": {"message": "The upstream stream ended before it was complete.",
                          "type": "server_error", "param": None, "code": "upstream_stream_error"},
                "service_tier": ex.tier}
            await write(request, resp, encode_event(err), last=True)
        else:
            # [DONE]: the bill is committed before the client sees the end.
            prompt, completion = rewriter.usage or (ex.est_prompt, delivered)
            await ex.commit(served(prompt, completion,
                                   None if rewriter.usage else "usage_estimated"))
            await write(request, resp, DONE_EVENT, last=True)
    except asyncio.CancelledError:
        bill_cut_short()
        raise
    except ConnectionResetError:
        bill_cut_short()
    except ClientWriteTimeout:
        bill_cut_short("client_write_timeout")  # a no-op once the row is in
    return resp

