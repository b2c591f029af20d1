"""A TCP relay a test owns, between the gateway hosts and Redis: it can slow
every call (each chunk toward the server held `delay_s`, so a round trip gains
that much, pipelining kept) or cut the link (a black hole: nothing passes
either way and new connections are accepted but never served, as a network
split looks to a client). Its own event loop in a thread, so a test's load on
its loop does not skew the delay.
"""

from __future__ import annotations

import asyncio
import threading
import time

from ports import free_port


class Relay:
    """127.0.0.1:`port` relayed to `target_host`:`target_port`."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.delay_s = 0.0
        self._cut = False
        self._loop = asyncio.new_event_loop()
        self._conns: set[asyncio.StreamWriter] = set()
        self._server: asyncio.Server | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, name="tcp-relay", daemon=True)
        self.connections = 0  # accepted so far
        self.chunks = 0  # relayed toward the server so far
        self.port = free_port()

    @property
    def cut_off(self) -> bool:
        return self._cut

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def start(self) -> None:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._listen(), self._loop).result(10)

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)

    def cut(self) -> None:
        """The split: every open connection goes silent, new ones hang."""
        self._cut = True

    def heal(self) -> None:
        """The split is over: connections that hung are dropped (their clients
        have long given up), new ones pass."""
        self._cut = False

        def drop() -> None:
            for w in list(self._conns):
                w.transport.abort()

        self._loop.call_soon_threadsafe(drop)

    def stop(self) -> None:
        """Stops listening, ends every connection and every task of the relay
        on its own loop (each awaited, so none is left for the garbage
        collector to finish on a closed loop), then ends the loop."""
        async def close() -> None:
            if self._server is not None:
                self._server.close()
            me = asyncio.current_task()
            while tasks := [t for t in asyncio.all_tasks() if t is not me]:
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
            if self._server is not None:
                await self._server.wait_closed()
            await asyncio.sleep(0)  # the aborted transports' connection_lost callbacks

        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        self._loop.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._conns.add(writer)
        try:
            if self._cut:
                await reader.read()  # hangs until the client or heal() drops it
                return
            up_r, up_w = await asyncio.open_connection(*self.target)
            self._conns.add(up_w)
            try:
                await asyncio.gather(self._pump(reader, up_w, delayed=True),
                                     self._pump(up_r, writer, delayed=False))
            finally:
                self._conns.discard(up_w)
                up_w.transport.abort()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            self._conns.discard(writer)
            writer.transport.abort()

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter,
                    delayed: bool) -> None:
        """Copies `src` to `dst`; toward the server each chunk waits `delay_s`
        from its arrival (in order, so calls in flight overlap as they would on
        a slow link). While cut, nothing is copied."""
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def send() -> None:
            while True:
                due, data = await queue.get()
                if not data:
                    return
                wait = due - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                if not self._cut:
                    dst.write(data)
                    await dst.drain()

        sender = asyncio.create_task(send())
        try:
            while True:
                data = await src.read(65536)
                if delayed and data:
                    self.chunks += 1
                await queue.put((time.monotonic() + (self.delay_s if delayed else 0.0), data))
                if not data:
                    break
            await sender
        finally:
            sender.cancel()
            dst.transport.abort()
            await asyncio.gather(sender, return_exceptions=True)

