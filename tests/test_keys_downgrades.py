"""A key's downgrade settings (its priority budget per UTC day and its ramp rule):
set at create, changed by `tierq keys update` and the admin API, refused when bad
with one error naming the field, kept through the migrations of both key stores."""

from __future__ import annotations

import asyncio
import sqlite3
from decimal import Decimal
from pathlib import Path

import pytest
from pg_fixtures import pg_password, pg_session, pg_url  # noqa: F401
from pg_server import PASSWORD, PASSWORD_ENV

from tierq.cli import keys_main
from tierq.keys import KeyStore, hash_secret
from tierq.postgres import PostgresKeyStore

# The keys table as tierq made it with weight and trust, before the downgrades (main cd68885).
_PREVIOUS_SCHEMA = """
CREATE TABLE IF NOT EXISTS keys (
    public_id     TEXT PRIMARY KEY,
    name          TEXT NOT NULL,
    secret_sha256 TEXT NOT NULL,
    created       REAL NOT NULL,
    revoked       REAL,
    rpm           INTEGER,
    tpm           INTEGER,
    weight        REAL NOT NULL DEFAULT 1.0,
    trusted       INTEGER NOT NULL DEFAULT 0
)
"""
_OLD_ID = "oldkey000002"
_OLD_TOKEN = f"tq-{_OLD_ID}-{'s' * 32}"


def test_a_key_file_of_the_previous_schema_gains_the_settings_with_no_downgrades(
        tmp_path: Path) -> None:
    db = tmp_path / "old.db"
    with sqlite3.connect(db) as conn:
        conn.executescript(_PREVIOUS_SCHEMA)
        conn.execute("INSERT INTO keys VALUES (?, 'legacy', ?, 1.0, NULL, 30, NULL, 2.0, 1)",
                     (_OLD_ID, hash_secret("s" * 32)))
    conn.close()
    store = KeyStore(str(db))
    info = store.authenticate(_OLD_TOKEN)
    assert info is not None and (info.rpm, info.weight, info.trusted) == (30, 2.0, True)
    assert (info.priority_budget_usd, info.ramp_max_growth, info.ramp_min_tpm,
            info.ramp_window_s) == (None, None, 0, 900)
    new = store.update(_OLD_ID, priority_budget_usd="12.5", ramp_max_growth=0.5,
                       ramp_min_tpm=1_000_000)
    assert new is not None and new.priority_budget_usd == Decimal("12.5")
    store.close()
    again = KeyStore(str(db))
    assert again.get(_OLD_ID) == new
    columns = [r[1] for r in sqlite3.connect(db).execute("PRAGMA table_info(keys)")]
    assert all(columns.count(c) == 1 for c in ("priority_budget_usd", "ramp_min_tpm",
                                               "ramp_max_growth", "ramp_window_s"))


def test_settings_round_trip_exactly_and_none_removes_them(tmp_path: Path) -> None:
    store = KeyStore(str(tmp_path / "k.db"))
    info, token = store.create("k", priority_budget_usd=Decimal("0.000000001"),
                               ramp_max_growth=1, ramp_min_tpm=5, ramp_window_s=60)
    assert info.priority_budget_usd == Decimal("0.000000001") and info.ramp_max_growth == 1.0
    assert isinstance(info.ramp_max_growth, float)
    assert store.authenticate(token) == info == store.get(info.public_id)
    zero = store.update(info.public_id, priority_budget_usd=0)
    assert zero is not None and zero.priority_budget_usd == Decimal(0), "0: no priority at all"
    gone = store.update(info.public_id, priority_budget_usd=None, ramp_max_growth=None)
    assert gone is not None and (gone.priority_budget_usd, gone.ramp_max_growth) == (None, None)
    assert store.get(info.public_id) == gone


@pytest.mark.parametrize(("changes", "field"), [
    ({"ramp_max_growth": 0}, "ramp_max_growth"),
    ({"ramp_max_growth": -0.1}, "ramp_max_growth"),
    ({"ramp_max_growth": float("nan")}, "ramp_max_growth"),
    ({"ramp_max_growth": 101}, "ramp_max_growth"),
    ({"priority_budget_usd": -1}, "priority_budget_usd"),
    ({"priority_budget_usd": "-0.01"}, "priority_budget_usd"),
    ({"priority_budget_usd": "1e400"}, "priority_budget_usd"),
    ({"priority_budget_usd": "NaN"}, "priority_budget_usd"),
    ({"priority_budget_usd": "0.0000000005"}, "priority_budget_usd"),
    ({"priority_budget_usd": 100_001}, "priority_budget_usd"),
    ({"ramp_window_s": 59}, "ramp_window_s"),
    ({"ramp_window_s": 900.0}, "ramp_window_s"),
    ({"ramp_min_tpm": -1}, "ramp_min_tpm"),
])
def test_a_bad_setting_is_refused_naming_it_and_nothing_changes(
        tmp_path: Path, changes: dict[str, object], field: str) -> None:
    store = KeyStore(str(tmp_path / "k.db"))
    with pytest.raises(ValueError, match=f"^{field} "):
        store.create("bad", **changes)  # type: ignore[arg-type]
    assert store.list() == []
    info, _ = store.create("good")
    with pytest.raises(ValueError, match=f"^{field} "):
        store.update(info.public_id, **changes)
    assert store.get(info.public_id) == info


def test_cli_sets_updates_lists_and_refuses_the_downgrade_flags(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = str(tmp_path / "k.db")
    assert keys_main(["create", "team", "--priority-budget-usd", "25.50", "--ramp-max-growth",
                      "0.5", "--ramp-min-tpm", "1000000", "--db", db]) == 0
    out = capsys.readouterr()
    public_id = out.out.strip().split("-")[1]
    assert "priority budget 25.5 USD/day, ramp +0.5 over 900 s above 1000000 tpm" in out.err
    assert keys_main(["update", public_id, "--ramp-window-s", "600", "--priority-budget-usd",
                      "none", "--db", db]) == 0
    assert "priority budget none, ramp +0.5 over 600 s" in capsys.readouterr().out
    assert keys_main(["list", "--db", db]) == 0
    line = next(r for r in capsys.readouterr().out.splitlines() if r.startswith(public_id))
    assert line.split()[-2:] == ["-", "+0.5/600s>1000000"]
    assert keys_main(["update", public_id, "--ramp-max-growth", "0", "--db", db]) == 2
    assert "tierq keys: ramp_max_growth must be a number above 0" in capsys.readouterr().err
    assert keys_main(["create", "neg", "--priority-budget-usd", "-5", "--db", db]) == 2
    assert "tierq keys: priority_budget_usd must be from 0" in capsys.readouterr().err
    store = KeyStore(db)
    assert [k.name for k in store.list()] == ["team"]
    assert store.list()[0].ramp_window_s == 600


async def test_postgresql_keeps_the_settings_for_every_host(pg_url: str) -> None:
    store = PostgresKeyStore(pg_url, password_env=PASSWORD_ENV, refresh_s=0.05)
    await store.start()
    try:
        made, token = await asyncio.to_thread(
            store.create, "pg", priority_budget_usd="100000", ramp_max_growth=0.25,
            ramp_min_tpm=10, ramp_window_s=3600)
        assert made.priority_budget_usd == Decimal(100000)
        assert store.authenticate(token) == made == await asyncio.to_thread(store.get,
                                                                            made.public_id)
        new = await asyncio.to_thread(store.update, made.public_id,
                                      priority_budget_usd="0.123456789", ramp_max_growth=None)
        assert new is not None and new.priority_budget_usd == Decimal("0.123456789")
        other = PostgresKeyStore(pg_url, password_env=PASSWORD_ENV, refresh_s=0.05)
        await other.start()
        try:
            assert other.authenticate(token) == new, "every host reads it"
        finally:
            await other.aclose()
        with pytest.raises(ValueError, match="^ramp_max_growth "):
            await asyncio.to_thread(store.update, made.public_id, ramp_max_growth=-1)
    finally:
        await store.aclose()


def test_cli_sets_them_in_postgresql(pg_url: str, monkeypatch: pytest.MonkeyPatch,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("PGPASSWORD", PASSWORD)
    assert keys_main(["create", "pgcli", "--priority-budget-usd", "3", "--db", pg_url]) == 0
    public_id = capsys.readouterr().out.strip().split("-")[1]
    assert keys_main(["update", public_id, "--ramp-max-growth", "2", "--db", pg_url]) == 0
    assert "priority budget 3 USD/day, ramp +2 over 900 s" in capsys.readouterr().out
