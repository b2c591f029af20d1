"""tierq's TOML configuration: parsed, strictly validated, frozen.

`load_config(path)` reads one file (sections server, ledger, pricing, upstreams,
models with [models.admission], keys); `default_config()` is the embedded
default. Any problem raises ConfigError, whose str is one line naming the file
and the key path, so `tierq serve` can print it instead of a traceback.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal, Unpack, cast, get_args

import yarl

from tierq._core import PoolSettings, SettingsError
from tierq.catalog import builtin_prices, builtin_priority
from tierq.health import HEALTH_DEFAULTS, HealthSettings
from tierq.pricing import DEFAULT_FLEX_MULTIPLIER, DEFAULT_PRIORITY_MULTIPLIER, femto_per_token
from tierq.storage import DEFAULT_LEDGER_URL, DEFAULT_SPOOL, Durability, StoreKind, sqlite_path, store_kind
from tierq.toml_tables import ConfigError, Table, read_toml, show

if TYPE_CHECKING:
    from tierq._core import _SettingsKwargs

__all__ = [
    "AdminConfig",
    "AdmissionConfig",
    "ClusterConfig",
    "Config",
    "ConfigError",
    "KeysConfig",
    "LedgerConfig",
    "ModelConfig",
    "PricingConfig",
    "ServerConfig",
    "SimSettings",
    "TracingConfig",
    "Routing",
    "UpstreamConfig",
    "UpstreamClientKind",
    "UpstreamKind",
    "default_config",
    "default_upstream_client",
    "load_config",
]

UpstreamKind = Literal["openai", "vllm", "sglang", "trtllm", "sim"]
# How a request's replica is chosen among an upstream's endpoints
# (tierq.routing): prefix affinity within a load bound, least loaded, or in turn.
Routing = Literal["prefix", "least_loaded", "round_robin"]
# Replicas in one pool: a replica order is one u64 of 4-bit numbers (core/replicas.rs).
MAX_ENDPOINTS: Final = 16
# Which HTTP client talks to an upstream (`[[upstreams]] client`).
UpstreamClientKind = Literal["aiohttp", "core"]
UPSTREAM_CLIENT_ENV: Final = "TIERQ_UPSTREAM_CLIENT"


def default_upstream_client() -> UpstreamClientKind:
    """`[[upstreams]] client` when not written: $TIERQ_UPSTREAM_CLIENT, else "core"."""
    value = os.environ.get(UPSTREAM_CLIENT_ENV) or "core"
    if value not in get_args(UpstreamClientKind):
        raise ConfigError(f"${UPSTREAM_CLIENT_ENV}", "", f'must be "aiohttp" or "core", got {value!r}')
    return cast(UpstreamClientKind, value)


# What a host does while Redis is unreachable (tierq.cluster): keep serving
# with its share of each limit, or answer 503.
RedisDown = Literal["local", "closed"]
SIM_UPSTREAM: Final = "sim"
_SHA256_HEX: Final = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True, slots=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    workers: int = 1
    # Largest request body accepted (413 beyond). Chat prompts with inline
    # images are the big ones; 8 MiB leaves room for a few.
    max_body_bytes: int = 8 * 1024 * 1024
    # Time allowed to receive a request body once its headers are in (408 beyond).
    body_timeout_s: float = 30.0
    # Idle keep-alive bound. aiohttp arms this timer when a connection opens and
    # after each response and closes the connection if a request's headers are
    # still incomplete when it fires: it is also the header read timeout.
    keepalive_timeout_s: float = 30.0
    # On SIGTERM: time given to requests already admitted (streams included) to
    # finish; queued ones are shed with 503 at once.
    drain_timeout_s: float = 30.0
    # Longest a write to a client (a stream chunk or a JSON body) may wait for
    # the client to read; beyond it the gateway cuts the connection and frees
    # the slot, as for a client that hung up.
    write_timeout_s: float = 30.0
    # Largest `n` (choices per request) accepted; 400 beyond. OpenAI's own bound
    # is 128. Each choice can take max_tokens, so the key's token estimate is n x.
    max_n: int = 128
    # The file holding the server's pid (`tierq reload` signals it), written at
    # start and removed at exit; None: tierq.pid beside the ledger.
    pid_file: str | None = None


@dataclass(frozen=True, slots=True)
class LedgerConfig:
    url: str = DEFAULT_LEDGER_URL
    # For the SQLite ledger, and for a PostgreSQL ledger's spool.
    durability: Durability = "process"
    # postgresql:// only: the environment variable holding the password (when
    # the URL carries none), and the spool file used while PostgreSQL is down.
    password_env: str | None = None
    spool: str = DEFAULT_SPOOL


@dataclass(frozen=True, slots=True)
class PricingConfig:
    priority_multiplier: Decimal = DEFAULT_PRIORITY_MULTIPLIER
    flex_multiplier: Decimal = DEFAULT_FLEX_MULTIPLIER


@dataclass(frozen=True, slots=True)
class SimSettings:
    """An in-process simulated backend (upstream kind "sim")."""

    slots: int = 8
    ttft_ms: float = 50.0
    tokens_per_s: float = 50.0
    # In-process engines, each its own endpoint of the upstream (tierq.embedded).
    replicas: int = 1


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    name: str
    # "" for kind "sim": the in-process sim's URL is only known once it listens.
    base_url: str
    kind: UpstreamKind = "openai"
    priority_scheduling: bool = False
    # Managed credential: the gateway sends `Bearer $api_key_env`. Without it the
    # client may bring its own in the `x-upstream-authorization` header.
    api_key_env: str | None = None
    connect_timeout_s: float = 10.0
    # Longest silence between two reads of an upstream response (a stream's
    # chunks included), not a bound on the whole response.
    read_timeout_s: float = 300.0
    # Connection pool size; by default the sum of its models' most slots
    # (a fixed max_concurrency, or an adaptive limit's max_concurrency_limit).
    max_connections: int | None = None
    sim: SimSettings | None = None
    # Read the engine's load (vLLM/SGLang Prometheus names) every
    # metrics_interval_ms to learn the pools' concurrency limits: kinds vllm,
    # sglang and sim, unless metrics = false (the limit then follows time to
    # first token). metrics_url None: derived from base_url (tierq.capacity).
    metrics: bool = True
    metrics_url: str | None = None
    metrics_interval_ms: float = 100.0
    # `[upstreams.health]`: when a replica is ejected and how it comes back.
    health: HealthSettings = HEALTH_DEFAULTS
    # `endpoints = [...]`: the replicas serving this upstream's models, one
    # pool of lanes over them (`base_url` is the first). Empty: `base_url`
    # alone (one replica). `metrics_urls`: each endpoint's, in the same order
    # (empty: derived, as `metrics_url` is). max_connections bounds each.
    endpoints: tuple[str, ...] = ()
    metrics_urls: tuple[str, ...] = ()
    routing: Routing = "prefix"
    # Which HTTP client talks to it: "core" (core/upstream.rs: the exchange and
    # the SSE rewrite off the GIL; the default) or "aiohttp" (Python's). The
    # default can be set with $TIERQ_UPSTREAM_CLIENT (used to run the tests on both).
    client: UpstreamClientKind = field(default_factory=lambda: default_upstream_client())
    # PEM certificates trusted for an https:// base_url instead of the system
    # roots (client "core"; aiohttp's client always uses the system roots).
    ca_file: str | None = None

    @property
    def replicas(self) -> int:
        """How many endpoints (engines) serve this upstream."""
        if self.sim is not None:
            return self.sim.replicas
        return max(1, len(self.endpoints))


@dataclass(frozen=True, slots=True, init=False)
class AdmissionConfig:
    """One pool's `[models.admission]` as written (`written`: the keys given,
    the upstream's `engine_interval_ms` among them) and `settings`, the
    `PoolSettings` the core validated from it: the one object `Admission` and
    the shared pools take. The keys, their types, defaults and ranges are the
    core's (`PoolSettings.FIELDS`); constructing one raises `SettingsError`
    (naming the key) for a value the core refuses."""

    written: dict[str, object]
    settings: PoolSettings = field(repr=False, compare=False)

    def __init__(self, **written: Unpack[_SettingsKwargs]) -> None:
        given = {k: v for k, v in written.items() if v is not None}
        object.__setattr__(self, "written", given)
        object.__setattr__(self, "settings", PoolSettings(**cast("_SettingsKwargs", given)))

    def but(self, **changes: Unpack[_SettingsKwargs]) -> AdmissionConfig:
        """The same settings with `changes` (None: back to the default)."""
        return AdmissionConfig(**cast("_SettingsKwargs", {**self.written, **changes}))


@dataclass(frozen=True, slots=True)
class ModelConfig:
    id: str
    upstream: str
    priority: bool | None = None  # None: the built-in flag (false if not built in)
    input_per_m: Decimal | None = None  # None: the built-in price
    output_per_m: Decimal | None = None
    upstream_model: str | None = None  # name sent upstream, if not `id`
    admission: AdmissionConfig = field(default_factory=AdmissionConfig)
    flex: bool = False  # serves service_tier="flex" from idle capacity


@dataclass(frozen=True, slots=True)
class KeysConfig:
    # The API key store (tierq.keys): a SQLite file or sqlite:/// URL, or a
    # postgresql:// URL shared by every host (`[keys] url`). None: no keys,
    # loopback-only serving.
    path: str | None = None
    # Keys the host-wide per-key limit table holds with several workers.
    table_capacity: int = 4096
    # postgresql:// only: the password's environment variable, and how often
    # each host re-reads the key table (the bound on a revocation reaching it).
    password_env: str | None = None
    refresh_s: float = 2.0
    # How long a worker keeps a key it has checked without reading the store
    # again (SQLite); a change made through the admin API on this host reaches
    # every worker at once, one made elsewhere within this.
    cache_ttl_s: float = 5.0


@dataclass(frozen=True, slots=True)
class AdminConfig:
    """[admin]: the key management API (/admin/v1, tierq.admin)."""

    # sha256 (hex) of the bearer token the API takes; None: no admin API.
    token_sha256: str | None = None
    # "host:port" the admin API listens on, on its own; None: on the main
    # port, for loopback clients only.
    listen: tuple[str, int] | None = None


@dataclass(frozen=True, slots=True)
class ClusterConfig:
    """[cluster]: several gateway hosts sharing slots and key limits through Redis."""

    # redis:// or rediss:// (TLS); user and password may be in the URL.
    redis_url: str
    # Environment variable holding the Redis password (overrides the URL's).
    password_env: str | None = None
    # This host's name in Redis; None: hostname:port (tierq.cluster).
    host_id: str | None = None
    # A host that stops refreshing its lease for this long loses its slots.
    lease_ttl_ms: int = 3000
    on_redis_down: RedisDown = "local"
    # Redis Sentinel: ("host", port) of each sentinel and the primary's name
    # in them; the primary's address then comes from the sentinels (redis_url
    # gives the db, credentials and TLS). Empty: redis_url's host is Redis.
    sentinels: tuple[tuple[str, int], ...] = ()
    sentinel_master: str | None = None


@dataclass(frozen=True, slots=True)
class TracingConfig:
    """[tracing]: OpenTelemetry traces over OTLP/HTTP (tierq.tracing); off without otlp_endpoint."""

    # The collector's OTLP/HTTP base URL ("/v1/traces" is added when it has no path).
    otlp_endpoint: str
    # The share of requests without a client traceparent that are traced; a
    # client's traceparent decides by its sampled flag.
    sample_ratio: float = 0.01
    service_name: str = "tierq"


@dataclass(frozen=True, slots=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    ledger: LedgerConfig = field(default_factory=LedgerConfig)
    pricing: PricingConfig = field(default_factory=PricingConfig)
    upstreams: tuple[UpstreamConfig, ...] = ()
    models: tuple[ModelConfig, ...] = ()  # empty: serve the whole built-in catalog
    keys: KeysConfig = field(default_factory=KeysConfig)
    source: str | None = None  # the file it came from; None for the embedded default
    cluster: ClusterConfig | None = None  # None: this host alone (the embedded default)
    admin: AdminConfig = field(default_factory=AdminConfig)
    tracing: TracingConfig | None = None  # None: no traces (the embedded default)

    def upstream(self, name: str) -> UpstreamConfig:
        for u in self.upstreams:
            if u.name == name:
                return u
        raise KeyError(name)


def default_config() -> Config:
    """The embedded default: built-in catalog, in-process sim, ./tierq.db."""
    return Config(upstreams=(_sim_upstream(),))


def _sim_upstream() -> UpstreamConfig:
    return UpstreamConfig(name=SIM_UPSTREAM, base_url="", kind="sim", sim=SimSettings())


def load_config(path: str | Path, text: str | None = None) -> Config:
    """Read and validate a tierq TOML file (`text`: its contents, already read)."""
    top = read_toml(path, text)
    return _Parser(top.file).config(top)


# ---------------------------------------------------------------- validation


class _Parser:
    def __init__(self, file: str) -> None:
        self.file = file

    def config(self, top: Table) -> Config:
        server = self.server(top.table("server"))
        ledger = self.ledger(top.table("ledger"))
        pricing = self.pricing(top.table("pricing"))
        upstream_tables = top.array_of_tables("upstreams")
        upstreams = tuple(self.upstream(t) for t in upstream_tables)
        if not upstreams:
            # No [[upstreams]]: the file tunes server/ledger/etc. and the gateway
            # keeps the in-process sim, as with no file at all.
            upstreams = (_sim_upstream(),)
        seen: dict[str, int] = {}
        for i, u in enumerate(upstreams):
            if u.name in seen:
                raise ConfigError(self.file, f"upstreams[{i}].name",
                                  f'duplicate upstream name "{u.name}" (also upstreams[{seen[u.name]}])')
            seen[u.name] = i
        models = tuple(self.model(t, upstreams, pricing)
                       for t in top.array_of_tables("models"))
        if not models:  # the whole built-in table is served, at these multipliers
            for model_id, prices in builtin_prices().items():
                for price in (prices.input_per_m, prices.output_per_m):
                    for key, mult in (("priority_multiplier", pricing.priority_multiplier),
                                      ("flex_multiplier", pricing.flex_multiplier)):
                        try:
                            femto_per_token(price, mult)
                        except ValueError as e:
                            raise ConfigError(self.file, f"pricing.{key}",
                                              f"{model_id}: {e}") from None
        ids: dict[str, int] = {}
        for i, m in enumerate(models):
            if m.id in ids:
                raise ConfigError(self.file, f"models[{i}].id",
                                  f'duplicate model id "{m.id}" (also models[{ids[m.id]}])')
            ids[m.id] = i
        keys = self.keys(top.table("keys"))
        cluster = self.cluster(top.table("cluster")) if top.has("cluster") else None
        admin = self.admin(top.table("admin"))
        tracing = self.tracing(top.table("tracing"))
        top.done()
        return Config(server, ledger, pricing, upstreams, models, keys, self.file, cluster, admin,
                      tracing)

    def server(self, t: Table) -> ServerConfig:
        d = ServerConfig()
        host = t.string("host", d.host)
        port = t.integer("port", d.port, 0, 65535)
        workers = t.integer("workers", d.workers, 1, 1024)
        max_body = t.integer("max_body_bytes", d.max_body_bytes, 1024, 1 << 30)
        body_timeout = t.number("body_timeout_s", d.body_timeout_s, 0.0, 3600.0, lo_open=True)
        keepalive = t.number("keepalive_timeout_s", d.keepalive_timeout_s, 0.0, 3600.0, lo_open=True)
        drain = t.number("drain_timeout_s", d.drain_timeout_s, 0.0, 3600.0)
        write = t.number("write_timeout_s", d.write_timeout_s, 0.0, 3600.0, lo_open=True)
        max_n = t.integer("max_n", d.max_n, 1, 1024)
        pid_file = t.string("pid_file")
        if pid_file is not None and not pid_file.strip():
            raise t.fail("pid_file", "must not be empty")
        t.done()
        return ServerConfig(
            _s(host), _i(port), _i(workers), _i(max_body), _f(body_timeout), _f(keepalive),
            _f(drain), _f(write), _i(max_n), pid_file,
        )

    def ledger(self, t: Table) -> LedgerConfig:
        url = _s(t.string("url", DEFAULT_LEDGER_URL))
        kind = self.store_url(t, "url", url)
        durability = _s(t.string("durability", "process"))
        if durability not in get_args(Durability):
            raise t.fail("durability", f'expected "process" or "power", got {show(durability)}')
        password_env = self.password_env(t, url, kind)
        spool = t.string("spool")
        if spool is not None:
            if kind != "postgresql":
                raise t.fail("spool", "only for a postgresql:// url (the spool holds its rows "
                                      "while PostgreSQL is unreachable)")
            try:
                sqlite_path(spool)
            except ValueError as e:
                raise t.fail("spool", str(e)) from None
        t.done()
        return LedgerConfig(url, cast(Durability, durability), password_env,
                            spool if spool is not None else DEFAULT_SPOOL)

    def store_url(self, t: Table, key: str, url: str) -> StoreKind:
        try:
            return store_kind(url)
        except ValueError as e:
            raise t.fail(key, str(e)) from None

    def password_env(self, t: Table, url: str, kind: StoreKind) -> str | None:
        name = t.string("password_env")
        if name is None:
            return None
        if kind != "postgresql":
            raise t.fail("password_env", "only for a postgresql:// url")
        if not name or "=" in name:
            raise t.fail("password_env", f"not an environment variable name: {show(name)}")
        if yarl.URL(url).password is not None:
            raise t.fail("password_env", "the url carries a password already; give one or the other")
        return name

    def pricing(self, t: Table) -> PricingConfig:
        mult = t.amount("priority_multiplier")
        if mult is not None and mult < 1:
            # A priority tier cheaper than default would pay users to jump the queue.
            raise t.fail("priority_multiplier", f"must be at least 1, got \"{mult}\"")
        flex = t.amount("flex_multiplier")
        if flex is not None and not 0 < flex <= 1:
            # Flex is sold below default (idle capacity), never free or above it.
            raise t.fail("flex_multiplier", f"must be above 0 and at most 1, got \"{flex}\"")
        t.done()
        return PricingConfig(mult if mult is not None else DEFAULT_PRIORITY_MULTIPLIER,
                             flex if flex is not None else DEFAULT_FLEX_MULTIPLIER)

    def upstream(self, t: Table) -> UpstreamConfig:
        name = _s(t.string("name", required=True))
        kind = _s(t.string("kind", "openai"))
        if kind not in get_args(UpstreamKind):
            raise t.fail("kind", f'expected one of "openai", "vllm", "sglang", "trtllm", "sim", got {show(kind)}')
        base_url = t.string("base_url")
        endpoints: tuple[str, ...] = ()
        sim: SimSettings | None = None
        if kind == "sim":
            for key in ("base_url", "endpoints"):
                if t.has(key):
                    t.get(key)
                    raise t.fail(key, 'not allowed for kind "sim" (the in-process sim picks a free '
                                 'loopback port; [upstreams.sim] replicas = N runs N)')
            base_url = ""
            st = t.table("sim")
            d = SimSettings()
            sim = SimSettings(
                _i(st.integer("slots", d.slots, 1, 100000)),
                _f(st.number("ttft_ms", d.ttft_ms, 0.0, 600000.0)),
                _f(st.number("tokens_per_s", d.tokens_per_s, 0.0, 1e9)),
                _i(st.integer("replicas", d.replicas, 1, MAX_ENDPOINTS)),
            )
            st.done()
        else:
            if t.has("sim"):
                t.get("sim")
                raise t.fail("sim", 'only allowed for kind "sim"')
            if t.has("endpoints"):
                if base_url is not None:
                    raise t.fail("endpoints", "set together with base_url: give one of the two")
                endpoints = self.url_list(t, "endpoints")
                base_url = endpoints[0]
            elif base_url is None:
                raise t.fail("base_url", "required (or endpoints = [...])")
            else:
                base_url = self.base_url(t, base_url)
        routing = _s(t.string("routing", "prefix"))
        if routing not in get_args(Routing):
            raise t.fail("routing", f'expected one of "prefix", "least_loaded", "round_robin", got {show(routing)}')
        d_up = UpstreamConfig(name="", base_url="")
        # The sim takes vLLM's int `priority`, so it can stand in for a vLLM engine.
        priority_scheduling = bool(t.boolean("priority_scheduling", False))
        api_key_env = t.string("api_key_env")
        connect = _f(t.number("connect_timeout_s", d_up.connect_timeout_s, 0.0, 600.0, lo_open=True))
        read = _f(t.number("read_timeout_s", d_up.read_timeout_s, 0.0, 86400.0, lo_open=True))
        max_conn = t.integer("max_connections", None, 1, 100000)
        metrics = bool(t.boolean("metrics", d_up.metrics))
        metrics_url = t.string("metrics_url")
        if metrics_url is not None:
            if kind == "sim":
                raise t.fail("metrics_url", 'not allowed for kind "sim" (its own /metrics is read)')
            metrics_url = self.url(t, "metrics_url", metrics_url)
        metrics_urls: tuple[str, ...] = ()
        if t.has("metrics_urls"):
            if not endpoints:
                t.get("metrics_urls")
                raise t.fail("metrics_urls", "only with endpoints = [...] (one per endpoint, same order)")
            if metrics_url is not None:
                raise t.fail("metrics_urls", "set together with metrics_url: give one of the two")
            metrics_urls = self.url_list(t, "metrics_urls")
            if len(metrics_urls) != len(endpoints):
                raise t.fail("metrics_urls", f"expected {len(endpoints)} URLs (one per endpoint, same order), "
                             f"got {len(metrics_urls)}")
        elif metrics_url is not None and len(endpoints) > 1:
            raise t.fail("metrics_url", "one URL for several endpoints: use metrics_urls = [...], one per endpoint")
        interval = _f(t.number("metrics_interval_ms", d_up.metrics_interval_ms, 10.0, 60000.0))
        health = self.health(t.table("health"))
        client = _s(t.string("client", default_upstream_client()))
        if client not in get_args(UpstreamClientKind):
            raise t.fail("client", f'expected one of "aiohttp", "core", got {show(client)}')
        ca_file = t.string("ca_file")
        if ca_file is not None and client != "core":
            raise t.fail("ca_file", 'only taken by client = "core"')
        t.done()
        return UpstreamConfig(
            name, base_url, cast(UpstreamKind, kind), priority_scheduling, api_key_env,
            connect, read, max_conn, sim, metrics, metrics_url, interval, health=health,
            endpoints=endpoints, metrics_urls=metrics_urls, routing=cast(Routing, routing),
            client=cast(UpstreamClientKind, client), ca_file=ca_file,
        )

    def health(self, t: Table) -> HealthSettings:
        d = HEALTH_DEFAULTS
        base = _f(t.number("base_ejection_s", d.base_ejection_s, 0.0, 86400.0, lo_open=True))
        cap = _f(t.number("max_ejection_s", max(d.max_ejection_s, base), 0.0, 86400.0, lo_open=True))
        if cap < base:
            raise t.fail("max_ejection_s", f"must be at least base_ejection_s ({base}), got {cap}")
        health = HealthSettings(
            consecutive_failures=_i(t.integer("consecutive_failures", d.consecutive_failures, 1, 1000)),
            base_ejection_s=base,
            max_ejection_s=cap,
            max_ejection_percent=_i(t.integer("max_ejection_percent", d.max_ejection_percent, 0, 100)),
            slow_start_s=_f(t.number("slow_start_s", d.slow_start_s, 0.0, 3600.0)),
            probe_interval_s=_f(t.number("probe_interval_s", d.probe_interval_s, 0.0, 3600.0,
                                         lo_open=True)),
        )
        t.done()
        return health

    def url_list(self, t: Table, key: str) -> tuple[str, ...]:
        """A non-empty list of distinct URLs (`endpoints`, `metrics_urls`)."""
        v = t.get(key)
        if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
            raise t.fail(key, f"expected a list of URL strings, got {show(v)}")
        if not v:
            raise t.fail(key, "must not be empty")
        if len(v) > MAX_ENDPOINTS:
            raise t.fail(key, f"at most {MAX_ENDPOINTS} URLs, got {len(v)}")
        urls = tuple(self.url(t, key, x) for x in v)
        for i, u in enumerate(urls):
            if u in urls[:i]:
                raise t.fail(key, f"duplicate URL {show(u)} (entries {urls.index(u)} and {i})")
        return urls

    def base_url(self, t: Table, value: str) -> str:
        return self.url(t, "base_url", value)

    def url(self, t: Table, key: str, value: str) -> str:
        try:
            url = yarl.URL(value)
        except ValueError:
            raise t.fail(key, f"not a URL: {show(value)}") from None
        if url.scheme not in ("http", "https") or not url.host:
            raise t.fail(key, f"expected an http:// or https:// URL with a host, got {show(value)}")
        if url.user is not None or url.password is not None:
            raise t.fail(key, "must not carry credentials (use api_key_env)")
        if url.query_string or url.fragment:
            raise t.fail(key, "must not have a query or fragment")
        return value.rstrip("/")

    def model(self, t: Table, upstreams: tuple[UpstreamConfig, ...], pricing: PricingConfig) -> ModelConfig:
        model_id = _s(t.string("id", required=True))
        upstream = t.string("upstream")
        names = [u.name for u in upstreams]
        if upstream is None:
            if len(upstreams) > 1:
                raise t.fail("upstream", "required when more than one upstream is declared")
            upstream = names[0]
        elif upstream not in names:
            raise t.fail("upstream", f'unknown upstream "{upstream}" (declared: {", ".join(names)})')
        priority = t.boolean("priority", None)
        flex = bool(t.boolean("flex", False))
        input_per_m = t.amount("input_per_m")
        output_per_m = t.amount("output_per_m")
        builtin = builtin_prices().get(model_id)
        for name, v in (("input_per_m", input_per_m), ("output_per_m", output_per_m)):
            if v is None and builtin is None:
                raise t.fail(name, "required for a model not in the built-in catalog")
            price = v if v is not None else getattr(builtin, name)
            try:  # billed in whole femto-USD per token at every tier (tierq.pricing)
                femto_per_token(price, pricing.priority_multiplier)
                femto_per_token(price)
                if flex:
                    femto_per_token(price, pricing.flex_multiplier)
            except ValueError as e:
                raise t.fail(name, str(e)) from None
        upstream_model = t.string("upstream_model")
        served_by = next(u for u in upstreams if u.name == upstream)
        admission = self.admission(t.table("admission"), served_by.metrics_interval_ms)
        sells_priority = priority if priority is not None else builtin is not None and builtin_priority(model_id)
        if not sells_priority and "flex_priority_reserve" not in admission.written:
            # The reserve keeps a slot for priority arrivals while flex waits:
            # on a model without priority nobody could use it.
            admission = admission.but(flex_priority_reserve=0)
        t.done()
        return ModelConfig(model_id, upstream, priority, input_per_m, output_per_m,
                           upstream_model, admission, flex)

    def admission(self, t: Table, engine_interval_ms: float) -> AdmissionConfig:
        """The table's values pass through to the core, which checks their
        types, ranges and combinations and names the key. The engine signal's
        interval is the upstream's `metrics_interval_ms`."""
        given = {f.name: t.get(f.name) for f in PoolSettings.FIELDS if f.toml and t.has(f.name)}
        t.done()
        try:
            return AdmissionConfig(**cast("_SettingsKwargs", {**given, "engine_interval_ms": engine_interval_ms}))
        except SettingsError as e:
            raise t.fail(e.key, e.reason) from None

    def cluster(self, t: Table) -> ClusterConfig:
        d = ClusterConfig(redis_url="")
        url = _s(t.string("redis_url", required=True))
        try:
            parsed = yarl.URL(url)
        except ValueError:
            parsed = None
        # Only the scheme is ever echoed: the URL may carry a password.
        if parsed is None or parsed.scheme not in ("redis", "rediss") or not parsed.host:
            raise t.fail("redis_url", "expected redis://host:port/db or rediss://host:port/db")
        db = parsed.path.strip("/")
        if db and not db.isdigit():
            raise t.fail("redis_url", "the path must be a database number, as in redis://host:6379/0")
        password_env = t.string("password_env")
        host_id = t.string("host_id")
        if host_id is not None and (len(host_id) > 200 or not host_id.isprintable()):
            raise t.fail("host_id", "must be 1 to 200 printable characters")
        ttl = _i(t.integer("lease_ttl_ms", d.lease_ttl_ms, 300, 600_000))
        down = _s(t.string("on_redis_down", d.on_redis_down))
        if down not in get_args(RedisDown):
            raise t.fail("on_redis_down", f'expected "local" or "closed", got {show(down)}')
        sentinels = self.sentinels(t)
        master = t.string("sentinel_master")
        if sentinels and master is None:
            raise t.fail("sentinel_master", "required with sentinels (the primary's name in them)")
        if master is not None and not sentinels:
            raise t.fail("sentinels", 'required with sentinel_master, as ["host:26379", ...]')
        t.done()
        return ClusterConfig(url, password_env, host_id, ttl, cast(RedisDown, down), sentinels, master)

    def sentinels(self, t: Table) -> tuple[tuple[str, int], ...]:
        v = t.get("sentinels")
        if v is None:
            return ()
        if not isinstance(v, list) or not v:
            raise t.fail("sentinels", f'expected a non-empty array of "host:port", got {show(v)}')
        out = []
        for item in v:
            host, sep, port = item.rpartition(":") if isinstance(item, str) else ("", "", "")
            host = host.removeprefix("[").removesuffix("]")
            if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise t.fail("sentinels", f'expected "host:port" items, got {show(item)}')
            out.append((host, int(port)))
        return tuple(out)

    def keys(self, t: Table) -> KeysConfig:
        d = KeysConfig()
        path = t.string("path")
        url = t.string("url")
        if path is not None and url is not None:
            raise t.fail("url", "give path (a SQLite file) or url, not both")
        store = url if url is not None else path
        kind: StoreKind = "sqlite"
        if store is not None:
            kind = self.store_url(t, "url" if url is not None else "path", store)
        password_env = self.password_env(t, store or "", kind)
        refresh = _f(t.number("refresh_s", d.refresh_s, 0.05, 3600.0))
        capacity = _i(t.integer("table_capacity", d.table_capacity, 1, 1 << 20))
        cache_ttl = _f(t.number("cache_ttl_s", d.cache_ttl_s, 0.0, 86400.0))
        t.done()
        return KeysConfig(store, capacity, password_env, refresh, cache_ttl)

    def admin(self, t: Table) -> AdminConfig:
        token = t.string("token_sha256")
        if token is not None and _SHA256_HEX.fullmatch(token) is None:
            # Never echoed: it may be the token itself, pasted by mistake.
            raise t.fail("token_sha256", "expected 64 lower-case hex digits, the sha256 of the "
                                         "token (printf %s \"$TOKEN\" | sha256sum)")
        listen_text = t.string("listen")
        listen = None
        if listen_text is not None:
            host, sep, port = listen_text.rpartition(":")
            host = host.removeprefix("[").removesuffix("]")
            if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise t.fail("listen", f'expected "host:port", got {show(listen_text)}')
            listen = (host, int(port))
        if listen is not None and token is None:
            raise t.fail("listen", "needs token_sha256 (the admin API is off without it)")
        t.done()
        return AdminConfig(token, listen)

    def tracing(self, t: Table) -> TracingConfig | None:
        d = TracingConfig(otlp_endpoint="")
        endpoint = t.string("otlp_endpoint")
        ratio = _f(t.number("sample_ratio", d.sample_ratio, 0.0, 1.0))
        name = _s(t.string("service_name", d.service_name))
        if not name or len(name) > 200 or not name.isprintable():
            raise t.fail("service_name", "must be 1 to 200 printable characters")
        t.done()
        if endpoint is None:
            return None
        return TracingConfig(self.url(t, "otlp_endpoint", endpoint), ratio, name)


# The Table readers return Optional because a default may be None; these
# narrow where the default given was not None.
def _s(v: str | None) -> str:
    assert v is not None
    return v


def _i(v: int | None) -> int:
    assert v is not None
    return v


def _f(v: float | None) -> float:
    assert v is not None
    return v
