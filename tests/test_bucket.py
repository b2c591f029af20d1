"""`tierq.TokenBucket` and `tierq.ManualClock` on their own: the GCRA rule, the
priority reserve and exact waits, all on a manual clock so nothing sleeps."""

from __future__ import annotations

import math

import pytest

from tierq import ManualClock, TokenBucket


def test_manual_clock_starts_at_one_second_and_moves_only_when_told() -> None:
    clock = ManualClock()
    assert clock.now_ns() == 1_000_000_000
    assert clock.now_ns() == 1_000_000_000
    assert clock.advance_ns(5) == 1_000_000_005
    assert clock.advance(0.25) == 1_250_000_005
    assert clock.now_ns() == 1_250_000_005


def test_manual_clock_custom_start() -> None:
    assert ManualClock(start_ns=42).now_ns() == 42


def test_manual_clock_refuses_to_go_backwards_and_names_the_argument() -> None:
    clock = ManualClock()
    with pytest.raises(ValueError, match="seconds"):
        clock.advance(-0.001)
    with pytest.raises(ValueError, match="seconds"):
        clock.advance(math.nan)
    assert clock.now_ns() == 1_000_000_000


def test_full_bucket_allows_burst_then_refuses_with_exact_wait() -> None:
    clock = ManualClock()
    bucket = TokenBucket(rate=10.0, burst=5, clock=clock)
    for _ in range(5):
        assert bucket.try_take() is None
    # The first token taken refills 100 ms (1e9 / rate ns) later, to the nanosecond.
    assert bucket.try_take() == 0.1


def test_retry_after_is_exact_nanoseconds_as_float_seconds() -> None:
    clock = ManualClock()
    # 1e9 / 3 ns is not a whole number: the interval rounds to 333_333_333 ns.
    bucket = TokenBucket(rate=3.0, burst=1, clock=clock)
    assert bucket.try_take() is None
    wait = bucket.try_take()
    assert wait == 333_333_333 / 1e9
    clock.advance_ns(333_333_332)
    assert bucket.try_take() == 1 / 1e9, "one nanosecond short is still refused"
    clock.advance_ns(1)
    assert bucket.try_take() is None


def test_default_lane_stops_at_the_priority_reserve() -> None:
    bucket = TokenBucket(rate=10.0, burst=10, priority_reserve=0.2, clock=ManualClock())
    for _ in range(8):
        assert bucket.try_take(tier="default") is None
    # 2 tokens left, exactly the reserve: default waits one full refill.
    assert bucket.try_take(tier="default") == 0.1
    assert bucket.available() == pytest.approx(2.0)


def test_priority_lane_drains_the_bucket_to_zero() -> None:
    bucket = TokenBucket(rate=10.0, burst=10, priority_reserve=0.2, clock=ManualClock())
    for _ in range(8):
        assert bucket.try_take(tier="default") is None
    assert bucket.try_take(tier="priority") is None
    assert bucket.try_take(tier="priority") is None
    assert bucket.available() == pytest.approx(0.0)
    assert bucket.try_take(tier="priority") == 0.1


def test_bucket_refills_at_the_rate_on_the_manual_clock() -> None:
    clock = ManualClock()
    bucket = TokenBucket(rate=10.0, burst=4, clock=clock)
    for _ in range(4):
        bucket.try_take()
    clock.advance(0.25)
    assert bucket.available() == pytest.approx(2.5)
    assert bucket.try_take(cost=2) is None
    assert bucket.try_take() == pytest.approx(0.05)


def test_cost_larger_than_burst_can_never_be_taken() -> None:
    bucket = TokenBucket(rate=100.0, burst=10, clock=ManualClock())
    assert bucket.try_take(cost=11, tier="priority") == math.inf
    # A refusal takes nothing.
    assert bucket.available() == pytest.approx(10.0)


def test_refund_never_fills_the_bucket_past_full() -> None:
    bucket = TokenBucket(rate=10.0, burst=5, clock=ManualClock())
    bucket.try_take(cost=3)
    bucket.adjust(-100)
    assert bucket.available() == pytest.approx(5.0)
    bucket.adjust(2)
    assert bucket.available() == pytest.approx(3.0)


def test_burst_defaults_to_rate() -> None:
    bucket = TokenBucket(rate=7.0, clock=ManualClock())
    assert bucket.available() == pytest.approx(7.0)


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"rate": -1.0}, "rate"),
        ({"rate": 0.0}, "rate"),
        ({"rate": math.inf}, "rate"),
        ({"rate": 10.0, "burst": 0.5}, "burst"),
        ({"rate": 10.0, "priority_reserve": 1.0}, "priority_reserve"),
        ({"rate": 10.0, "priority_reserve": -0.1}, "priority_reserve"),
    ],
)
def test_bad_bucket_settings_raise_value_error_naming_the_argument(kwargs: dict[str, float], argument: str) -> None:
    with pytest.raises(ValueError, match=f"^{argument}:"):
        TokenBucket(**kwargs)  # type: ignore[arg-type]


def test_bad_take_arguments_raise_value_error_naming_the_argument() -> None:
    bucket = TokenBucket(rate=10.0, clock=ManualClock())
    with pytest.raises(ValueError, match="^cost:"):
        bucket.try_take(cost=0)
    with pytest.raises(ValueError, match="^tier:"):
        bucket.try_take(tier="gold")
    assert bucket.available() == pytest.approx(10.0)


def test_regression_default_lane_is_not_shut_out_when_the_reserve_leaves_less_than_one_token() -> None:
    # Bug: burst 1 with priority_reserve 0.2 left the default lane 0.8 token,
    # so every default take "could never fit" (infinite wait), although the
    # bucket held 1 token, more than the 0.2 reserve.
    clock = ManualClock()
    bucket = TokenBucket(rate=1.0, burst=1, priority_reserve=0.2, clock=clock)
    assert bucket.try_take(tier="default") is None
    assert bucket.try_take(tier="default") == 1.0
    clock.advance(1.0)
    assert bucket.try_take(tier="priority") is None
