"""The `tierq` command: serve, sim, demo, usage, keys, models.

`serve` with no config runs the embedded default (built-in catalog, in-process
sim, ./tierq.db) and says so in its first log line. A ConfigError is printed as
its one line on stderr with exit status 2, never as a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import random
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any

from tierq.catalog import Catalog
from tierq.config import (
    AdmissionConfig,
    Config,
    ConfigError,
    LedgerConfig,
    ModelConfig,
    SimSettings,
    UpstreamConfig,
    default_config,
    load_config,
)
from tierq.pricing import decimal_text

__all__ = ["main"]

log = logging.getLogger("tierq")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # `usage` and `keys` belong to tierq.ledger / tierq.keys: hand them the rest
    # of the line untouched (their own --help included).
    if argv and argv[0] == "usage":
        from tierq.ledger import usage_main

        return usage_main(argv[1:])
    if argv and argv[0] == "keys":
        from tierq.keys import keys_main

        return keys_main(argv[1:])
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(args.func(args))
    except ConfigError as e:
        print(str(e), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tierq", description="OpenAI-compatible gateway that "
                                "sells a priority service tier.")
    sub = p.add_subparsers(dest="command")

    s = sub.add_parser("serve", help="run the gateway")
    s.add_argument("--config", help="TOML file (default: the embedded default)")
    s.add_argument("--host", help="listen address (default: [server] host)")
    s.add_argument("--port", type=int, help="listen port (default: [server] port)")
    s.add_argument("--workers", type=int, help="processes (only 1 for now)")
    s.add_argument("--insecure-no-auth", action="store_true",
                   help="listen on a non-loopback address with no API keys configured")
    s.set_defaults(func=_serve)

    s = sub.add_parser("sim", help="run a simulated OpenAI-compatible backend")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=9000)
    s.add_argument("--slots", type=int, default=8)
    s.add_argument("--ttft-ms", type=float, default=50.0)
    s.add_argument("--tokens-per-s", type=float, default=50.0)
    s.set_defaults(func=_sim)

    s = sub.add_parser("demo", help="gateway + sim + an overload run: priority vs default")
    s.add_argument("--duration", type=float, default=20.0, help="seconds of load (default 20)")
    s.add_argument("--clients", type=int, default=32, help="concurrent clients (default 32)")
    s.add_argument("--priority-share", type=float, default=0.25,
                   help="share of requests sent with service_tier=priority (default 0.25)")
    s.set_defaults(func=_demo)

    # Listed for --help only; main() delegates them before parsing.
    sub.add_parser("usage", help="spend by key, model and tier (see tierq usage --help)")
    sub.add_parser("keys", help="create, list, revoke API keys (see tierq keys --help)")

    s = sub.add_parser("models", help="list served models with prices and the priority tag")
    s.add_argument("--config", help="TOML file (default: the built-in catalog)")
    s.set_defaults(func=_models)
    return p


# ------------------------------------------------------------------ serve


def _is_loopback_host(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _describe(config: Config, catalog: Catalog) -> str:
    n_pri = sum(1 for m in catalog.values() if m.priority)
    ups = ", ".join(
        f"{u.name} (in-process simulated backend on a free loopback port: {u.sim.slots} slots, "
        f"{u.sim.ttft_ms:g} ms to first token, {u.sim.tokens_per_s:g} tokens/s)"
        if u.kind == "sim" and u.sim is not None else f"{u.name} ({u.kind} {u.base_url})"
        for u in config.upstreams)
    what = ("built-in catalog" if not config.models else "configured models")
    head = ("no config file: embedded default" if config.source is None
            else f"config {config.source}")
    return (f"tierq serve: {head}: {what}, {len(catalog)} models ({n_pri} priority-enabled); "
            f"upstreams: {ups}; ledger {config.ledger.url}")


def _serve(args: argparse.Namespace) -> int:
    config = load_config(args.config) if args.config else default_config()
    host = args.host or config.server.host
    port = args.port if args.port is not None else config.server.port
    workers = args.workers or config.server.workers
    if workers != 1:
        print(f"tierq serve: --workers {workers}: more than one worker is not supported yet "
              "(one process for now)", file=sys.stderr)
        return 2
    no_keys = config.keys.path is None
    if no_keys and not _is_loopback_host(host) and not args.insecure_no_auth:
        print(f"tierq serve: refusing to listen on {host} with no API keys configured; "
              "add [keys] to the config, listen on 127.0.0.1, or pass --insecure-no-auth",
              file=sys.stderr)
        return 2
    catalog = Catalog.from_config(config)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s",
                        stream=sys.stderr)
    # The first log line says what is being served, on what, billed where.
    log.info("%s", _describe(config, catalog))
    if no_keys:
        log.info("no API keys configured: serving %s clients only",
                 "all (--insecure-no-auth)" if args.insecure_no_auth else "loopback")
    import uvloop

    uvloop.run(_run_server(config, host, port, args.insecure_no_auth))
    return 0


async def _run_server(config: Config, host: str, port: int, insecure: bool) -> None:
    from aiohttp import web

    from tierq.app import create_app, runner_kwargs

    app = create_app(config, allow_remote_without_keys=insecure)
    runner = web.AppRunner(app, **runner_kwargs())
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port, backlog=1024)
        await site.start()
        log.info("listening on http://%s:%d/v1 (also /v1/openai)", host, port)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        log.info("shutting down")
    finally:
        await runner.cleanup()


# ------------------------------------------------------------------ sim


def _sim(args: argparse.Namespace) -> int:
    from tierq.sim import run_sim

    run_sim(args.host, args.port, args.slots, args.ttft_ms, args.tokens_per_s)
    return 0


# ------------------------------------------------------------------ models


def _models(args: argparse.Namespace) -> int:
    config = load_config(args.config) if args.config else default_config()
    catalog = Catalog.from_config(config)
    mult = config.pricing.priority_multiplier
    rows = [("MODEL", "INPUT/1M", "OUTPUT/1M", "TIER", "UPSTREAM")]
    for m in catalog.values():
        rows.append((m.id, "$" + decimal_text(m.prices.input_per_m),
                     "$" + decimal_text(m.prices.output_per_m),
                     f"priority ({decimal_text(mult)}x)" if m.priority else "-", m.upstream))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    n_pri = sum(1 for m in catalog.values() if m.priority)
    print(f"\n{len(catalog)} models, {n_pri} priority-enabled; prices in USD per 1M tokens "
          "(default tier)")
    return 0


# ------------------------------------------------------------------ demo


DEMO_MODEL = "meta-llama/Meta-Llama-3.1-8B-Instruct"


def _demo(args: argparse.Namespace) -> int:
    import uvloop

    if args.duration <= 0 or args.clients < 1 or not 0 <= args.priority_share <= 1:
        print("tierq demo: --duration > 0, --clients >= 1, 0 <= --priority-share <= 1",
              file=sys.stderr)
        return 2
    results = uvloop.run(_demo_run(args.duration, args.clients, args.priority_share))
    _demo_table(results)
    return 0


async def _demo_run(duration: float, clients: int, priority_share: float) -> list[dict[str, Any]]:
    import aiohttp
    import orjson
    from aiohttp import web

    from tierq.app import create_app, runner_kwargs
    from tierq.sim import start_sim

    slots = 4
    sim = await start_sim("127.0.0.1", 0, slots=slots, ttft_ms=40.0, tokens_per_s=200.0)
    tmp = tempfile.TemporaryDirectory(prefix="tierq-demo-")
    config = Config(
        ledger=LedgerConfig(url=f"sqlite:///{Path(tmp.name) / 'demo.db'}"),
        upstreams=(UpstreamConfig("sim", "", "sim", priority_scheduling=True,
                                  sim=SimSettings(slots)),),
        models=(ModelConfig(DEMO_MODEL, "sim", priority=True, admission=AdmissionConfig(
            max_concurrency=slots, queue_depth=4 * slots, max_wait_ms_default=1500,
            max_wait_ms_priority=10000)),),
    )
    app = create_app(config, sim=sim)
    runner = web.AppRunner(app, **runner_kwargs())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = next(a[1] for a in runner.addresses if isinstance(a, tuple))
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    results: list[dict[str, Any]] = []
    deadline = time.monotonic() + duration
    rng = random.Random(7)

    async def one(session: aiohttp.ClientSession) -> None:
        tier = "priority" if rng.random() < priority_share else "default"
        body = {"model": DEMO_MODEL, "stream": True, "max_tokens": 16, "service_tier": tier,
                "stream_options": {"include_usage": True},
                "messages": [{"role": "user", "content": "say something"}]}
        t0 = time.monotonic()
        r: dict[str, Any] = {"tier": tier, "status": "failed", "ttft_ms": None,
                             "cost": Decimal(0)}
        async with session.post(url, data=orjson.dumps(body),
                                headers={"Content-Type": "application/json"}) as resp:
            if resp.status == 429:
                r["status"] = "shed"
                await resp.read()
                retry = float(resp.headers.get("retry-after-ms", "100")) / 1000
                results.append(r)
                await asyncio.sleep(min(retry, 0.5))
                return
            async for line in resp.content:
                if not line.startswith(b"data: {"):
                    continue
                chunk = orjson.loads(line[6:])
                choices = chunk.get("choices") or []
                if r["ttft_ms"] is None and any(c.get("delta", {}).get("content") for c in choices):
                    r["ttft_ms"] = (time.monotonic() - t0) * 1000
                usage = chunk.get("usage")
                if usage:
                    # Decimal from the exact digits the gateway rendered.
                    raw = line[line.index(b'"estimated_cost":') + 17:]
                    r["cost"] = Decimal(raw.split(b"}")[0].split(b",")[0].decode())
            r["status"] = "served" if resp.status == 200 else "failed"
        results.append(r)

    async def client(session: aiohttp.ClientSession) -> None:
        while time.monotonic() < deadline:
            try:
                await one(session)
            except aiohttp.ClientError:
                results.append({"tier": "default", "status": "failed", "ttft_ms": None,
                                "cost": Decimal(0)})

    async def progress() -> None:
        start = time.monotonic()
        while True:
            done = min(1.0, (time.monotonic() - start) / duration)
            bar = "#" * int(done * 30)
            served = sum(1 for r in results if r["status"] == "served")
            shed = sum(1 for r in results if r["status"] == "shed")
            sys.stderr.write(f"\r[{bar:<30}] {done * 100:5.1f}%  served {served:5d}  "
                             f"shed {shed:5d}")
            sys.stderr.flush()
            if done >= 1.0:
                break
            await asyncio.sleep(0.2)

    try:
        print(f"tierq demo: {clients} clients, {priority_share:.0%} priority, against a sim "
              f"with {slots} slots (40 ms TTFT, 200 tok/s), pool max_concurrency={slots}, "
              f"for {duration:g}s", file=sys.stderr)
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=clients)) as s:
            bar = asyncio.create_task(progress())
            await asyncio.gather(*(client(s) for _ in range(clients)))
            await bar
        sys.stderr.write("\n")
    finally:
        await runner.cleanup()
        await sim.close()
        tmp.cleanup()
    return results


def _pct(values: list[float], q: float) -> str:
    if not values:
        return "-"
    values = sorted(values)
    return f"{values[min(len(values) - 1, int(q * len(values)))]:.0f}"


def _demo_table(results: list[dict[str, Any]]) -> None:
    rows = [("TIER", "REQUESTS", "SERVED", "SHED", "TTFT p50 ms", "TTFT p99 ms", "COST USD")]
    for tier in ("priority", "default"):
        rs = [r for r in results if r["tier"] == tier]
        ttft = [r["ttft_ms"] for r in rs if r["ttft_ms"] is not None]
        rows.append((tier, str(len(rs)), str(sum(r["status"] == "served" for r in rs)),
                     str(sum(r["status"] == "shed" for r in rs)), _pct(ttft, 0.5),
                     _pct(ttft, 0.99), decimal_text(sum((r["cost"] for r in rs), Decimal(0)))))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in
                        enumerate(zip(r, widths))))
