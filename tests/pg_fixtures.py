"""pytest fixtures over tests/pg_server.py: a real PostgreSQL per session (a fresh
database per test) and one of a test's own for the outage tests.

Import them into a test module (`from pg_fixtures import pg_url  # noqa: F401`).
Without PostgreSQL's server binaries the tests skip, except under CI, where that
is a failure (.ci/run installs Debian's postgresql).
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator

import pytest

from pg_server import PASSWORD, PASSWORD_ENV, PgServer, pg_bin_dir

_databases = itertools.count()


def _need_postgres() -> None:
    if pg_bin_dir() is None:
        assert not os.environ.get("CI"), (
            "CI is set but there is no PostgreSQL server: .ci/run installs Debian's postgresql")
        pytest.skip("no PostgreSQL server binaries (apt-get install postgresql)")


@pytest.fixture(scope="session")
def pg_session() -> Iterator[PgServer]:
    _need_postgres()
    server = PgServer()
    try:
        server.init()
        server.start()
        yield server
    finally:
        server.remove()


@pytest.fixture
def pg_password(monkeypatch: pytest.MonkeyPatch) -> str:
    """The variable the tests' configs name in password_env, set for this test."""
    monkeypatch.setenv(PASSWORD_ENV, PASSWORD)
    return PASSWORD_ENV


@pytest.fixture
def pg_url(pg_session: PgServer, pg_password: str) -> str:
    """A fresh, empty database on the session's server: its URL, no password in it."""
    return pg_session.create_database(f"t{os.getpid()}_{next(_databases)}")


@pytest.fixture
def own_pg(pg_password: str) -> Iterator[PgServer]:
    """A server of this test's own, to stop and start; database `tierq` made."""
    _need_postgres()
    server = PgServer()
    try:
        server.init()
        server.start()
        server.psql('CREATE DATABASE "tierq"')
        yield server
    finally:
        server.remove()
