"""Start-up, reload and clean-up of a gateway built whole (an aiohttp cleanup
context): the sims of upstreams of kind "sim" (from the caller), upstream
clients, what feeds the pools' limits (tierq.capacity), the ledger, the key
store and limiter, the cluster agent, the write watchdog, the trace exporter;
`reload`, a config re-read (SIGHUP, `tierq reload`) applied to what follows.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from decimal import Decimal
from typing import TYPE_CHECKING, Any, Final, cast

from aiohttp import web

from tierq._core import SharedKeyBuckets
from tierq.admission import Admission
from tierq.capacity import Capacity
from tierq.cluster import Cluster
from tierq.config import AdmissionConfig, Config, ConfigError, UpstreamConfig, load_config
from tierq.downgrades import Downgrades
from tierq.gateway import CLUSTER_CLOSED, Gateway, Pool, connection_bounds
from tierq.health import ReplicaState
from tierq.probes import HealthLoop
from tierq.keys import KeyLimiter
from tierq.served import Catalog
from tierq.storage import store_kind
from tierq.tiers import Tier
from tierq.stores import close_key_store, start_key_store
from tierq.upstream import UpstreamClient

if TYPE_CHECKING:
    from tierq._core import _SettingsKwargs

__all__ = ["SHARED_BLOCK_KEYS", "StartSims", "lifecycle", "reload", "retune"]

log = logging.getLogger("tierq.reload")

#: A pool's settings that size or fingerprint the block its workers share
#: (`tierq serve --workers N`): a reload leaves them as they are (a restart
#: applies them). queue_depth and fair_queues place a pool's words even alone.
SHARED_BLOCK_KEYS: Final = ("queue_depth", "max_wait_ms", "rate", "burst", "priority_reserve",
                            "default_min_share", "fairness", "fair_queues", "enforce",
                            "flex_headroom")
_LAYOUT_KEYS: Final = ("queue_depth", "fair_queues")

#: Starts the backends of the given kind="sim" upstreams inside the app's event
#: loop, yields each one's base URL by upstream name, and stops them on exit
#: (`tierq.embedded.start_sims`, which the CLI passes).
StartSims = Callable[[Sequence[UpstreamConfig]],
                     contextlib.AbstractAsyncContextManager[Mapping[str, str | Sequence[str]]]]


def lifecycle(
    gw: Gateway, sim: Any, start_sims: StartSims | None, *, own_ledger: bool,
    shared_worker: int | None = None, key_buckets: SharedKeyBuckets | None = None,
    workers: int = 1,
) -> Callable[[web.Application], AsyncIterator[None]]:
    """Starts `gw` (built whole by `Gateway.from_config`) and stops it.
    `shared_worker`: this worker's index when its pools are shared (`tierq serve
    --workers N`), and `workers` how many share them; `own_ledger`: the ledger
    is the gateway's to start and close."""

    async def priority_spend(since: float) -> list[tuple[str, Decimal]]:
        """Each key's priority spend in the ledger since `since` (Unix seconds)."""
        lines = await asyncio.to_thread(gw.ledger.usage, since)
        return [(line.key_id, line.cost) for line in lines if line.applied_tier == Tier.PRIORITY]

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        # The sims are entered first and exited last: every upstream client is
        # closed before its backend goes.
        async with contextlib.AsyncExitStack() as sims:
            try:
                embedded = [u for u in gw.config.upstreams if u.kind == "sim"]
                sim_urls: Mapping[str, str | Sequence[str]] = {}
                if sim is not None:
                    if any(u.replicas > 1 for u in embedded):
                        raise ValueError("one sim= backend cannot stand for [upstreams.sim] replicas > 1: "
                                         "pass start_sims (tierq.embedded) instead")
                    sim_urls = {u.name: sim.url for u in embedded}
                elif embedded and start_sims is not None:
                    sim_urls = await sims.enter_async_context(start_sims(embedded))
                for name, client in gw.upstreams.items():
                    await client.start(sim_urls.get(name))
                _wire_capacity(gw, gw.capacity)
                gw.capacity.start(record=gw.metrics.record_limits)
                _start_health(gw)
                if own_ledger:
                    await gw.ledger.start()
                gw.keys = await start_key_store(gw.config.keys)
                if gw.keys is not None:
                    gw.limiter = KeyLimiter(shared=key_buckets)
                    gw.downgrades = downgrades = Downgrades(
                        shared=key_buckets, capacity=gw.config.keys.table_capacity)
                    # Today's priority spend as the ledger has it: a restart
                    # keeps each key's budget where it was.
                    downgrades.rebuild(await priority_spend(downgrades.day_start()))
                cluster = gw.config.cluster
                if cluster is not None:
                    # With several workers the pools are shared: worker 0 runs
                    # the host's lease agent (the supervisor withheld every slot
                    # before forking), the others only make key decisions.
                    gw.cluster = Cluster(cluster, cluster.host_id or "tierq",
                                         {mid: (p.admission, p.entry.admission)
                                          for mid, p in gw.pools.items()},
                                         on_closed=lambda: gw.shed_waiting(CLUSTER_CLOSED),
                                         worker=shared_worker,
                                         workers=workers,
                                         replicas={mid: (p.replicas, p.entry.replica, p.upstream.endpoints)
                                                   for mid, p in gw.pools.items()
                                                   if p.replicas is not None
                                                   and p.entry.replica is not None})
                    if gw.keys is not None:
                        # The day's spend in Redis raised to the ledgers' (once
                        # per ledger: every host's own SQLite file, or the one
                        # PostgreSQL ledger they share), before the first
                        # request and after each Redis outage.
                        gw.cluster.downgrades.use_ledger(
                            priority_spend, store_kind(gw.config.ledger.url) == "postgresql")
                    await gw.cluster.start()
                    if gw.cluster.link.up:
                        try:
                            await gw.cluster.downgrades.catch_up()
                        except gw.cluster.link.RedisError as e:
                            gw.cluster.link.went_down(e)
                gw.watchdog.start()
                if gw.tracer is not None:
                    gw.tracer.start()
                gw.ready = True
                yield
            finally:
                gw.ready = False
                await gw.capacity.stop()
                await _stop_health(gw)
                await gw.watchdog.stop()
                if gw.cluster is not None:
                    await gw.cluster.stop()
                for client in [*gw.upstreams.values(), *gw.retired]:
                    await client.close()
                if gw.keys is not None:
                    await close_key_store(gw.keys)
                if own_ledger:
                    await gw.ledger.close()
                if gw.tracer is not None:
                    # Last: the spans of requests the drain ended are sent too.
                    await asyncio.to_thread(gw.tracer.stop)

    return ctx


async def reload(gw: Gateway, path: str | None, render_models: Callable[[Gateway], bytes],
                 data: bytes | None = None, defer_retune: bool = False) -> bool:
    """Re-reads the config file `path` and applies it to requests admitted from
    now on: prices, models and their flags, upstreams, admission settings,
    [keys] and [server]'s request bounds. Requests in flight keep what they
    started with (their pool, prices and upstream client); waiters stay in
    their lanes (a pool is retuned in place, `Admission.retune`). A config that
    fails to load is refused: one log line, `tierq_config_reload_total
    {result="error"}`, the running config stays. What needs a restart
    (listening, workers, ledger, cluster, admin, tracing, a sim upstream, the
    shared block's settings with several workers) is named in one line and
    the rest applied. `data`: the file's bytes as read earlier (a worker
    replacing one that died applies what the others applied, not edits made
    since). `defer_retune`: the pools keep their admission settings (and
    limits) and the new ones wait in `gw.retunes` for `retune` (with several
    workers: once every worker holds the new config, so a waiter a raised
    limit grants is priced by it on whichever worker it waits). Returns
    whether it was applied."""
    if path is None:
        log.warning("config reload refused: serving the embedded default (no --config file)")
        gw.metrics.reloads["error"] += 1
        return False
    try:
        if data is None:
            with open(path, "rb") as f:
                data = f.read()
        # Parsed and hashed from the same bytes: an edit racing the reload
        # cannot make /status.json name a config that was not applied.
        new = load_config(path, data.decode("utf-8"))
        catalog = Catalog.from_config(new)
    except (ConfigError, OSError, ValueError) as e:
        log.error("config reload refused, the running config stays: %s", e)
        gw.metrics.reloads["error"] += 1
        return False
    old = gw.config
    restart: list[str] = []
    for section in ("ledger", "cluster", "admin", "tracing"):
        if getattr(new, section) != getattr(old, section):
            restart.append(f"[{section}]")
    for name in ("host", "port", "workers"):
        if getattr(new.server, name) != getattr(old.server, name):
            restart.append(f"server.{name}")
    # What is not applied stays as it runs, so the config in force reads true.
    applied = dataclasses.replace(
        new, ledger=old.ledger, cluster=old.cluster, admin=old.admin, tracing=old.tracing,
        server=dataclasses.replace(new.server, host=old.server.host, port=old.server.port,
                                   workers=old.server.workers))
    upstreams, started = await _reload_upstreams(gw, applied, catalog, restart)
    store, previous = gw.keys, None
    if applied.keys != old.keys:
        store, previous = await start_key_store(applied.keys), gw.keys
        if (store is None) != (previous is None):
            # Keys turned on or off: the limiter, the downgrades and (with
            # several workers) their shared buckets are made at start.
            restart.append("[keys] (turned on or off)")
            if store is not None:
                await close_key_store(store)
            store, previous = gw.keys, None
            applied = dataclasses.replace(applied, keys=old.keys)
    # From here to the swap nothing awaits: a waiter the retune grants runs
    # after it, and is priced by the config this worker then holds (its pools
    # and prices), the one `config_sha256` names in its access line.
    retunes: dict[str, AdmissionConfig] = {}
    pools = _reload_pools(gw, catalog, upstreams, restart, retunes)
    if previous is None and store is not None:
        store.forget_all()  # keys and their limits read again
    gw.keys = store
    gw.retired.extend(c for name, c in gw.upstreams.items() if upstreams.get(name) is not c)
    gw.config, gw.catalog, gw.upstreams, gw.pools = applied, catalog, upstreams, pools
    gw.retunes = retunes
    if not defer_retune:
        retune(gw)
    gw.models_body = render_models(gw)
    gw.watchdog.timeout_s = applied.server.write_timeout_s
    gw.config_sha256 = hashlib.sha256(data).hexdigest()
    gw.config_loaded = time.time()
    gw.metrics.reloads["applied"] += 1
    if previous is not None:
        await close_key_store(previous)
    await _rewire_capacity(gw)
    await _stop_health(gw)
    _start_health(gw)
    log.info("config reloaded from %s (sha256 %s): %d models, %d upstreams (%d new clients)%s",
             path, gw.config_sha256[:12], len(pools), len(upstreams), started,
             "; needs a restart to take effect: " + ", ".join(restart) if restart else "")
    return True


async def _reload_upstreams(gw: Gateway, config: Config, catalog: Catalog,
                            restart: list[str]) -> tuple[dict[str, UpstreamClient], int]:
    """An upstream whose settings are unchanged keeps its client; a changed or
    new one gets a new client (the old one stays open for requests in flight).
    A sim upstream is started with the process: its changes need a restart."""
    pool_sizes = connection_bounds(catalog)
    out: dict[str, UpstreamClient] = {}
    started = 0
    for u in config.upstreams:
        current = gw.upstreams.get(u.name)
        # Its connection pool is sized from its models' limits: a raised limit
        # needs the connections too.
        size = u.max_connections or min(pool_sizes.get(u.name, 1), 4096)
        if current is not None and current.config == u and current.pool_size == size:
            out[u.name] = current
            continue
        if current is not None and current.config.endpoints != u.endpoints:
            # Its pools' replica slots are counted by endpoint: kept until a restart.
            out[u.name] = current
            restart.append(f"upstreams.{u.name}.endpoints")
            continue
        if current is not None and current.config.kind == "sim" and current.config.sim == u.sim \
                and dataclasses.replace(current.config, max_connections=None) == \
                dataclasses.replace(u, max_connections=None):
            sim_client = UpstreamClient(u, u.base_url, size)
            await sim_client.start(current.endpoints)  # the same in-process sims
            out[u.name] = sim_client
            started += 1
            continue
        if u.kind == "sim" or (current is not None and current.config.kind == "sim"):
            if current is not None:
                out[u.name] = current
            restart.append(f"upstreams.{u.name} (kind sim)")
            continue
        client = UpstreamClient(u, u.base_url, size)
        await client.start()
        out[u.name] = client
        started += 1
    return out, started


def _reload_pools(gw: Gateway, catalog: Catalog, upstreams: dict[str, UpstreamClient],
                  restart: list[str], retunes: dict[str, AdmissionConfig]) -> dict[str, Pool]:
    """A pool per model: a model kept keeps its admission (its queue and slots,
    its new settings put in `retunes` for `retune`) and who got its service; a
    new one starts empty. With shared pools (several workers, [cluster]) a
    model cannot be added and the shared block's settings stay."""
    pools: dict[str, Pool] = {}
    for m in catalog.values():
        if m.upstream not in upstreams:  # a sim upstream added: not started
            continue
        current = gw.pools.get(m.id)
        if current is None:
            if gw.shared_pools:
                restart.append(f"models.{m.id} (new)")
                continue
            pools[m.id] = Pool.new(m, Admission(m.admission.settings), upstreams[m.upstream])
            continue
        target = _retune_target(gw, m.id, current, m.admission, restart)
        if target != current.entry.admission:
            retunes[m.id] = target
        entry = dataclasses.replace(m, admission=current.entry.admission)
        if m.replicas != current.entry.replicas or m.replica != current.entry.replica:
            restart.append(f"models.{m.id} (its upstream's endpoints)")
            entry = dataclasses.replace(entry, replica=current.entry.replica, replicas=current.entry.replicas)
        pools[m.id] = Pool(entry, current.admission, upstreams[m.upstream], current.flows, current.replicas)
    return pools


def retune(gw: Gateway) -> None:
    """Applies the settings the last reload left in `gw.retunes` to the pools'
    admission in place (a raised limit grants waiters at once); a setting the
    core refuses stays as it is, named in one line."""
    restart: list[str] = []
    for model, new in gw.retunes.items():
        pool = gw.pools.get(model)
        if pool is None:
            continue
        try:
            pool.admission.retune(new.settings)
        except ValueError as e:  # mailboxes sized by a shared pool's max_concurrency
            restart.append(f"models.{model}.admission ({e})")
            continue
        pool.entry = dataclasses.replace(pool.entry, admission=new)
    gw.retunes = {}
    if restart:
        log.warning("config reload: needs a restart to take effect: %s", ", ".join(restart))


def _retune_target(gw: Gateway, model: str, pool: Pool, new: AdmissionConfig,
                   restart: list[str]) -> AdmissionConfig:
    """The settings `new` leaves the pool's admission with once retuned (what
    cannot change in place stays, named in `restart`)."""
    old = pool.entry.admission
    if gw.config.cluster is not None:
        restart.append(f"models.{model}.admission ([cluster])")
        return old
    kept = SHARED_BLOCK_KEYS if gw.shared_pools else _LAYOUT_KEYS
    held = [k for k in kept if new.written.get(k) != old.written.get(k)]
    restart.extend(f"models.{model}.admission.{k}" for k in held)
    if held:
        new = new.but(**cast("_SettingsKwargs", {k: old.written.get(k) for k in held}))
    return old if new == old else new


def _start_health(gw: Gateway) -> None:
    """A health loop per upstream with several endpoints (tierq.probes): its
    probes run, and each change of a replica's health (ejected, back, a step
    of its slow start) reaches the cores of the pools it serves. A client
    kept over a reload keeps its replicas' health; the loop's first check
    writes what is not healthy into pools made since."""
    for client in gw.upstreams.values():
        health = client.health
        if health is None:
            continue

        def apply(i: int, state: ReplicaState, share: float, client: UpstreamClient = client) -> None:
            health = client.health
            assert health is not None
            for p in gw.pools.values():
                if p.upstream is client and p.replicas is not None and i < p.replicas.core.count:
                    down = state is ReplicaState.EJECTED
                    cap = health.limit(i, p.replicas.learned(i)) if state is ReplicaState.SLOW_START else 0
                    p.replicas.set_health(i, down, cap)

        loop = HealthLoop(client.name, health, client.endpoints, apply,
                          connect_timeout_s=client.config.connect_timeout_s)
        health.listener = loop.check
        loop.start()
        gw.health_loops.append(loop)


async def _stop_health(gw: Gateway) -> None:
    loops, gw.health_loops = gw.health_loops, []
    for loop in loops:
        loop.health.listener = None
        await loop.stop()


async def _rewire_capacity(gw: Gateway) -> None:
    """What feeds the pools' limits, wired again to the pools and upstreams now served."""
    await gw.capacity.stop()
    capacity = Capacity()
    _wire_capacity(gw, capacity)
    capacity.start(record=gw.metrics.record_limits)
    gw.capacity = capacity


def _wire_capacity(gw: Gateway, capacity: Capacity) -> None:
    """Each upstream's endpoints scraped, each pool fed (per replica when it has several)."""
    for u in gw.config.upstreams:
        client = gw.upstreams.get(u.name)
        if client is not None:
            capacity.add_upstream(u.name, u.kind, client.endpoints, u.metrics,
                                  u.metrics_urls or u.metrics_url, u.metrics_interval_ms / 1000.0)
    for p in gw.pools.values():
        feeds = [p.replicas.feed(i) for i in range(p.entry.replicas)] if p.replicas is not None else []
        capacity.add_pool(p.entry.id, p.entry.upstream_model, p.entry.upstream, p.admission, feeds)
