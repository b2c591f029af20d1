"""The tier rule of DESIGN.md, and nothing else.

`resolve_tier` turns a request's raw `service_tier` value and the model's
priority flag into the tier that is applied, echoed and billed.
"""

from __future__ import annotations

from typing import Final, Literal

import orjson

__all__ = ["DEFAULT", "PRIORITY", "InvalidTier", "Tier", "resolve_tier"]

Tier = Literal["priority", "default"]
PRIORITY: Final[Tier] = "priority"
DEFAULT: Final[Tier] = "default"

# "fast" is OpenAI's alias of "priority".
_PRIORITY_NAMES: Final = frozenset({"priority", "fast"})
# Tiers a client may name that tierq does not sell ("flex", "scale") are served,
# and billed, as default rather than refused: a client written for another
# provider keeps working and is never charged for a tier it did not get.
_DEFAULT_NAMES: Final = frozenset({"auto", "default", "flex", "scale"})
_ACCEPTED: Final = "'auto', 'default', 'flex', 'scale', 'priority' or 'fast'"


class InvalidTier(ValueError):
    """A `service_tier` outside the table: the request gets a 400, nothing else."""

    param: Final = "service_tier"

    def __init__(self, value: object) -> None:
        self.value = value
        super().__init__(
            f"Invalid value for 'service_tier': {_show(value)}. "
            f"Supported values are {_ACCEPTED}."
        )


def resolve_tier(requested: object, model_priority: bool) -> Tier:
    """The applied tier for a request's `service_tier` on a model.

    Absent (pass None), null, "auto", "default", "flex" and "scale" apply
    "default"; "priority" and "fast" apply "priority" only on a priority-enabled
    model, else "default". Anything else (other strings, numbers, booleans,
    objects, arrays) raises InvalidTier. Names are case-sensitive, as in
    OpenAI's API.
    """
    if requested is None:
        return DEFAULT
    # type() rather than isinstance(): a str subclass is not JSON input, and the
    # check also keeps bools (an int subclass) out by construction.
    if type(requested) is str:
        if requested in _PRIORITY_NAMES:
            return PRIORITY if model_priority else DEFAULT
        if requested in _DEFAULT_NAMES:
            return DEFAULT
    raise InvalidTier(requested)


def _show(value: object) -> str:
    """The bad value as JSON (as the client wrote it), cut short if long."""
    try:
        text = orjson.dumps(value).decode()
    except TypeError:
        text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
