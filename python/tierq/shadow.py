"""Shadow mode (`enforce = false`): a limit tried before it is applied. Each
decision such a limit makes is still computed and counted under one of these
names, and none is applied; the set is fixed, so the metric's labels never grow.
"""

from __future__ import annotations

from typing import Final

__all__ = ["DECISIONS", "DOWNGRADES", "DOWNGRADE_BUDGET", "DOWNGRADE_RAMP", "KEY_REFUSALS", "KEY_RPM",
           "KEY_TPM", "RATE_LIMITED"]

RATE_LIMITED: Final = "rate_limited"  # the pool's token bucket (rate, burst) would shed it
KEY_RPM: Final = "key_rpm"  # the key's requests per minute would refuse it
KEY_TPM: Final = "key_tpm"  # the key's tokens per minute would refuse it
DOWNGRADE_RAMP: Final = "downgrade_ramp"  # the key's ramp rule would serve it default
DOWNGRADE_BUDGET: Final = "downgrade_budget"  # the key's priority budget would serve it default
DECISIONS: Final = (RATE_LIMITED, KEY_RPM, KEY_TPM, DOWNGRADE_RAMP, DOWNGRADE_BUDGET)
#: The decisions that refuse a request (the key's limits); a downgrade serves it.
KEY_REFUSALS: Final = frozenset({KEY_RPM, KEY_TPM})
#: A downgrade's reason (tierq.tiers.TierReason, a str) -> its decision.
DOWNGRADES: Final = {"ramp": DOWNGRADE_RAMP, "budget": DOWNGRADE_BUDGET}
