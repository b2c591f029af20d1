"""The built-in catalog: the models tierq knows with no config.

Prices come from package data `data/pricing.tsv` (USD per 1M tokens, default
tier); `builtin_priority` says which of them honour the priority tier. A pure
rule: no config, no I/O beyond reading the package's own table.
`tierq.served.Catalog` merges it with a config into the models served.
"""

from __future__ import annotations

import functools
import importlib.resources
from collections.abc import Mapping
from decimal import Decimal, InvalidOperation
from typing import Final

from tierq.pricing import Prices

__all__ = ["builtin_prices", "builtin_priority"]

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
