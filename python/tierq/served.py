"""The models this deployment serves: the built-in catalog merged with the config.

`Catalog.from_config` resolves every served model to its prices, priority and
flex flags, upstream and admission settings.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from decimal import Decimal

from tierq.catalog import builtin_prices, builtin_priority
from tierq.config import AdmissionConfig, Config
from tierq.pricing import Prices, Rates, rates
from tierq.tiers import Tier

__all__ = ["Catalog", "ModelEntry"]


@dataclass(frozen=True, slots=True)
class ModelEntry:
    """One served model, fully resolved."""

    id: str
    prices: Prices
    priority: bool
    upstream: str
    upstream_model: str  # the name sent upstream (usually == id)
    admission: AdmissionConfig
    builtin: bool
    # Femto-USD per token at each applied tier, made once.
    rates: Mapping[Tier, Rates]
    # Serves service_tier="flex" from idle capacity (else flex is default).
    flex: bool = False
    # With several endpoints (replicas): each replica's settings as written,
    # while `admission` is the pool's, whose limits are the replicas' summed
    # (`pool_admission`). None: one endpoint, `admission` as written.
    replica: AdmissionConfig | None = None
    replicas: int = 1


class Catalog(Mapping[str, ModelEntry]):
    """Served models by id, in config (or built-in table) order."""

    __slots__ = ("_models",)

    def __init__(self, models: Mapping[str, ModelEntry]) -> None:
        self._models = dict(models)

    def __getitem__(self, model_id: str) -> ModelEntry:
        return self._models[model_id]

    def __iter__(self) -> Iterator[str]:
        return iter(self._models)

    def __len__(self) -> int:
        return len(self._models)

    @classmethod
    def from_config(cls, config: Config) -> Catalog:
        """Configured models; with none configured, the whole built-in table.

        Built-in models then run on the first upstream with default admission
        settings, and flex wherever priority is enabled (three tiers out of the
        box). A configured model omitting prices or `priority` takes the
        built-in values (load_config has already rejected unknown models
        without prices); its `flex` is false unless set.
        """
        builtin = builtin_prices()
        mult = config.pricing.priority_multiplier
        flex_mult = config.pricing.flex_multiplier
        models: dict[str, ModelEntry] = {}
        replicas = {u.name: u.replicas for u in config.upstreams}
        if not config.models:
            upstream = config.upstreams[0].name
            for model_id, prices in builtin.items():
                priority = builtin_priority(model_id)
                n = replicas[upstream]
                models[model_id] = ModelEntry(
                    model_id, prices, priority, upstream, model_id,
                    pool_admission(AdmissionConfig(), n), True, _rates(prices, mult, flex_mult),
                    flex=priority, replica=AdmissionConfig() if n > 1 else None, replicas=n,
                )
            return cls(models)
        for m in config.models:
            base = builtin.get(m.id)
            input_per_m = m.input_per_m if m.input_per_m is not None else _need(base).input_per_m
            output_per_m = m.output_per_m if m.output_per_m is not None else _need(base).output_per_m
            priority = m.priority if m.priority is not None else (
                builtin_priority(m.id) if base is not None else False
            )
            prices = Prices(input_per_m, output_per_m)
            n = replicas[m.upstream]
            models[m.id] = ModelEntry(
                m.id, prices, priority, m.upstream, m.upstream_model or m.id,
                pool_admission(m.admission, n), base is not None, _rates(prices, mult, flex_mult),
                flex=m.flex, replica=m.admission if n > 1 else None, replicas=n,
            )
        return cls(models)


def pool_admission(replica: AdmissionConfig, n: int) -> AdmissionConfig:
    """The pool's settings over `n` replicas of `replica`'s: its limit (fixed,
    or an adaptive one's bounds and start) the replicas' summed; the rest (the
    queue, the waits, the bucket, the headrooms) are the pool's as written."""
    if n == 1:
        return replica
    s = replica.settings
    if s.limit_mode == "fixed":
        return replica.but(max_concurrency=s.limit_max * n)
    return replica.but(min_concurrency=s.limit_min * n, max_concurrency_limit=s.limit_max * n,
                       initial_concurrency=s.limit_initial * n)


def _rates(prices: Prices, mult: Decimal, flex_mult: Decimal) -> dict[Tier, Rates]:
    return {tier: rates(prices, tier, mult, flex_mult) for tier in Tier}


def _need(base: Prices | None) -> Prices:
    if base is None:  # load_config guarantees this never happens
        raise ValueError("model has no price and is not in the built-in catalog")
    return base
