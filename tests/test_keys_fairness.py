"""A key's fair-queuing weight and trust: set at create, changed by `tierq keys
update`, kept through the migrations of both key stores (an existing SQLite key
file, a PostgreSQL database at schema version 2, whose ledger rows keep reading)."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from decimal import Decimal
from pathlib import Path

import pytest
from pg_fixtures import pg_password, pg_session, pg_url  # noqa: F401
from pg_server import PASSWORD, PASSWORD_ENV

from tierq.cli import keys_main
from tierq.keys import KeyStore, hash_secret
from tierq.postgres import (MIGRATIONS, PostgresKeyStore, PostgresLedger, migrate, pg_connect,
                            schema_version)

# The keys table as tierq made it before keys had a weight and trust (main a32ca18).
_OLD_SCHEMA = """
CREATE TABLE IF NOT EXISTS keys (
    public_id     TEXT PRIMARY KEY,
    name          TEXT NOT NULL,
    secret_sha256 TEXT NOT NULL,
    created       REAL NOT NULL,
    revoked       REAL,
    rpm           INTEGER,
    tpm           INTEGER
);
"""
_OLD_ID = "oldkey000001"
_OLD_SECRET = "s" * 32
_OLD_TOKEN = f"tq-{_OLD_ID}-{_OLD_SECRET}"


def _old_key_file(path: Path) -> None:
    with sqlite3.connect(path) as conn:
        conn.executescript(_OLD_SCHEMA)
        conn.execute("INSERT INTO keys VALUES (?, 'legacy', ?, 1.0, NULL, 30, NULL)",
                     (_OLD_ID, hash_secret(_OLD_SECRET)))
    conn.close()


def test_a_key_file_made_by_the_previous_schema_keeps_working_with_weight_1_untrusted(
        tmp_path: Path) -> None:
    db = tmp_path / "old.db"
    _old_key_file(db)
    store = KeyStore(str(db))
    info = store.authenticate(_OLD_TOKEN)
    assert info is not None and (info.name, info.rpm, info.tpm) == ("legacy", 30, None)
    assert (info.weight, info.trusted) == (1.0, False)
    new, token = store.create("fresh", weight=2.5, trusted=True)
    store.close()
    again = KeyStore(str(db))  # opening a migrated file again changes nothing
    assert again.authenticate(token) == new and again.authenticate(_OLD_TOKEN) == info
    columns = [r[1] for r in sqlite3.connect(db).execute("PRAGMA table_info(keys)")]
    assert columns.count("weight") == 1 and columns.count("trusted") == 1


def test_two_processes_opening_an_old_key_file_at_once_add_each_column_once(tmp_path: Path) -> None:
    db = tmp_path / "old.db"
    _old_key_file(db)
    errors: list[BaseException] = []
    stores: list[KeyStore] = []

    def open_store() -> None:
        try:
            stores.append(KeyStore(str(db)))
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=open_store) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(stores) == 4
    assert all(s.authenticate(_OLD_TOKEN) is not None for s in stores)


def test_update_changes_only_what_it_is_given_and_takes_effect_at_once(tmp_path: Path) -> None:
    store = KeyStore(str(tmp_path / "k.db"))
    info, token = store.create("team", rpm=10, tpm=1000)
    assert store.authenticate(token) == info  # cached now
    new = store.update(info.public_id, weight=4, trusted=True)
    assert new is not None and (new.weight, new.trusted, new.rpm, new.tpm, new.name) == (
        4.0, True, 10, 1000, "team")
    assert isinstance(new.weight, float)
    assert store.authenticate(token) == new, "the cache forgot the old settings"
    unlimited = store.update(info.public_id, rpm=None, name="renamed")
    assert unlimited is not None and (unlimited.rpm, unlimited.tpm, unlimited.name) == (
        None, 1000, "renamed")
    assert store.get(info.public_id) == unlimited


@pytest.mark.parametrize("bad", [
    {"weight": 0.0}, {"weight": 0.009}, {"weight": 100.5}, {"weight": -1.0},
    {"weight": float("nan")}, {"weight": float("inf")}, {"weight": True}, {"rpm": 0},
    {"name": ""}, {"trusted": 1},
])
def test_an_invalid_update_changes_nothing(tmp_path: Path, bad: dict[str, object]) -> None:
    store = KeyStore(str(tmp_path / "k.db"))
    info, _ = store.create("team")
    with pytest.raises(ValueError):
        store.update(info.public_id, **bad)  # type: ignore[arg-type]
    assert store.get(info.public_id) == info


def test_weight_bounds_are_inclusive_and_create_refuses_outside_them(tmp_path: Path) -> None:
    store = KeyStore(str(tmp_path / "k.db"))
    assert store.create("low", weight=0.01)[0].weight == 0.01
    assert store.create("high", weight=100)[0].weight == 100.0
    for w in (0.0099, 100.01, float("nan")):
        with pytest.raises(ValueError, match="weight must be a number from 0.01 to 100"):
            store.create("bad", weight=w)


def test_update_of_an_unknown_or_revoked_key_is_none(tmp_path: Path) -> None:
    store = KeyStore(str(tmp_path / "k.db"))
    info, _ = store.create("gone")
    store.revoke(info.public_id)
    assert store.update(info.public_id, weight=2.0) is None
    assert store.update("nosuchkey000", weight=2.0) is None


def test_cli_create_trusted_with_weight_then_update_and_list(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = str(tmp_path / "cli.db")
    assert keys_main(["create", "gw", "--weight", "2", "--trusted", "--db", db]) == 0
    out, err = capsys.readouterr()
    info = KeyStore(db).authenticate(out.strip())
    assert info is not None and (info.weight, info.trusted) == (2.0, True)
    assert "weight 2, trusted" in err
    assert keys_main(["update", info.public_id, "--weight", "0.5", "--untrusted",
                      "--rpm", "60", "--db", db]) == 0
    assert "weight 0.5, untrusted" in capsys.readouterr().out
    got = KeyStore(db).get(info.public_id)
    assert got is not None and (got.weight, got.trusted, got.rpm) == (0.5, False, 60)
    assert keys_main(["update", info.public_id, "--rpm", "unlimited", "--db", db]) == 0
    capsys.readouterr()
    got = KeyStore(db).get(info.public_id)
    assert got is not None and got.rpm is None and got.weight == 0.5
    assert keys_main(["list", "--db", db]) == 0
    listing = capsys.readouterr().out
    assert "WEIGHT" in listing and "TRUSTED" in listing and "0.5" in listing
    assert keys_main(["update", info.public_id, "--weight", "1000", "--db", db]) == 2
    assert "weight must be a number from 0.01 to 100" in capsys.readouterr().err
    assert keys_main(["update", "nosuchkey000", "--weight", "2", "--db", db]) == 1
    assert keys_main(["update", "x'; --", "--weight", "2", "--db", db]) == 2
    with pytest.raises(SystemExit):
        keys_main(["update", info.public_id, "--trusted", "--untrusted", "--db", db])


async def test_postgresql_at_the_previous_schema_version_migrates_and_old_keys_keep_working(
        pg_url: str) -> None:
    conn = await pg_connect(pg_url, PASSWORD_ENV)
    try:
        # The database as the previous tierq left it: migrations up to 2, one key.
        await conn.execute("CREATE TABLE tierq_schema_version (version INTEGER PRIMARY KEY,"
                           " description TEXT NOT NULL, applied_at TIMESTAMPTZ NOT NULL"
                           " DEFAULT now())")
        for version, description, ddl in MIGRATIONS[:2]:
            await conn.execute(ddl)
            await conn.execute("INSERT INTO tierq_schema_version (version, description)"
                               " VALUES ($1, $2)", version, description)
        await conn.execute("INSERT INTO keys VALUES ($1, 'legacy', $2, 1.0, NULL, 30, NULL)",
                           _OLD_ID, hash_secret(_OLD_SECRET))
        await conn.execute("INSERT INTO ledger VALUES ('old', 1.0, 'k', 'm', 'chat.completions',"
                           " NULL, 'default', 3, 4, 0.25, 250000, 0, 'served', 0, NULL, 0, 1,"
                           " 'sim')")
        assert await schema_version(conn) == 2
    finally:
        await conn.close()
    store = PostgresKeyStore(pg_url, password_env=PASSWORD_ENV, refresh_s=0.05)
    await store.start()
    try:
        info = store.authenticate(_OLD_TOKEN)
        assert info is not None and (info.weight, info.trusted, info.rpm) == (1.0, False, 30)
        new = await asyncio.to_thread(store.update, _OLD_ID, weight=3.0, trusted=True)
        assert new is not None and (new.weight, new.trusted, new.rpm) == (3.0, True, 30)
        assert store.authenticate(_OLD_TOKEN) == new, "at once on the updating host"
        other = PostgresKeyStore(pg_url, password_env=PASSWORD_ENV, refresh_s=0.05)
        await other.start()
        try:
            assert other.authenticate(_OLD_TOKEN) == new, "every host reads it"
        finally:
            await other.aclose()
        made, token = await asyncio.to_thread(store.create, "fresh", weight=0.25)
        assert (made.weight, made.trusted) == (0.25, False)
        assert await asyncio.to_thread(store.get, made.public_id) == made
        with pytest.raises(ValueError):
            await asyncio.to_thread(store.update, made.public_id, weight=0.0)
        assert await asyncio.to_thread(store.update, "nosuchkey000", weight=2.0) is None
    finally:
        await store.aclose()
    conn = await pg_connect(pg_url, PASSWORD_ENV)
    try:
        assert await migrate(conn) == MIGRATIONS[-1][0]
        assert await schema_version(conn) == MIGRATIONS[-1][0]
    finally:
        await conn.close()
    old = PostgresLedger(pg_url, password_env=PASSWORD_ENV).get("old")
    assert old is not None and old.fairness_id is None and old.cost == Decimal("0.25")


def test_cli_creates_and_updates_a_trusted_weighted_key_in_postgresql(
        pg_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("PGPASSWORD", PASSWORD)
    assert keys_main(["create", "edge-gw", "--weight", "4", "--trusted", "--db", pg_url]) == 0
    token = capsys.readouterr().out.strip()
    public_id = token.split("-")[1]
    assert keys_main(["update", public_id, "--weight", "0.5", "--untrusted", "--tpm", "900",
                      "--db", pg_url]) == 0
    assert "weight 0.5, untrusted" in capsys.readouterr().out
    assert keys_main(["list", "--db", pg_url]) == 0
    listing = capsys.readouterr().out
    line = next(row for row in listing.splitlines() if row.startswith(public_id))
    assert line.split()[-7:] == ["unlimited", "900", "0.5", "no", "enforced", "-", "-"]
    assert keys_main(["update", public_id, "--weight", "0", "--db", pg_url]) == 2
    assert keys_main(["update", "nosuchkey000", "--weight", "2", "--db", pg_url]) == 1
