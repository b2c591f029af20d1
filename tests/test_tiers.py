"""The tier table of DESIGN.md, row by row."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tierq.tiers import DEFAULT, PRIORITY, InvalidTier, resolve_tier


@pytest.mark.parametrize("requested", ["priority", "fast"])
def test_priority_on_priority_model_applies_priority(requested: str) -> None:
    assert resolve_tier(requested, True) == PRIORITY


@pytest.mark.parametrize("requested", ["priority", "fast"])
def test_priority_on_non_priority_model_applies_default(requested: str) -> None:
    assert resolve_tier(requested, False) == DEFAULT


@pytest.mark.parametrize("requested", [None, "auto", "default", "flex", "scale"])
@pytest.mark.parametrize("model_priority", [True, False])
def test_absent_null_auto_default_flex_scale_apply_default(requested: object, model_priority: bool) -> None:
    assert resolve_tier(requested, model_priority) == DEFAULT


@pytest.mark.parametrize(
    "requested",
    ["turbo", "", "Priority", "PRIORITY", " priority", 1, 0, 1.5, True, False, {"tier": "priority"}, ["priority"]],
)
def test_anything_else_is_invalid_and_names_the_value(requested: object) -> None:
    with pytest.raises(InvalidTier) as info:
        resolve_tier(requested, True)
    assert info.value.param == "service_tier"
    assert info.value.value == requested
    assert "service_tier" in str(info.value)


def test_invalid_tier_message_shows_value_as_json() -> None:
    with pytest.raises(InvalidTier, match=r'"turbo"'):
        resolve_tier("turbo", True)
    with pytest.raises(InvalidTier, match=r"\btrue\b"):
        resolve_tier(True, True)


def test_invalid_tier_is_a_value_error() -> None:
    assert issubclass(InvalidTier, ValueError)


@given(st.text())
def test_only_the_table_strings_are_accepted(s: str) -> None:
    if s in {"priority", "fast", "auto", "default", "flex", "scale"}:
        assert resolve_tier(s, True) in (PRIORITY, DEFAULT)
    else:
        with pytest.raises(InvalidTier):
            resolve_tier(s, True)
