"""The flow board behind /status (a rolling minute, bounded memory, summed over
workers), Jain's index, and fair queuing's charge in priced tokens."""

from __future__ import annotations

from decimal import Decimal

import pytest

from tierq.fairness import TRACKED, FlowBoard, flows_json, jain_index, merge
from tierq.metrics import (GatewayMetrics, PoolSnapshot, snapshot_from_json, snapshot_to_json,
                           status_json)
from tierq.pricing import Prices, fair_charge, rates


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_jain_index_is_one_when_even_and_one_over_n_when_one_takes_all() -> None:
    assert jain_index([3.0, 3.0, 3.0]) == pytest.approx(1.0)
    assert jain_index([9.0, 0.0, 0.0]) == pytest.approx(1 / 3)
    assert jain_index([1.0, 2.0]) == pytest.approx(9 / 10)
    assert jain_index([]) is None and jain_index([0.0, 0.0]) is None


def test_the_board_forgets_what_is_older_than_a_minute() -> None:
    clock = Clock()
    board = FlowBoard(clock)
    board.queued("a", 100)
    board.served("a", 80, 800, 1.0)
    clock.t += 35
    board.served("b", 10, 100, 2.0)
    assert {line[0] for line in board.data()} == {"a", "b"}
    clock.t += 40  # a's window ended more than a minute ago
    assert [line[0] for line in board.data()] == ["b"]
    clock.t += 3600
    assert board.data() == []
    board.queued("c", 5)  # and starts again after an idle hour
    assert board.data() == [("c", 5, 0, 0.0, 0)]


def test_a_window_holds_at_most_tracked_flows_and_keeps_the_heavy_ones() -> None:
    board = FlowBoard(Clock())
    board.queued("heavy", 10_000)
    for i in range(TRACKED * 10):
        board.queued(f"light{i}", 1)
    lines = board.data()
    assert len(lines) <= TRACKED and lines[0][:2] == ("heavy", 10_000)


def test_workers_lines_are_summed_per_flow_and_served_service_is_divided_by_weight() -> None:
    one, two = FlowBoard(Clock()), FlowBoard(Clock())
    one.served("k", 10, 100, 2.0)
    one.waited("k")
    two.served("k", 5, 50, 2.0)
    two.served("j", 5, 150, 1.0)
    two.waited("j")
    merged = {line[0]: line for line in merge([one.data(), two.data()])}
    assert merged["k"] == ("k", 0, 15, 75.0, 1) and merged["j"] == ("j", 0, 5, 150.0, 1)
    shown = flows_json(list(merged.values()))
    assert shown["backlogged"] == 2 and shown["jain_index"] == pytest.approx(0.9)
    assert shown["top_served"] == [{"flow": "k", "tokens": 15}, {"flow": "j", "tokens": 5}]
    assert shown["top_queued"] == []


def test_flow_labels_name_the_key_and_the_fairness_id() -> None:
    board = FlowBoard(Clock())
    board.queued("abcdefghijkl\x1fcust-9", 3)
    board.queued("", 2)
    board.queued("\x1fteam", 1)
    labels = [f["flow"] for f in flows_json(board.data())["top_queued"]]  # type: ignore[union-attr]
    assert labels == ["abcdefghijkl/cust-9", "local", "local/team"]


def test_fair_charge_weighs_tokens_by_the_models_prices_and_is_never_zero() -> None:
    r = rates(Prices(Decimal("0.03"), Decimal("0.06")), "default")
    # 0.03 USD per 1M tokens = 30 nano-USD a token, 0.06 = 60.
    assert fair_charge(1000, 0, r) == 30_000 and fair_charge(0, 1000, r) == 60_000
    assert fair_charge(100, 10, r) == 100 * 30 + 10 * 60
    assert fair_charge(0, 0, r) == 1
    tiny = rates(Prices(Decimal("0.000001"), Decimal("0")), "default")  # 1,000 femto-USD a token
    assert fair_charge(1, 0, tiny) == 1, "rounded up, never 0"
    free = rates(Prices(Decimal("0"), Decimal("0")), "default")
    assert fair_charge(7, 5, free) == 12, "a free model counts tokens"


def test_flows_travel_in_worker_snapshots_and_a_shared_pool_sums_every_workers_lines() -> None:
    boards = [FlowBoard(Clock()), FlowBoard(Clock())]
    boards[0].served("k", 10, 100, 1.0)
    boards[0].waited("k")
    boards[1].served("k", 30, 300, 1.0)
    boards[1].served("j", 40, 400, 1.0)
    boards[1].waited("j")
    metrics = GatewayMetrics()
    snaps = [snapshot_from_json(snapshot_to_json(metrics.snapshot(
        [PoolSnapshot("m", "sim", True, 8, {"fair_flows_active": {"priority": 0, "default": i, "flex": 0}},
                      tuple(b.data()))], ready=True)))
        for i, b in enumerate(boards)]
    assert snaps[1].pools[0].flows == tuple(boards[1].data())
    # Shared admission: the pool's stats are read once (the newest), its flows summed.
    pool = status_json(snaps, shared_admission=True)["pools"][0]
    assert pool["flows"]["top_served"] == [{"flow": "j", "tokens": 40}, {"flow": "k", "tokens": 40}]
    assert pool["flows"]["backlogged"] == 2 and pool["flows"]["jain_index"] == pytest.approx(1.0)
    assert pool["flows"]["active"]["default"] in (0, 1)
