"""The ledger commits every row exactly once, exactly priced, before record() returns."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from decimal import Decimal
from pathlib import Path

import pytest

from tierq.cli import usage_main
from tierq.ledger import CHECKPOINT_ROWS, Ledger, LedgerRow, UsageLine
from tierq.stores import open_ledger
from tierq.storage import sqlite_path
from tierq.usage import parse_since, render_csv, render_json, render_table

REPO_PYTHON = str(Path(__file__).resolve().parent.parent / "python")


def books_row(request_id: str, **kw: object) -> LedgerRow:
    base = LedgerRow(
        request_id=request_id, ts=1_700_000_000.0, key_id="k1", model="m1",
        endpoint="/v1/chat/completions", requested_tier="priority", applied_tier="priority",
        prompt_tokens=10, completion_tokens=5, cost=Decimal("0.0000675"), status="served",
    )  # fmt: skip
    return replace(base, **kw)  # type: ignore[arg-type]


@pytest.fixture
async def books_ledger(tmp_path: Path) -> AsyncIterator[Ledger]:
    ledger = Ledger(str(tmp_path / "ledger.db"))
    await ledger.start()
    try:
        yield ledger
    finally:
        await ledger.close()


async def test_concurrent_records_are_all_committed_exactly_once_in_few_batches(
    books_ledger: Ledger,
) -> None:
    await asyncio.gather(*(books_ledger.record(books_row(f"r{i}")) for i in range(500)))
    assert books_ledger.count() == 500
    assert {r.request_id for r in books_ledger.rows()} == {f"r{i}" for i in range(500)}
    # 500 concurrent waiters share transactions rather than paying one commit each.
    assert books_ledger.batches < 100


async def test_the_writer_never_checkpoints_and_the_checkpointer_moves_the_wal_into_the_db(
    tmp_path: Path,
) -> None:
    """Checkpoints (a copy and a sync of several ms) are off the commit path: the
    writer's connection has auto-checkpointing off, and the checkpointer thread
    moves committed rows from the WAL into the database file on its own."""
    path = tmp_path / "ledger.db"
    ledger = Ledger(str(path))
    await ledger.start()
    try:
        before = path.stat().st_size
        await asyncio.gather(*(ledger.record(books_row(f"c{i}")) for i in range(CHECKPOINT_ROWS + 200)))
        deadline = time.monotonic() + 10
        while ledger.checkpoints == 0:
            assert time.monotonic() < deadline, "no checkpoint ran"
            await asyncio.sleep(0.05)
        # The rows are in the main database file now, not only in the WAL.
        assert path.stat().st_size > before
        probe = sqlite3.connect(path)
        try:
            busy, wal_frames, moved = probe.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        finally:
            probe.close()
        assert busy == 0 and moved == wal_frames
        assert ledger.count() == CHECKPOINT_ROWS + 200
    finally:
        await ledger.close()


async def test_duplicate_request_id_is_ignored_so_a_retry_never_bills_twice(
    books_ledger: Ledger,
) -> None:
    await books_ledger.record(books_row("dup", cost=Decimal("1.5")))
    await books_ledger.record(books_row("dup", cost=Decimal("99")))
    await asyncio.gather(*(books_ledger.record(books_row("dup2")) for _ in range(10)))
    assert books_ledger.count() == 2
    got = books_ledger.get("dup")
    assert got is not None and got.cost == Decimal("1.5")


async def test_cost_round_trips_exactly(books_ledger: Ledger) -> None:
    costs = ["0.0000675", "0.0000000001", "1234.5678901234", "0", "1E-7", "0.000000000000001"]
    for i, c in enumerate(costs):
        await books_ledger.record(books_row(f"c{i}", cost=Decimal(c)))
    for i, c in enumerate(costs):
        got = books_ledger.get(f"c{i}")
        assert got is not None
        assert got.cost == Decimal(c)
        assert isinstance(got.cost, Decimal)
    lines = books_ledger.usage()
    assert len(lines) == 1
    assert lines[0].cost == sum((Decimal(c) for c in costs), Decimal(0))


def test_row_with_cost_finer_than_femto_usd_or_negative_is_refused() -> None:
    with pytest.raises(ValueError, match="15 decimals"):
        books_row("x", cost=Decimal("0.0000000000000001"))
    with pytest.raises(ValueError):
        books_row("x", cost=Decimal("-1"))
    with pytest.raises(ValueError):
        books_row("x", cost=Decimal("NaN"))
    with pytest.raises(ValueError):
        books_row("x", status="ok")
    with pytest.raises(ValueError):
        books_row("x", applied_tier="fast")


async def test_row_is_visible_to_another_connection_as_soon_as_record_returns(
    books_ledger: Ledger,
) -> None:
    other = sqlite3.connect(books_ledger.path)
    try:
        for i in range(20):
            await books_ledger.record(books_row(f"v{i}"))
            n = other.execute("SELECT COUNT(*) FROM ledger WHERE request_id = ?", (f"v{i}",))
            assert n.fetchone()[0] == 1
    finally:
        other.close()


async def test_wal_mode_and_synchronous_follow_durability(tmp_path: Path) -> None:
    for durability, expected in (("process", 1), ("power", 2)):  # NORMAL=1, FULL=2
        ledger = Ledger(str(tmp_path / f"{durability}.db"), durability)  # type: ignore[arg-type]
        await ledger.start()
        await ledger.record(books_row("a"))
        conn = sqlite3.connect(ledger.path)
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        conn.close()
        from tierq.ledger import connect

        c2 = connect(ledger.path, ledger.durability)
        assert c2.execute("PRAGMA synchronous").fetchone()[0] == expected
        c2.close()
        await ledger.close()


async def test_record_nowait_rows_are_committed_by_flush_and_by_close(tmp_path: Path) -> None:
    ledger = Ledger(str(tmp_path / "l.db"))
    await ledger.start()
    for i in range(50):
        ledger.record_nowait(books_row(f"s{i}", status="shed", cost=Decimal(0), code="queue_timeout"))
    await ledger.flush()
    assert ledger.count() == 50
    for i in range(50, 80):
        ledger.record_nowait(books_row(f"s{i}", status="shed", cost=Decimal(0)))
    await ledger.close()
    assert ledger.count() == 80
    with pytest.raises(RuntimeError):
        await ledger.record(books_row("late"))


def _wait_count(ledger: Ledger, n: int) -> int:
    deadline = time.monotonic() + 20
    while ledger.count() < n and time.monotonic() < deadline:
        time.sleep(0.005)
    return ledger.count()


async def test_record_nowait_off_the_loop_wakes_the_writer_itself(tmp_path: Path) -> None:
    """On the loop, a push that finds the writer asleep leaves the wake-up to the
    loop's next turn; from another thread, or while the loop cannot turn, it wakes
    the writer at once. Here the loop is blocked throughout, so only the pushing
    thread's own wake-up can get its row committed."""
    ledger = Ledger(str(tmp_path / "l.db"))
    await ledger.start()
    try:
        await ledger.record(books_row("first"))
        t = threading.Thread(target=ledger.record_nowait, args=(books_row("from-thread", status="shed"),))
        t.start()
        t.join()
        assert _wait_count(ledger, 2) == 2
    finally:
        await ledger.close()


async def test_record_waits_for_the_commit_without_blocking_the_event_loop(
    books_ledger: Ledger,
) -> None:
    # Another connection holds the write lock, so the writer's commit stalls (in
    # busy_timeout). record() must not return meanwhile, and the loop must keep
    # running other tasks: the stall happens off the event loop.
    blocker = sqlite3.connect(books_ledger.path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        task = asyncio.create_task(books_ledger.record(books_row("stalled")))
        # The loop runs other work (20 turns of it) while the commit stalls: had
        # the commit run on the loop, the loop would sit in busy_timeout and the
        # record come back (failed) before the turns did. Counted, not timed.
        for _ in range(20):
            await asyncio.sleep(0.005)
            assert not task.done()
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    await asyncio.wait_for(task, timeout=5.0)
    assert books_ledger.get("stalled") is not None


async def test_cancelled_waiter_still_gets_its_row_committed(books_ledger: Ledger) -> None:
    task = asyncio.create_task(books_ledger.record(books_row("cx")))
    await asyncio.sleep(0)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await books_ledger.flush()
    assert books_ledger.get("cx") is not None


_CHILD = textwrap.dedent(
    """
    import asyncio, sys
    from decimal import Decimal
    from tierq.ledger import Ledger, LedgerRow

    async def main() -> None:
        ledger = Ledger(sys.argv[1])
        await ledger.start()
        i = 0
        while True:
            rid = f"k{i}"
            await ledger.record(LedgerRow(rid, 1.0, "k", "m", "/v1/completions", None,
                                          "default", 1, 1, Decimal("0.0000675"), "served"))
            # Reported only after record() returned: the parent kills us at any point.
            sys.stdout.write(rid + "\\n")
            sys.stdout.flush()
            i += 1

    asyncio.run(main())
    """
)


def test_rows_survive_sigkill_right_after_record_returns(tmp_path: Path) -> None:
    db = tmp_path / "killed.db"
    env = {**os.environ, "PYTHONPATH": REPO_PYTHON}
    acknowledged = []
    with subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(db)], stdout=subprocess.PIPE, env=env, text=True
    ) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            acknowledged.append(line.strip())
            if len(acknowledged) == 200:
                os.kill(proc.pid, signal.SIGKILL)
                break
        proc.wait(timeout=10)
    assert proc.returncode == -signal.SIGKILL
    conn = sqlite3.connect(db)
    try:
        stored = {r[0] for r in conn.execute("SELECT request_id FROM ledger")}
    finally:
        conn.close()
    assert len(acknowledged) == 200
    assert set(acknowledged) <= stored


async def test_usage_groups_by_key_model_tier_with_exact_sums(books_ledger: Ledger) -> None:
    rows = [
        books_row("1", key_id="a", model="m1", applied_tier="priority", cost=Decimal("0.0000675")),
        books_row("2", key_id="a", model="m1", applied_tier="priority", cost=Decimal("0.0000001")),
        books_row("3", key_id="a", model="m1", applied_tier="default", cost=Decimal("0.1"),
                  requested_tier=None),
        books_row("4", key_id="a", model="m1", applied_tier="default", status="shed",
                  cost=Decimal(0), prompt_tokens=0, completion_tokens=0, code="queue_timeout"),
        books_row("5", key_id="b", model="m2", applied_tier="default", status="failed",
                  cost=Decimal(0), ts=1_800_000_000.0),
        books_row("6", key_id="b", model="m2", applied_tier="default", status="cancelled",
                  partial=True, cost=Decimal("0.2"), ts=1_800_000_000.0),
    ]  # fmt: skip
    await asyncio.gather(*(books_ledger.record(r) for r in rows))
    lines = books_ledger.usage()
    assert [(x.key_id, x.model, x.applied_tier) for x in lines] == [
        ("a", "m1", "default"), ("a", "m1", "priority"), ("b", "m2", "default")
    ]
    a_def, a_pri, b_def = lines
    assert a_pri.cost == Decimal("0.0000676") and a_pri.requests == 2 and a_pri.served == 2
    assert (a_def.requests, a_def.served, a_def.shed, a_def.cost) == (2, 1, 1, Decimal("0.1"))
    assert a_def.prompt_tokens == 10 and a_def.completion_tokens == 5
    assert (b_def.failed, b_def.cancelled, b_def.cost) == (1, 1, Decimal("0.2"))
    assert books_ledger.usage(key_id="b") == [b_def]
    assert books_ledger.usage(model="m1") == [a_def, a_pri]
    assert books_ledger.usage(since=1_750_000_000.0) == [b_def]
    assert books_ledger.usage(key_id="nobody' OR '1'='1") == []


def _lines() -> list[UsageLine]:
    return [
        UsageLine("key-a", "m1", "priority", 3, 2, 1, 0, 0, 100, 50, Decimal("0.0000675")),
        UsageLine("anonymous", "a/very-long-model-name", "default", 1, 1, 0, 0, 0, 7, 3,
                  Decimal("12.5")),
    ]  # fmt: skip


def test_render_table_is_aligned_and_totals_exactly() -> None:
    out = render_table(_lines())
    rows = out.rstrip("\n").split("\n")
    assert rows[0].split()[0] == "KEY"
    assert rows[-1].split()[0] == "TOTAL"
    assert rows[-1].endswith("12.5000675")
    assert "0.0000675" in out
    # Every cost ends in the same column.
    widths = {len(r) for r in rows if not r.startswith("-")}
    assert len(widths) == 1


def test_render_json_keeps_costs_as_exact_strings() -> None:
    data = json.loads(render_json(_lines()))
    assert data["lines"][0]["cost"] == "0.0000675"
    assert data["total"]["cost"] == "12.5000675"
    assert data["total"]["requests"] == 4


def test_render_csv_has_header_and_exact_costs() -> None:
    got = list(csv.DictReader(io.StringIO(render_csv(_lines()))))
    assert got[0]["cost"] == "0.0000675" and got[1]["key_id"] == "anonymous"
    assert Decimal(got[1]["cost"]) == Decimal("12.5")


def test_empty_reports_render() -> None:
    assert "TOTAL" in render_table([])
    assert json.loads(render_json([]))["total"]["cost"] == "0"
    assert render_csv([]).count("\n") == 1


def test_ledger_urls() -> None:
    assert sqlite_path("sqlite:///tierq.db") == "tierq.db"
    assert sqlite_path("sqlite:////var/lib/tierq.db") == "/var/lib/tierq.db"
    assert sqlite_path("plain.db") == "plain.db"
    with pytest.raises(ValueError, match="names PostgreSQL, not a SQLite file") as e:
        sqlite_path("postgresql://user:hunter2@db/ledger")
    assert "hunter2" not in str(e.value)
    with pytest.raises(ValueError, match="needs one database name") as e:
        open_ledger("postgresql://user:hunter2@db/")
    assert "hunter2" not in str(e.value)
    with pytest.raises(ValueError, match="not supported"):
        open_ledger("mysql://x/y")
    with pytest.raises(ValueError):
        open_ledger("sqlite:///:memory:")


def test_parse_since() -> None:
    assert parse_since("1h", now=10_000.0) == 10_000.0 - 3600
    assert parse_since("30m", now=10_000.0) == 10_000.0 - 1800
    assert parse_since("7d", now=1e6) == 1e6 - 7 * 86400
    assert parse_since("2024-01-01") == 1704067200.0
    assert parse_since("2024-01-01T01:00:00+01:00") == 1704067200.0
    with pytest.raises(ValueError, match="relative"):
        parse_since("yesterday")


async def test_usage_main_prints_table_json_csv(
    books_ledger: Ledger, capsys: pytest.CaptureFixture[str]
) -> None:
    await books_ledger.record(books_row("u1", key_id="kk", cost=Decimal("0.0000675")))
    assert usage_main(["--db", books_ledger.path]) == 0
    assert "kk" in capsys.readouterr().out
    assert usage_main(["--db", f"sqlite:///{books_ledger.path}", "--json", "--key", "kk"]) == 0
    assert json.loads(capsys.readouterr().out)["total"]["cost"] == "0.0000675"
    assert usage_main(["--db", books_ledger.path, "--csv", "--since", "1h"]) == 0
    assert capsys.readouterr().out.count("\n") == 1  # header only: the row is from 2023
    assert usage_main(["--db", books_ledger.path + ".missing"]) == 1
    assert not os.path.exists(books_ledger.path + ".missing")
    assert usage_main(["--db", books_ledger.path, "--since", "soon"]) == 2


async def test_a_row_sqlite_cannot_store_is_refused_before_it_reaches_a_batch() -> None:
    with pytest.raises(TypeError, match="model"):
        books_row("bad", model=object())
    with pytest.raises(TypeError, match="prompt_tokens"):
        books_row("bad", prompt_tokens=1.5)


async def test_a_value_the_writer_cannot_store_is_refused_by_record_itself(
    books_ledger: Ledger,
) -> None:
    bad = books_row("bad")
    object.__setattr__(bad, "model", object())  # slip past validation on purpose
    with pytest.raises(TypeError, match="model"):
        await books_ledger.record(bad)
    with pytest.raises(TypeError, match="model"):
        books_ledger.record_nowait(bad)
    await books_ledger.record(books_row("after"))
    assert [r.request_id for r in books_ledger.rows()] == ["after"]
    assert books_ledger.commit_errors == 0


async def test_writer_survives_a_failed_batch_and_reports_it_to_its_waiters(
    books_ledger: Ledger,
) -> None:
    # A real failure inside the writer's transaction: the database itself
    # refuses this row (a trigger), so the whole batch rolls back.
    conn = sqlite3.connect(books_ledger.path)
    conn.execute(
        "CREATE TRIGGER refuse BEFORE INSERT ON ledger WHEN NEW.request_id = 'bad'"
        " BEGIN SELECT RAISE(ABORT, 'refused by the test'); END"
    )
    conn.commit()
    conn.close()
    with pytest.raises(OSError, match="refused by the test"):
        await books_ledger.record(books_row("bad"))
    assert books_ledger.commit_errors == 1
    await books_ledger.record(books_row("after"))
    assert [r.request_id for r in books_ledger.rows()] == ["after"]


async def test_the_writer_is_the_same_sqlite_as_the_readers() -> None:
    """The writer (Rust) and the readers (Python's sqlite3) share one SQLite
    library in the process: two copies would drop each other's POSIX locks on
    the same file. The extension itself loads the system's shared libsqlite3."""
    import tierq._core

    assert tierq._core.SQLITE_VERSION == sqlite3.sqlite_version
    probe = textwrap.dedent(
        """
        import ctypes, os, sys
        import tierq._core  # before anything imports Python's sqlite3
        assert "sqlite3" not in sys.modules and "_sqlite3" not in sys.modules
        ctypes.CDLL("libsqlite3.so.0", mode=os.RTLD_NOLOAD)  # OSError unless already loaded
        """
    )
    env = {**os.environ, "PYTHONPATH": REPO_PYTHON}
    subprocess.run([sys.executable, "-c", probe], env=env, check=True, timeout=60)



@pytest.mark.timeout(60)
def test_a_writer_opening_a_new_file_another_process_is_migrating_waits_for_it(tmp_path: Path) -> None:
    """Two processes creating one new ledger at once: the file is still in
    rollback mode, and the second's switch to WAL meets the first's migration
    lock, which SQLite answers busy at once instead of waiting (its deadlock
    rule skips the busy handler; 2 to 11 of 60 racing pairs failed so). Made
    deterministic: the first opener's lock is held here, and the writer must
    wait for it rather than fail."""
    path = tmp_path / "new.db"
    first = sqlite3.connect(path, isolation_level=None)
    first.execute("BEGIN IMMEDIATE")  # a new file, rollback mode, migrating
    opener = subprocess.Popen(
        [sys.executable, "-c", "import sys\nfrom tierq._core import LedgerWriter\n"
         "try:\n    LedgerWriter(sys.argv[1]).close(); print('ok')\nexcept OSError as e:\n    print(e)",
         str(path)], stdout=subprocess.PIPE, text=True)
    time.sleep(0.5)  # the opener meets the lock meanwhile (or has already given up)
    first.execute("COMMIT")
    first.close()
    assert opener.communicate(timeout=30)[0].strip() == "ok"
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
