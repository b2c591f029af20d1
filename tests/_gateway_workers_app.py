"""`tierq serve --workers N` (tierq.cli.worker_app per worker), plus one
extra listening port per worker so a test can choose the worker.

    python tests/_gateway_workers_app.py CONFIG PORT DEBUG_PORTS(comma-separated)
"""

from __future__ import annotations

import asyncio
import signal
import sys

import uvloop
from aiohttp import web

from tierq.served import Catalog
from tierq.cli import worker_app
from tierq.config import load_config
from tierq.workers import SharedPools, Supervisor, listen


def main() -> int:
    config_path, port, debug_ports = sys.argv[1:4]
    config = load_config(config_path)
    debug = [int(p) for p in debug_ports.split(",")]
    catalog = Catalog.from_config(config)
    shared = SharedPools({m.id: m.admission.settings for m in catalog.values()}, len(debug),
                         key_capacity=config.keys.table_capacity)
    sock = listen("127.0.0.1", int(port))

    def target(index: int) -> int:
        async def serve() -> None:
            pools = shared.attach(index)
            pools.start()
            runner = web.AppRunner(worker_app(config, False, pools), access_log=None)
            await runner.setup()
            await web.SockSite(runner, sock).start()
            await web.TCPSite(runner, "127.0.0.1", debug[index], reuse_address=True).start()
            stop = asyncio.Event()
            asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
            await stop.wait()
            await runner.cleanup()
            pools.stop()

        uvloop.run(serve())
        return 0

    try:
        return Supervisor(len(debug), target, shared, grace_s=5).run()
    finally:
        shared.close()


if __name__ == "__main__":
    sys.exit(main())
