"""A minimal multi-worker admission proxy in front of the sim, for the worker
tests: `tierq.workers` supervisor + shared pools, one aiohttp app per worker
that admits through the shared pool and forwards to the sim. Each worker also
listens on its own port (DEBUG_PORTS[index]) so a test can choose the worker.

    python tests/_workers_app.py PORT DEBUG_PORTS(comma-separated) SIM_URL WORKERS MAX_CONCURRENCY
"""

from __future__ import annotations

import asyncio
import os
import sys

import aiohttp
import uvloop
from aiohttp import web

from tierq.admission import Shed
from tierq import PoolSettings
from tierq.workers import SharedPools, Supervisor, listen


def main() -> int:
    port, debug_ports, sim, workers, max_conc = sys.argv[1:6]
    debug = [int(p) for p in debug_ports.split(",")]
    shared = SharedPools({"m": PoolSettings(max_concurrency=int(max_conc), queue_depth=256,
                                            max_wait_ms=20000)}, int(workers))
    sock = listen("127.0.0.1", int(port))

    def target(index: int) -> int:
        async def serve() -> None:
            pools = shared.attach(index)
            pools.start()
            adm = pools["m"]
            http = aiohttp.ClientSession()

            async def chat(request: web.Request) -> web.Response:
                body = await request.json()
                tier = "priority" if body.get("service_tier") == "priority" else "default"
                try:
                    async with adm.acquire(tier):
                        async with http.post(f"{sim}/v1/chat/completions", json=body) as r:
                            data = await r.read()
                except Shed as e:
                    return web.json_response({"error": {"code": e.code}}, status=429)
                return web.Response(body=data, content_type="application/json",
                                    headers={"x-worker": str(index), "x-pid": str(os.getpid())})

            async def stats(request: web.Request) -> web.Response:
                return web.json_response({"worker": index, "pid": os.getpid(), **adm.stats()})

            app = web.Application()
            app.router.add_post("/v1/chat/completions", chat)
            app.router.add_get("/admission", stats)
            runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
            await runner.setup()
            await web.SockSite(runner, sock).start()
            await web.TCPSite(runner, "127.0.0.1", debug[index], reuse_address=True).start()
            stop = asyncio.Event()
            asyncio.get_running_loop().add_signal_handler(15, stop.set)
            await stop.wait()
            await runner.cleanup()
            await http.close()
            pools.stop()

        uvloop.run(serve())
        return 0

    print("ready", flush=True)
    try:
        return Supervisor(int(workers), target, shared, grace_s=5).run()
    finally:
        shared.close()


if __name__ == "__main__":
    sys.exit(main())
