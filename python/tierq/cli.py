"""The `tierq` command: serve, sim, demo, usage, keys, models.

`serve` with no config runs the embedded default (built-in catalog, in-process
sim, ./tierq.db) and says so in its first log line. A ConfigError is printed as
its one line on stderr with exit status 2, never as a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import contextlib
import ipaddress
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime, timezone
from typing import Any, Final

from tierq.config import Config, ConfigError, default_config, load_config
from tierq.cluster import cluster_settings, default_host_id, require_redis
from tierq.demo import run_demo
from tierq.embedded import start_sims
from tierq.keys import KEEP, KeyInfo, budget_text, parse_public_id
from tierq.stores import (KeyStoreLike, StoreUnavailable, close_key_store, open_key_store,
                          require_postgres, start_key_store, usage_of)
from tierq.pricing import decimal_text
from tierq.progress import progress
from tierq.served import Catalog
from tierq.sim import FAULTS, SCHEDULING
from tierq.storage import shown_url, sqlite_path, store_kind
from tierq.tiers import Tier
from tierq.tracing import require_otel
from tierq.usage import parse_since, render_csv, render_json, render_table

__all__ = ["keys_main", "main", "usage_main"]

log = logging.getLogger("tierq")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # `usage` and `keys` have parsers of their own: hand them the rest of the
    # line untouched (their own --help included).
    if argv and argv[0] == "usage":
        return usage_main(argv[1:])
    if argv and argv[0] == "keys":
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
    s.add_argument("--workers", type=int, help="processes sharing one admission state (default: [server] workers)")
    s.add_argument("--insecure-no-auth", action="store_true",
                   help="listen on a non-loopback address with no API keys configured")
    s.add_argument("--log-format", choices=("json", "text"), default="json",
                   help="log lines on stderr: one JSON object each (default) or text")
    s.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default="info")
    s.add_argument("--no-access-log", action="store_true",
                   help="no line per request (errors and start-up are still logged)")
    s.set_defaults(func=_serve)

    s = sub.add_parser("reload", help="tell a running tierq serve to re-read its config (SIGHUP)")
    s.add_argument("--config", help="the TOML file the server runs (where [server] pid_file is)")
    s.set_defaults(func=_reload)

    s = sub.add_parser("sim", help="run a simulated OpenAI-compatible backend")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=9000)
    s.add_argument("--slots", type=int, default=8,
                   help="sequences running at once, as vLLM's max_num_seqs; more wait in the "
                        "sim's queue (default 8)")
    s.add_argument("--ttft-ms", type=float, default=50.0,
                   help="prefill time: first token this long after leaving the queue (default 50)")
    s.add_argument("--tokens-per-s", type=float, default=50.0,
                   help="decode speed of a lone sequence; 0 means instant (default 50)")
    s.add_argument("--batch-knee", type=float, default=None,
                   help="a step over a batch of b takes (1 + (b-1)/knee) / tokens_per_s, so "
                        "throughput rises towards knee x tokens_per_s (default 2 x slots; inf: "
                        "no slow-down)")
    s.add_argument("--prefill-tokens-per-s", type=float, default=0.0,
                   help="prefill speed for prompt tokens not in the prefix cache, on one "
                        "prefill unit the engine's sequences share, first come first served, "
                        "on top of --ttft-ms (default 0: prefill is --ttft-ms alone)")
    s.add_argument("--prefix-cache-tokens", type=int, default=0,
                   help="an LRU of cached prompt-prefix blocks (256 characters each) this many "
                        "tokens large (default 0: no prefix cache)")
    s.add_argument("--scheduling", choices=SCHEDULING, default="fcfs",
                   help="waiting-queue order: fcfs, or priority (the body's int priority, lower "
                        "first, as vllm --scheduling-policy priority)")
    s.add_argument("--max-waiting", type=int, default=None,
                   help="refuse new requests once this many wait, as a hosted provider does "
                        "(default: no limit)")
    s.add_argument("--overload-status", type=int, choices=(429, 503), default=429,
                   help="status past --max-waiting (default 429)")
    s.add_argument("--no-metrics", action="store_true",
                   help="no /metrics (404), like an opaque hosted backend")
    s.add_argument("--fault", choices=sorted(FAULTS), default=None,
                   help="break every request this way (else per request: x-sim-fault header "
                        "or sim_fault body field)")
    s.add_argument("--fault-delay-ms", type=float, default=2000.0,
                   help="delay of the slow-first-byte fault (default 2000)")
    s.set_defaults(func=_sim)

    s = sub.add_parser("demo", help="gateway + sim + an overload run: priority vs default")
    s.add_argument("--duration", type=float, default=20.0, help="seconds of load (default 20)")
    s.add_argument("--clients", type=int, default=32, help="concurrent clients (default 32)")
    s.add_argument("--priority-share", type=float, default=0.25,
                   help="share of requests sent with service_tier=priority (default 0.25)")
    s.add_argument("--replicas", type=int, default=1,
                   help="sims behind the one pool, each its own endpoint (default 1)")
    s.set_defaults(func=_demo)

    # Listed for --help only; main() delegates them before parsing.
    sub.add_parser("usage", help="spend by key, model and tier (see tierq usage --help)")
    sub.add_parser("keys", help="create, list, update, revoke API keys (see tierq keys --help)")

    s = sub.add_parser("models", help="list served models with prices and the priority tag")
    s.add_argument("--config", help="TOML file (default: the built-in catalog)")
    s.add_argument("--json", action="store_true", help="JSON, as GET /v1/models returns it")
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
            f"upstreams: {ups}; ledger {shown_url(config.ledger.url)}"
            + (f" (spool {config.ledger.spool} while it is unreachable)"
               if store_kind(config.ledger.url) == "postgresql" else "")
            + (f"; cluster host {config.cluster.host_id} through {shown_url(config.cluster.redis_url)}"
               f" (on_redis_down {config.cluster.on_redis_down})" if config.cluster else ""))


def _serve(args: argparse.Namespace) -> int:
    config = load_config(args.config) if args.config else default_config()
    host = args.host or config.server.host
    port = args.port if args.port is not None else config.server.port
    workers = args.workers if args.workers is not None else config.server.workers
    if workers < 1:
        print(f"tierq serve: --workers must be at least 1, got {workers}", file=sys.stderr)
        return 2
    if config.cluster is not None:
        if config.cluster.host_id is None:
            config = dataclasses.replace(config, cluster=dataclasses.replace(
                config.cluster, host_id=default_host_id(port)))
    no_keys = config.keys.path is None
    if no_keys and not _is_loopback_host(host) and not args.insecure_no_auth:
        print(f"tierq serve: refusing to listen on {host} with no API keys configured; "
              "add [keys] to the config, listen on 127.0.0.1, or pass --insecure-no-auth",
              file=sys.stderr)
        return 2
    try:
        _require_extras(config)
    except RuntimeError as e:
        print(f"tierq serve: {e}", file=sys.stderr)
        return 2
    catalog = Catalog.from_config(config)
    from tierq.logs import configure_logging

    configure_logging(args.log_format, args.log_level, access=not args.no_access_log)
    # The first log line says what is being served, on what, billed where.
    log.info("%s", _describe(config, catalog))
    if no_keys:
        log.info("no API keys configured: serving %s clients only",
                 "all (--insecure-no-auth)" if args.insecure_no_auth else "loopback")
    import uvloop

    pid_file = pid_path(config)
    try:
        try:
            _write_pid(pid_file)
        except OSError as e:  # serving matters more than `tierq reload` finding us
            log.warning("tierq serve: cannot write the pid file %s (%s): `tierq reload` will not "
                        "find this server; kill -HUP %d still reloads it", pid_file,
                        e.strerror or e, os.getpid())
        if workers == 1:
            uvloop.run(_run_server(config, host, port, args.insecure_no_auth))
            return 0
        if config.cluster is not None and any(u.replicas > 1 for u in config.upstreams):
            # Each replica's lease is its cap in worker 0's core beside health's
            # (tierq.admission.ReplicaPool), which the other workers would not see.
            print("tierq serve: [cluster] with several endpoints runs one worker per host "
                  "(--workers 1)", file=sys.stderr)
            return 2
        uvloop.run(_probe_key_store(config))  # before the socket and the forks
        return _serve_workers(config, catalog, host, port, args.insecure_no_auth, workers)
    except StoreUnavailable as e:
        log.error("tierq serve: %s", e)
        return 1
    finally:
        with contextlib.suppress(OSError):
            if open(pid_file).read().strip() == str(os.getpid()):
                os.unlink(pid_file)


def pid_path(config: Config) -> str:
    """`[server] pid_file`, else tierq.pid beside the ledger (its SQLite file,
    or a PostgreSQL ledger's spool)."""
    if config.server.pid_file is not None:
        return config.server.pid_file
    url = config.ledger.url if store_kind(config.ledger.url) == "sqlite" else config.ledger.spool
    return os.path.join(os.path.dirname(sqlite_path(url)), "tierq.pid")


def _write_pid(path: str) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(f"{os.getpid()}\n")
    os.replace(tmp, path)  # whole or absent: `tierq reload` never reads half a pid


def _reload(args: argparse.Namespace) -> int:
    config = load_config(args.config) if args.config else default_config()
    path = pid_path(config)
    try:
        pid = int(open(path).read().strip())
    except (OSError, ValueError) as e:
        print(f"tierq reload: no running server's pid in {path}: {e}", file=sys.stderr)
        return 1
    try:
        os.kill(pid, signal.SIGHUP)
    except ProcessLookupError:
        print(f"tierq reload: pid {pid} (from {path}) is not running", file=sys.stderr)
        return 1
    print(f"tierq reload: sent SIGHUP to pid {pid}; the server logs whether it applied the config")
    return 0


def _require_extras(config: Config) -> None:
    """The optional packages this config needs, imported before anything listens:
    one without its package is one line naming the extra, not a traceback later."""
    require_postgres("[ledger] url", config.ledger.url)
    if config.keys.path is not None:
        require_postgres("[keys] url", config.keys.path)
    if config.cluster is not None:
        require_redis()
    if config.tracing is not None:
        require_otel()


async def _probe_key_store(config: Config) -> None:
    """StoreUnavailable if the key store cannot be read now (a worker reads it again)."""
    store = await start_key_store(config.keys)
    if store is not None:
        await close_key_store(store)


def _serve_workers(config: Config, catalog: Catalog, host: str, port: int, insecure: bool,
                   workers: int) -> int:
    """N processes on one listening socket sharing one admission state per model."""
    import uvloop

    from tierq.workers import SharedPools, Supervisor, listen

    shared = SharedPools({m.id: cluster_settings(m.admission) if config.cluster else m.admission.settings
                          for m in catalog.values()}, workers,
                         key_capacity=config.keys.table_capacity if config.keys.path else None,
                         replicas={m.id: (m.replicas, m.replica.settings) for m in catalog.values()
                                   if m.replica is not None})
    try:
        if config.cluster is not None:
            shared.withhold_all()  # worker 0's lease agent restores what Redis leases
        sock = listen(host, port)
        admin_sock = listen(*config.admin.listen) if config.admin.listen is not None else None

        def worker(index: int) -> int:
            async def run() -> None:
                pools = shared.attach(index)
                pools.start()
                try:
                    await _run_server(config, host, port, insecure, sock=sock, pools=pools,
                                      admin_sock=admin_sock,
                                      reload_first=reloaded[0] if reloaded else None)
                finally:
                    pools.stop()

            try:
                uvloop.run(run())
            except StoreUnavailable as e:  # lost since the probe: one line, then restarted
                log.error("tierq serve: worker %d: %s", index, e)
                return 1
            return 0

        log.info("listening on http://%s:%d/v1 with %d workers sharing admission", host, port, workers)
        # The config file as it was at the last SIGHUP: what a worker forked
        # after it (a replacement) applies before it serves.
        reloaded: list[bytes] = []

        def snapshot() -> None:
            if config.source is not None:
                with contextlib.suppress(OSError):
                    with open(config.source, "rb") as f:
                        reloaded[:] = [f.read()]

        return Supervisor(workers, worker, shared, on_reload=snapshot, barrier=shared.barrier).run()
    finally:
        shared.close()


def _on_reload(gw: Any, path: str | None, pools: Any = None) -> tuple[
        Callable[[], None], Callable[[bytes | None, int | None], Awaitable[bool]]]:
    """SIGHUP's handler, and the reload it runs: one reload at a time, each
    after the one before. With a reload barrier (`pools`, --workers N) the
    reload swaps the config, reports it to the supervisor and retunes the
    pools only when the supervisor commits the round (every worker swapped)."""
    from tierq.app import models_payload
    from tierq.lifecycle import reload, retune

    import orjson

    lock = asyncio.Lock()
    tasks: set[asyncio.Task[bool]] = set()
    barrier: Any = None
    index = 0
    # The round whose retune this worker waits for (None: none; 0: a SIGHUP
    # sent to this worker itself, not through the supervisor: retuned at once).
    pending: list[int | None] = [None]

    def render(g: Any) -> bytes:
        return orjson.dumps(models_payload(g.catalog, g.config.pricing.priority_multiplier))

    async def run(data: bytes | None = None, gen: int | None = None) -> bool:
        async with lock:
            if barrier is None:
                return await reload(gw, path, render, data)
            # Swapped here, retuned when every worker has swapped (round `gen`).
            gen = barrier.signalled if gen is None else gen
            ok = await reload(gw, path, render, data, defer_retune=True)
            pending[0] = gen if ok else None
            barrier.report(index, gen, ok)
            on_commit()  # a round committed already (this worker forked after it)
            return ok

    def on_commit() -> None:
        if barrier is not None and pending[0] is not None and barrier.committed >= pending[0]:
            pending[0] = None
            retune(gw)

    def on_signal() -> None:
        task = asyncio.ensure_future(run())
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    if pools is not None and pools.barrier is not None:
        barrier, index = pools.barrier, pools.index
        pools.on_commit = on_commit
    return on_signal, run


def worker_app(config: Config, insecure: bool, pools: Any) -> Any:
    """A worker's gateway app: shared pools, the host's per-key buckets, and
    /metrics reporting the whole host (`tierq.workers.WorkerPools`)."""
    from tierq.app import GATEWAY, create_app

    app = create_app(config, start_sims=start_sims, allow_remote_without_keys=insecure,
                     pools=pools, key_buckets=pools.key_buckets)
    gw = app[GATEWAY]
    gw.keys_changed = pools.keys_changed
    pools.on_keys_changed = lambda: gw.keys.forget_all() if gw.keys is not None else None
    if pools.board is not None:
        pools.board.install(app, app[GATEWAY].snapshot)
    return app


async def _run_server(config: Config, host: str, port: int, insecure: bool,
                      sock: Any = None, pools: Any = None, admin_sock: Any = None,
                      reload_first: bytes | None = None) -> None:
    from aiohttp import web

    from tierq.app import GATEWAY, create_app, runner_kwargs

    app = create_app(config, start_sims=start_sims, allow_remote_without_keys=insecure) \
        if pools is None else worker_app(config, insecure, pools)
    # The shutdown timeout is the drain deadline: admitted requests get that long.
    runner = web.AppRunner(app, **{**runner_kwargs(),
                                   "shutdown_timeout": config.server.drain_timeout_s})
    await runner.setup()
    on_reload = _on_reload(app[GATEWAY], config.source, pools)
    barrier = pools.barrier if pools is not None else None
    if reload_first is not None:
        # A worker replacing one that died after a reload: the config file as
        # the others applied it, before this one takes a connection.
        await on_reload[1](reload_first, barrier.gen if barrier is not None else None)
    try:
        site: web.BaseSite
        if sock is not None:
            site = web.SockSite(runner, sock)
        else:
            site = web.TCPSite(runner, host, port, backlog=1024)
        await site.start()
        if sock is None:
            log.info("listening on http://%s:%d/v1 (also /v1/openai)", host, port)
        admin = config.admin.listen
        if admin is not None:
            # The same app on a listener of its own: /admin/v1 answers only there.
            await (web.SockSite(runner, admin_sock) if admin_sock is not None
                   else web.TCPSite(runner, *admin, backlog=128)).start()
        if config.admin.token_sha256 is not None and (sock is None or pools.index == 0):
            log.info("admin API on %s", f"http://{admin[0]}:{admin[1]}/admin/v1" if admin else
                     f"http://{host}:{port}/admin/v1, loopback clients only")
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGHUP, on_reload[0])
        if barrier is not None and barrier.signalled > barrier.gen:
            # Signalled between its fork and this handler (SIGHUP ignored meanwhile).
            on_reload[0]()
        await stop.wait()
        # Drain: stop listening, shed the queue with 503, let admitted requests
        # finish within the deadline, then the ledger commits what is queued.
        for s in list(runner.sites):
            await s.stop()
        gw = app[GATEWAY]
        shed = gw.begin_drain()
        in_flight = sum(int(str(p.admission.stats()["in_flight"])) for p in gw.pools.values())
        log.info("draining: stopped listening, %d queued requests shed with 503, "
                 "%d in flight get up to %g s", shed, in_flight, config.server.drain_timeout_s)
    finally:
        await runner.cleanup()
        from tierq.logs import flush_access_log

        flush_access_log()  # every request has ended: its access line is written before we go
    log.info("drained; ledger closed")


# ------------------------------------------------------------------ sim


def _sim(args: argparse.Namespace) -> int:
    from tierq.sim import run_sim

    try:
        run_sim(args.host, args.port, args.slots, args.ttft_ms, args.tokens_per_s, args.fault,
                args.fault_delay_ms, batch_knee=args.batch_knee, scheduling=args.scheduling,
                max_waiting=args.max_waiting, overload_status=args.overload_status,
                metrics=not args.no_metrics, prefill_tokens_per_s=args.prefill_tokens_per_s,
                prefix_cache_tokens=args.prefix_cache_tokens)
    except ValueError as e:  # a setting out of range, found before anything listens
        print(f"tierq sim: {e}", file=sys.stderr)
        return 2
    return 0


# ------------------------------------------------------------------ models


def _demo(args: argparse.Namespace) -> int:
    return run_demo(args.duration, args.clients, args.priority_share, args.replicas)


def _models(args: argparse.Namespace) -> int:
    config = load_config(args.config) if args.config else default_config()
    catalog = Catalog.from_config(config)
    mult = config.pricing.priority_multiplier
    flex = config.pricing.flex_multiplier
    if args.json:
        import orjson

        from tierq.app import models_payload

        sys.stdout.write(orjson.dumps(models_payload(catalog, mult, flex),
                                      option=orjson.OPT_INDENT_2).decode() + "\n")
        return 0
    rows = [("MODEL", "INPUT/1M", "OUTPUT/1M", "TIER", "PRIORITY IN/OUT", "FLEX", "FLEX IN/OUT",
             "UPSTREAM")]
    for m in catalog.values():
        rows.append((m.id, "$" + decimal_text(m.prices.input_per_m),
                     "$" + decimal_text(m.prices.output_per_m),
                     f"priority ({decimal_text(mult)}x)" if m.priority else "-",
                     f"${decimal_text(m.prices.input_per_m * mult)} / "
                     f"${decimal_text(m.prices.output_per_m * mult)}" if m.priority else "-",
                     f"flex ({decimal_text(flex)}x)" if m.flex else "-",
                     f"${decimal_text(m.prices.input_per_m * flex)} / "
                     f"${decimal_text(m.prices.output_per_m * flex)}" if m.flex else "-",
                     m.upstream))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    n_pri = sum(1 for m in catalog.values() if m.priority)
    n_flex = sum(1 for m in catalog.values() if m.flex)
    print(f"\n{len(catalog)} models, {n_pri} priority-enabled, {n_flex} flex-enabled; prices in USD "
          f'per 1M tokens. service_tier="{Tier.PRIORITY}" on a priority model is billed '
          f'{decimal_text(mult)}x, service_tier="{Tier.FLEX}" on a flex model {decimal_text(flex)}x '
          "(served from idle capacity only); elsewhere each is served and billed as default.")
    return 0


# ------------------------------------------------------------------ usage


def usage_main(argv: list[str]) -> int:
    """`tierq usage`: spend by key, model and tier from the ledger."""
    p = argparse.ArgumentParser(
        prog="tierq usage", description=usage_main.__doc__,
        epilog="Costs are exact (USD). Rows: every request decision; only served and "
               "cut-short (partial) requests cost anything.")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--db", help="ledger file, sqlite:/// or postgresql:// url (default: tierq.db; "
                                  "PGPASSWORD for a postgresql:// password)")
    src.add_argument("--config", help="read the ledger url from this tierq TOML file")
    p.add_argument("--since", help="relative (30m, 1h, 7d) or ISO date/time; naive times are UTC")
    p.add_argument("--key", help="only this key's public id ('local' without API keys)")
    p.add_argument("--model", help="only this model")
    p.add_argument("--by", choices=("key", "fairness-id"), default="key",
                   help="lines per key, model and tier (default), or per key, fairness id "
                        "(x-tierq-fairness-id of a trusted key's requests), model and tier")
    p.add_argument("--format", choices=("table", "csv", "json"), default=None,
                   help="output format (default: table)")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="same as --format json; costs as exact strings")
    fmt.add_argument("--csv", action="store_true", help="same as --format csv; costs as exact strings")
    args = p.parse_args(argv)
    out_format = args.format or ("json" if args.json else "csv" if args.csv else "table")
    by_fid = args.by == "fairness-id"
    if args.format and (args.json or args.csv) and out_format != ("json" if args.json else "csv"):
        print("tierq usage: --format contradicts --json/--csv", file=sys.stderr)
        return 2
    password_env: str | None = None
    try:
        if args.config:
            try:
                ledger = load_config(args.config).ledger
            except ConfigError as e:
                print(str(e), file=sys.stderr)
                return 2
            url, password_env = ledger.url, ledger.password_env
        else:
            url = args.db or "tierq.db"
        kind = store_kind(url)
        since = parse_since(args.since) if args.since else None
    except ValueError as e:
        print(f"tierq usage: {e}", file=sys.stderr)
        return 2
    where = shown_url(url) if kind == "postgresql" else sqlite_path(url)
    if kind == "sqlite" and not os.path.exists(where):
        # Do not create an empty ledger as a side effect of reading one.
        print(f"tierq usage: no ledger at {where}", file=sys.stderr)
        return 1
    try:
        with progress(f"summing the ledger at {where}"):
            lines = list(usage_of(url, password_env=password_env, since=since, key_id=args.key,
                                  model=args.model, by_fairness_id=by_fid))
    except Exception as e:  # noqa: BLE001 - sqlite3, asyncpg, OSError: one line, no traceback
        print(f"tierq usage: cannot read {where}: {_one_line(e)}", file=sys.stderr)
        return 1
    if out_format == "json":
        out = render_json(lines, by_fid) + "\n"
    elif out_format == "csv":
        out = render_csv(lines, by_fid)
    else:
        out = render_table(lines, by_fid)
    sys.stdout.write(out)
    return 0


# ------------------------------------------------------------------ keys


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _limit(v: int | None) -> str:
    return "unlimited" if v is None else str(v)


def _limit_arg(text: str) -> int | None:
    """`--rpm` / `--tpm` of `keys update`: a number, or "unlimited"."""
    if text == "unlimited":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer or 'unlimited'") from None


def _none_arg(kind: Callable[[str], object]) -> Callable[[str], object]:
    """An `update` flag that also takes "none" (the setting removed)."""
    def parse(text: str) -> object:
        if text == "none":
            return None
        try:
            return kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number or 'none'") from None

    return parse


def _downgrades(k: KeyInfo) -> str:
    budget = ("none" if k.priority_budget_usd is None else
              f"{budget_text(k.priority_budget_usd)} USD/day")
    ramp = ("none" if k.ramp_max_growth is None else
            f"+{k.ramp_max_growth:g} over {k.ramp_window_s} s above {k.ramp_min_tpm} tpm")
    return f"priority budget {budget}, ramp {ramp}"


def _describe_key(k: KeyInfo) -> str:
    return (f"{k.public_id} ({k.name}): rpm {_limit(k.rpm)}, tpm {_limit(k.tpm)}, "
            f"weight {k.weight:g}, {'trusted' if k.trusted else 'untrusted'}, {_downgrades(k)}"
            f"{'' if k.enforce else ', limits in shadow mode (counted, not applied)'}")


def _render_keys(keys: list[KeyInfo]) -> str:
    header = ("ID", "NAME", "CREATED", "STATUS", "RPM", "TPM", "WEIGHT", "TRUSTED", "LIMITS",
              "BUDGET/DAY", "RAMP")
    body = [
        (k.public_id, k.name, _iso(k.created),
         f"revoked {_iso(k.revoked_at)}" if k.revoked_at is not None else "active",
         _limit(k.rpm), _limit(k.tpm), f"{k.weight:g}", "yes" if k.trusted else "no",
         "enforced" if k.enforce else "shadow",
         budget_text(k.priority_budget_usd) or "-",
         "-" if k.ramp_max_growth is None else
         f"+{k.ramp_max_growth:g}/{k.ramp_window_s}s>{k.ramp_min_tpm}")
        for k in keys
    ]  # fmt: skip
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *body]) + "\n"


def _enforce_flags(p: argparse.ArgumentParser, default: object) -> None:
    """--shadow (or --no-enforce) and --enforce: whether the key's rpm and tpm
    are applied, or only decided and counted (shadow mode)."""
    g = p.add_mutually_exclusive_group()
    g.add_argument("--shadow", "--no-enforce", dest="enforce", action="store_false", default=default,
                   help="shadow mode: its rpm/tpm refusals and downgrades are counted "
                        "(tierq_shadow_decisions_total), not applied")
    g.add_argument("--enforce", dest="enforce", action="store_true",
                   help="apply its rpm/tpm and downgrades (the default for a new key)")


def _one_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0]


def keys_main(argv: list[str]) -> int:
    """`tierq keys create|list|update|revoke`."""
    common = argparse.ArgumentParser(add_help=False)
    src = common.add_mutually_exclusive_group()
    src.add_argument("--db", default=None,
                     help="key database: a SQLite file, sqlite:/// or postgresql:// url "
                          "(default: tierq.db; PGPASSWORD for a postgresql:// password)")
    src.add_argument("--config", help="the key store of this tierq TOML file's [keys]")
    p = argparse.ArgumentParser(prog="tierq keys", description="Manage tierq API keys.")
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("create", parents=[common], help="create a key (shown once)")
    c.add_argument("name")
    c.add_argument("--rpm", type=int, help="requests per minute (default: unlimited)")
    c.add_argument("--tpm", type=int, help="tokens per minute (default: unlimited)")
    c.add_argument("--weight", type=float, default=1.0,
                   help="fair share of a busy lane, 0.01 to 100 (default: 1)")
    c.add_argument("--trusted", action="store_true",
                   help="may split its traffic into flows with the x-tierq-fairness-id header")
    c.add_argument("--priority-budget-usd", default=None,
                   help="priority spend per UTC day, then served default (default: none)")
    c.add_argument("--ramp-max-growth", type=float, default=None,
                   help="ramp rule: the most its priority tokens per minute may grow over "
                        "the window, 0.5 = 50%% (default: no ramp rule)")
    c.add_argument("--ramp-min-tpm", type=int, default=0,
                   help="ramp rule: priority tokens per minute always allowed (default: 0)")
    c.add_argument("--ramp-window-s", type=int, default=900,
                   help="ramp rule: the window, 60 to 86400 seconds (default: 900)")
    _enforce_flags(c, default=True)
    sub.add_parser("list", parents=[common], help="list keys (never secrets)")
    u = sub.add_parser("update", parents=[common],
                       help="change a live key's name, limits, weight or trust")
    u.add_argument("id")
    u.add_argument("--name")
    u.add_argument("--rpm", type=_limit_arg, default=KEEP,
                   help="requests per minute, or 'unlimited'")
    u.add_argument("--tpm", type=_limit_arg, default=KEEP, help="tokens per minute, or 'unlimited'")
    u.add_argument("--weight", type=float, default=KEEP, help="fair share, 0.01 to 100")
    trust = u.add_mutually_exclusive_group()
    trust.add_argument("--trusted", dest="trusted", action="store_true", default=KEEP,
                       help="honour its x-tierq-fairness-id header")
    trust.add_argument("--untrusted", dest="trusted", action="store_false",
                       help="ignore its x-tierq-fairness-id header")
    u.add_argument("--priority-budget-usd", type=_none_arg(str), default=KEEP,
                   help="priority spend per UTC day, or 'none'")
    u.add_argument("--ramp-max-growth", type=_none_arg(float), default=KEEP,
                   help="ramp rule's growth over its window, or 'none' (no ramp rule)")
    u.add_argument("--ramp-min-tpm", type=int, default=KEEP, help="ramp rule's floor")
    u.add_argument("--ramp-window-s", type=int, default=KEEP, help="ramp rule's window")
    _enforce_flags(u, default=KEEP)
    r = sub.add_parser("revoke", parents=[common], help="revoke a key by its public id")
    r.add_argument("id")
    args = p.parse_args(argv)
    password_env: str | None = None
    refresh_s = 2.0
    try:
        url = args.db or "tierq.db"
        if args.config:
            try:
                keys = load_config(args.config).keys
            except ConfigError as e:
                print(str(e), file=sys.stderr)
                return 2
            if keys.path is None:
                print(f"tierq keys: {args.config} has no [keys] path or url", file=sys.stderr)
                return 2
            url, password_env, refresh_s = keys.path, keys.password_env, keys.refresh_s
        kind = store_kind(url)
    except ValueError as e:
        print(f"tierq keys: {e}", file=sys.stderr)
        return 2
    if kind == "sqlite" and args.cmd != "create" and not os.path.exists(sqlite_path(url)):
        print(f"tierq keys: no key database at {sqlite_path(url)}", file=sys.stderr)
        return 1
    try:
        return _keys_command(args, open_key_store(
            url if kind == "postgresql" else sqlite_path(url), password_env=password_env,
            refresh_s=refresh_s))
    except Exception as e:  # noqa: BLE001 - sqlite3, asyncpg, OSError: one line, no traceback
        print(f"tierq keys: cannot use {shown_url(url)}: {_one_line(e)}", file=sys.stderr)
        return 1


# The key fields of the downgrades (tierq.keys.KeyInfo), one flag each.
_DOWNGRADE_FIELDS: Final = ("priority_budget_usd", "ramp_min_tpm", "ramp_max_growth",
                            "ramp_window_s")


def _keys_command(args: argparse.Namespace, store: KeyStoreLike) -> int:
    with contextlib.closing(store):
        if args.cmd == "create":
            try:
                info, token = store.create(args.name, rpm=args.rpm, tpm=args.tpm,
                                           weight=args.weight, trusted=args.trusted,
                                           enforce=args.enforce,
                                           **{f: getattr(args, f) for f in _DOWNGRADE_FIELDS})
            except ValueError as e:
                print(f"tierq keys: {e}", file=sys.stderr)
                return 2
            # The token alone on stdout, so `KEY=$(tierq keys create ci)` works.
            print(f"created key {_describe_key(info)}", file=sys.stderr)
            print(token)
            print("This key will not be shown again: store it now.", file=sys.stderr)
            return 0
        if args.cmd == "list":
            sys.stdout.write(_render_keys(store.list()))
            return 0
        public_id = parse_public_id(args.id)
        if public_id is None:
            print(f"tierq keys: {args.id!r} is not a key id (12 characters, a-z 0-9)", file=sys.stderr)
            return 2
        if args.cmd == "update":
            try:
                new = store.update(public_id, name=KEEP if args.name is None else args.name,
                                   rpm=args.rpm, tpm=args.tpm, weight=args.weight,
                                   trusted=args.trusted, enforce=args.enforce,
                                   **{f: getattr(args, f) for f in _DOWNGRADE_FIELDS})
            except ValueError as e:
                print(f"tierq keys: {e}", file=sys.stderr)
                return 2
            if new is None:
                print(f"tierq keys: no live key {public_id}", file=sys.stderr)
                return 1
            print(f"updated key {_describe_key(new)}")
            return 0
        if store.revoke(public_id):
            print(f"revoked {public_id}")
            return 0
        print(f"tierq keys: no live key {public_id}", file=sys.stderr)
        return 1
