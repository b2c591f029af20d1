"""One request at a time through the core's upstream client alone (tierq.upstream_core,
no gateway) against a raw-socket HTTP server in its own process that answers every
request with one small JSON answer in one write: wall time and event-loop thread CPU
per request, and how often the loop was woken (the client's eventfd) per request.
Run it with each build's python to compare two builds (interleave the runs).

    TREE/.venv/bin/python bench/overhead/client_c1.py [N]
"""
from __future__ import annotations

import asyncio
import socket
import sys
import threading
import time

import uvloop

BODY = b'{"id":"x","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"hi"}}],"usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5}}'
RESP = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (len(BODY), BODY)

def serve(port_out):
    ls = socket.socket(); ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(("127.0.0.1", 0)); ls.listen(64); port_out.append(ls.getsockname()[1])
    def conn(s):
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        buf = b""
        while True:
            d = s.recv(65536)
            if not d: return
            buf += d
            while b"\r\n\r\n" in buf:
                head, rest = buf.split(b"\r\n\r\n", 1)
                n = 0
                for l in head.split(b"\r\n"):
                    if l.lower().startswith(b"content-length:"): n = int(l.split(b":")[1])
                if len(rest) < n: break
                buf = rest[n:]
                s.sendall(RESP)
    while True:
        c, _ = ls.accept(); threading.Thread(target=conn, args=(c,), daemon=True).start()

async def main(n):
    from tierq.upstream_core import CoreUpstreams
    import multiprocessing as mp
    q = mp.get_context('fork').SimpleQueue()
    def child():
        port=[]; threading.Thread(target=serve, args=(port,), daemon=True).start()
        while not port: time.sleep(0.01)
        q.put(port[0]); time.sleep(3600)
    p = mp.get_context('fork').Process(target=child, daemon=True); p.start()
    port = [q.get()]
    up = CoreUpstreams.attach(); cl = up.add_client(5.0, 10.0, 4, None)
    wakes = [0]; orig = up._ready
    def counted():
        wakes[0] += 1; orig()
    loop = asyncio.get_running_loop(); loop.remove_reader(up._core.fd); loop.add_reader(up._core.fd, counted)
    url = f"http://127.0.0.1:{port[0]}/v1/chat/completions"; hdr = [("Content-Type", "application/json")]
    async def one():
        async with up.post(cl, url, hdr, b'{"model":"m"}', None) as r:
            await r.read()
    for _ in range(200): await one()
    wakes[0] = 0; c0 = time.thread_time(); t0 = time.perf_counter()
    for _ in range(n): await one()
    t = time.perf_counter() - t0; c = time.thread_time() - c0
    print(f"{t/n*1e6:.1f} us/req wall, {c/n*1e6:.1f} us/req loop CPU, {wakes[0]/n:.3f} wakes/req")

uvloop.install()
asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 4000))
