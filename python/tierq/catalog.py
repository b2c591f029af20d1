"""The models tierq serves: the built-in price table merged with the config.

Built-in prices come from package data `data/pricing.tsv` (USD per 1M tokens,
default tier). `Catalog.from_config` resolves every served model to its prices,
priority flag, upstream and admission settings.
"""

from __future__ import annotations

import functools
import importlib.resources
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import TYPE_CHECKING, Final

from tierq.pricing import Prices

if TYPE_CHECKING:
    from tierq.config import AdmissionConfig, Config

__all__ = ["Catalog", "ModelEntry", "builtin_prices", "builtin_priority"]

# Which built-in models honour service_tier="priority" with no config.
#
# DeepInfra's priority tier is live on the models it serves with vLLM ("the
# bulk of the text-generation catalog") and still rolling out on SGLang and
# TensorRT-LLM. The seed table does not say which engine serves which model, so
# tierq assumes, and says so here, that two groups are NOT on vLLM:
#   * "-Turbo" deployments: speed-tuned (FP8, speculative) builds, the kind
#     typically served on TensorRT-LLM;
#   * the 671B DeepSeek V3/R1/Prover family, whose reference engine is SGLang
#     (the R1-Distill models are Llama/Qwen dense models and stay on vLLM).
# Everything else (37 of 52) is priority-enabled. A config overrides any model
# with `priority = true|false`; the point of the flag is that a user sees it
# in /v1/models and `tierq models` before sending a request.
_SGLANG_DEEPSEEK: Final = (
    "deepseek-ai/DeepSeek-V3",
    "deepseek-ai/DeepSeek-R1",
    "deepseek-ai/DeepSeek-Prover",
)


def builtin_priority(model_id: str) -> bool:
    """Whether a built-in model is priority-enabled with no config (see above)."""
    if model_id.endswith("-Turbo"):
        return False
    if model_id.startswith(_SGLANG_DEEPSEEK) and "-Distill-" not in model_id:
        return False
    return True


@functools.cache
def builtin_prices() -> Mapping[str, Prices]:
    """model id -> prices, from data/pricing.tsv (read once)."""
    text = importlib.resources.files("tierq").joinpath("data/pricing.tsv").read_text("utf-8")
    table: dict[str, Prices] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        fields = line.split("\t")
        if fields[0] == "model":  # header row
            continue
        if len(fields) != 3:
            raise ValueError(f"pricing.tsv:{lineno}: expected 3 tab-separated fields")
        try:
            table[fields[0]] = Prices(Decimal(fields[1]), Decimal(fields[2]))
        except InvalidOperation as e:
            raise ValueError(f"pricing.tsv:{lineno}: bad price") from e
    return table


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
        settings. A configured model omitting prices or `priority` takes the
        built-in values (load_config has already rejected unknown models
        without prices).
        """
        builtin = builtin_prices()
        models: dict[str, ModelEntry] = {}
        if not config.models:
            from tierq.config import AdmissionConfig

            upstream = config.upstreams[0].name
            for model_id, prices in builtin.items():
                models[model_id] = ModelEntry(
                    model_id, prices, builtin_priority(model_id), upstream, model_id,
                    AdmissionConfig(), True,
                )
            return cls(models)
        for m in config.models:
            base = builtin.get(m.id)
            input_per_m = m.input_per_m if m.input_per_m is not None else _need(base).input_per_m
            output_per_m = m.output_per_m if m.output_per_m is not None else _need(base).output_per_m
            priority = m.priority if m.priority is not None else (
                builtin_priority(m.id) if base is not None else False
            )
            models[m.id] = ModelEntry(
                m.id, Prices(input_per_m, output_per_m), priority, m.upstream,
                m.upstream_model or m.id, m.admission, base is not None,
            )
        return cls(models)


def _need(base: Prices | None) -> Prices:
    if base is None:  # load_config guarantees this never happens
        raise ValueError("model has no price and is not in the built-in catalog")
    return base
