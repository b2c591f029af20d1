"""tierq: an OpenAI-compatible gateway that sells a priority service tier.

The admission core (lanes, token bucket, slots) is Rust (`tierq._core`); the
rest of the package routes requests, echoes the applied tier and prices them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tierq._core import ManualClock, PoolSettings, SettingsError, TokenBucket
from tierq.admission import Admission, Shed, Slot
from tierq.tiers import Tier

if TYPE_CHECKING:
    from tierq.app import create_app

__all__ = ["Admission", "ManualClock", "PoolSettings", "SettingsError", "Shed", "Slot", "Tier", "TokenBucket", "create_app"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # The gateway pulls in aiohttp; keep `import tierq` light for library users.
    if name == "create_app":
        from tierq.app import create_app

        return create_app
    raise AttributeError(f"module 'tierq' has no attribute {name!r}")
