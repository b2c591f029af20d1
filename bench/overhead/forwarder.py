"""The bare aiohttp+uvloop forwarder tierq is measured against: everything a Python
proxy must do (read, forward, stream back) and nothing else.
Usage: python forwarder.py UPSTREAM_ROOT PORT"""
import sys

import aiohttp
import uvloop
from aiohttp import web

UPSTREAM, PORT = sys.argv[1].rstrip("/"), int(sys.argv[2])
HOP = {"host", "transfer-encoding", "connection", "keep-alive", "content-length"}


async def session(app: web.Application):
    app["s"] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), auto_decompress=False)
    yield
    await app["s"].close()


async def forward(req: web.Request) -> web.StreamResponse:
    body = await req.read()
    headers = {k: v for k, v in req.headers.items() if k.lower() not in HOP}
    async with req.app["s"].request(req.method, UPSTREAM + req.path_qs, data=body,
                                    headers=headers, allow_redirects=False) as up:
        resp = web.StreamResponse(status=up.status, headers={
            k: v for k, v in up.headers.items() if k.lower() not in HOP})
        if up.content_length is not None:
            resp.content_length = up.content_length
        await resp.prepare(req)
        async for chunk in up.content.iter_any():
            await resp.write(chunk)
        await resp.write_eof()
        return resp


app = web.Application()
app.cleanup_ctx.append(session)
app.router.add_route("*", "/{tail:.*}", forward)
web.run_app(app, host="127.0.0.1", port=PORT, access_log=None, print=None,
            handler_cancellation=True, loop=uvloop.new_event_loop())
