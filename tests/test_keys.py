"""API keys authenticate only when exact and live, are stored hashed, and rate-limit per key."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tierq import ManualClock
from tierq._core import SharedKeyBuckets
from tierq.cli import keys_main
from tierq.keys import KeyInfo, KeyLimiter, KeyStore, parse_token


MakeLimiter = Callable[[ManualClock], KeyLimiter]


@pytest.fixture(params=["per-process", "shared-table"])
def make_limiter(request: pytest.FixtureRequest) -> MakeLimiter:
    """Every limiter behaviour holds for per-process buckets and the shared table alike."""
    if request.param == "per-process":
        return lambda clock: KeyLimiter(clock)
    return lambda clock: KeyLimiter(clock, shared=SharedKeyBuckets(64, clock=clock))


@pytest.fixture
def books_store(tmp_path: Path) -> KeyStore:
    return KeyStore(str(tmp_path / "tierq.db"))


def test_created_key_authenticates_and_has_the_documented_shape(books_store: KeyStore) -> None:
    info, token = books_store.create("ci", rpm=60, tpm=1000)
    assert token.startswith(f"tq-{info.public_id}-")
    assert len(info.public_id) == 12 and len(token.split("-", 2)[2]) == 32
    got = books_store.authenticate(token)
    assert got == info
    assert (got.rpm, got.tpm, got.revoked) == (60, 1000, False)


def test_revoked_key_is_rejected_at_once_by_the_revoking_store(books_store: KeyStore) -> None:
    info, token = books_store.create("a")
    assert books_store.authenticate(token) is not None  # now cached
    assert books_store.revoke(info.public_id) is True
    assert books_store.authenticate(token) is None
    assert books_store.revoke(info.public_id) is False
    assert books_store.revoke("nosuchkey000") is False


def test_revocation_from_another_process_takes_effect_within_the_cache_ttl(tmp_path: Path) -> None:
    now = [100.0]
    gateway = KeyStore(str(tmp_path / "k.db"), cache_ttl_s=5.0, clock=lambda: now[0])
    admin = KeyStore(str(tmp_path / "k.db"))
    info, token = admin.create("a")
    assert gateway.authenticate(token) == info
    admin.revoke(info.public_id)
    now[0] += 4.9
    assert gateway.authenticate(token) == info  # still cached: the documented window
    now[0] += 0.2
    assert gateway.authenticate(token) is None


def test_a_refused_token_is_refused_from_memory_until_the_denied_ttl(tmp_path: Path) -> None:
    now = [100.0]
    store = KeyStore(str(tmp_path / "k.db"), clock=lambda: now[0], denied_ttl_s=1.0)
    info, token = store.create("a")
    wrong = token[:-4] + ("aaaa" if not token.endswith("aaaa") else "bbbb")
    unknown = "tq-zzzzzzzzzzzz-" + "s" * 32
    for bad in (wrong, unknown, "tq-short", "Bearer x" * 9):
        assert store.authenticate(bad) is None
    assert store.lookups == 2  # the two well-formed ones; malformed never reach SQLite
    for _ in range(50):
        assert store.authenticate(wrong) is None and store.authenticate(unknown) is None
    assert store.lookups == 2
    now[0] += 1.01  # past the TTL: looked up again (and still refused)
    assert store.authenticate(wrong) is None
    assert store.lookups == 3
    # A revoked key, once its positive entry is gone, is refused from memory too.
    assert store.authenticate(token) == info
    store.revoke(info.public_id)
    assert store.authenticate(token) is None and store.authenticate(token) is None
    assert store.lookups == 5


def test_a_key_created_elsewhere_is_accepted_within_the_denied_ttl_of_being_tried(
    tmp_path: Path,
) -> None:
    # A token can only be tried before its key exists if it was guessed or the
    # create raced the client; even then the refusal lasts one TTL at most.
    now = [100.0]
    gateway = KeyStore(str(tmp_path / "k.db"), clock=lambda: now[0], denied_ttl_s=1.0)
    admin = KeyStore(str(tmp_path / "k.db"))
    info, token = admin.create("late")
    gateway._deny(hashlib.sha256(token.encode()).digest(), now[0])  # tried just before
    assert gateway.authenticate(token) is None
    now[0] += 1.01
    assert gateway.authenticate(token) == info


def test_the_denied_cache_is_bounded_oldest_first(tmp_path: Path) -> None:
    from tierq.keys import DENIED_MAX

    store = KeyStore(str(tmp_path / "k.db"))
    tokens = [f"tq-{i:012d}-" + "s" * 32 for i in range(DENIED_MAX + 10)]
    for t in tokens:
        assert store.authenticate(t) is None
    assert len(store._denied) == DENIED_MAX
    first, last = (hashlib.sha256(t.encode()).digest() for t in (tokens[0], tokens[-1]))
    assert first not in store._denied and last in store._denied


def test_wrong_secret_and_other_keys_secret_are_rejected(books_store: KeyStore) -> None:
    a, token_a = books_store.create("a")
    b, token_b = books_store.create("b")
    secret_b = token_b.split("-", 2)[2]
    assert books_store.authenticate(f"tq-{a.public_id}-{secret_b}") is None
    flipped = token_a[:-1] + ("A" if token_a[-1] != "A" else "B")
    assert books_store.authenticate(flipped) is None
    assert books_store.authenticate(token_a) == a


@pytest.mark.parametrize(
    "token",
    [
        "",
        "tq-",
        "Bearer tq-abc",
        "tq-abcdefabcdef-" + "x" * 31,
        "tq-ABCDEFABCDEF-" + "x" * 32,
        "tq-abcdefabcdef-" + "x" * 31 + "\x00",
        "tq-abcdefabcdef-" + "x" * 32 + "\n",
        "tq-abc' OR '1'='1-" + "x" * 28,
        "tq-abcdefabcde'-" + "x" * 32,
        "tq-abcdefabcdef-" + "'; DROP TABLE keys; --" + "x" * 10,
        "tq-abcdefabcdef-" + "é" * 32,
        "tq-abcdefabcdef-" + "x" * 10_000_000,
        "\x00" * 48,
    ],
)
def test_malformed_sql_ish_and_hostile_tokens_are_rejected_without_raising(
    books_store: KeyStore, token: str
) -> None:
    books_store.create("live")
    assert books_store.authenticate(token) is None
    assert len(books_store.list()) == 1  # the table is intact


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(junk=st.one_of(st.text(), st.text(alphabet="tq-abc'\"\\\x00;_", min_size=40, max_size=60),
                      st.builds(lambda s: "tq-" + s, st.text(min_size=45, max_size=45))))
def test_no_arbitrary_string_authenticates_or_raises(books_store: KeyStore, junk: str) -> None:
    assert books_store.authenticate(junk) is None


def test_parse_token_refuses_non_strings() -> None:
    assert parse_token(None) is None
    assert parse_token(b"tq-abcdefabcdef-" + b"x" * 32) is None


def test_secret_never_reaches_the_database_files(tmp_path: Path) -> None:
    store = KeyStore(str(tmp_path / "tierq.db"))
    tokens = [store.create(f"k{i}")[1] for i in range(5)]
    store.close()
    blob = b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.is_file())
    for token in tokens:
        secret = token.split("-", 2)[2]
        assert secret.encode() not in blob
        assert hashlib.sha256(secret.encode()).hexdigest().encode() in blob  # it did write


def test_list_shows_keys_but_no_secrets(books_store: KeyStore, capsys: pytest.CaptureFixture[str]) -> None:
    _, token = books_store.create("alpha", rpm=5)
    info = books_store.list()
    assert [k.name for k in info] == ["alpha"]
    assert not any(hasattr(k, "secret") for k in info)
    assert keys_main(["list", "--db", books_store.path]) == 0
    out = capsys.readouterr().out
    assert "alpha" in out and info[0].public_id in out
    assert token.split("-", 2)[2] not in out


def test_cli_create_prints_key_once_then_revoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = str(tmp_path / "cli.db")
    assert keys_main(["create", "ci-bot", "--rpm", "10", "--db", db]) == 0
    out, err = capsys.readouterr()
    token = out.strip()
    assert "will not be shown again" in err
    store = KeyStore(db)
    info = store.authenticate(token)
    assert info is not None and info.rpm == 10 and info.tpm is None
    assert keys_main(["revoke", info.public_id, "--db", db]) == 0
    assert keys_main(["revoke", info.public_id, "--db", db]) == 1
    assert keys_main(["revoke", "x'; --", "--db", db]) == 2
    assert keys_main(["list", "--db", str(tmp_path / "none.db")]) == 1
    assert keys_main(["create", "bad", "--rpm", "0", "--db", db]) == 2


def _key(rpm: int | None = None, tpm: int | None = None) -> KeyInfo:
    return KeyInfo("abcdefabcdef", "t", 0.0, None, rpm, tpm)


def test_rpm_limit_refuses_with_exact_retry_after_and_refills(make_limiter: MakeLimiter) -> None:
    clock = ManualClock()
    lim = make_limiter(clock)
    key = _key(rpm=2)
    assert lim.check(key, 10) is None
    assert lim.check(key, 10) is None
    wait = lim.check(key, 10)
    assert wait == pytest.approx(30.0)  # 2 per minute: one every 30 s
    clock.advance(29.0)
    assert lim.check(key, 10) == pytest.approx(1.0)
    clock.advance(1.0)
    assert lim.check(key, 10) is None


def test_tpm_limit_counts_estimates_and_settle_refunds_unused_tokens(make_limiter: MakeLimiter) -> None:
    clock = ManualClock()
    lim = make_limiter(clock)
    key = _key(tpm=100)
    assert lim.check(key, 60) is None
    wait = lim.check(key, 60)
    assert wait == pytest.approx(12.0)  # 20 tokens short at 100/60 per second
    lim.settle(key, 60, 10)  # the first request used only 10
    assert lim.check(key, 60) is None


def test_settle_charges_usage_beyond_the_estimate(make_limiter: MakeLimiter) -> None:
    clock = ManualClock()
    lim = make_limiter(clock)
    key = _key(tpm=100)
    assert lim.check(key, 10) is None
    lim.settle(key, 10, 100)
    assert lim.check(key, 1) == pytest.approx(0.6)


def test_refund_gives_back_the_estimate_and_the_request_only_when_asked(
    make_limiter: MakeLimiter,
) -> None:
    lim = make_limiter(ManualClock())
    key = _key(rpm=3, tpm=100)
    assert lim.check(key, 40) is None
    assert lim.remaining(key) == (2.0, 60.0)
    lim.refund(key, 40, request=False)  # the client's doing: the request stays counted
    assert lim.remaining(key) == (2.0, 100.0)
    assert lim.check(key, 40) is None
    lim.refund(key, 40, request=True)  # the gateway's doing: nothing is left charged
    assert lim.remaining(key) == (2.0, 100.0)


def test_refund_never_fills_a_bucket_past_full(make_limiter: MakeLimiter) -> None:
    lim = make_limiter(ManualClock())
    key = _key(rpm=2, tpm=100)
    assert lim.check(key, 5000) is None  # charged the whole bucket, not the estimate
    lim.refund(key, 5000, request=True)
    lim.refund(key, 5000, request=True)  # a second refund has nothing left to give
    assert lim.remaining(key) == (2.0, 100.0)
    assert lim.remaining(_key()) == (None, None)  # unlimited


def test_tpm_refusal_gives_the_request_back_to_rpm(make_limiter: MakeLimiter) -> None:
    lim = make_limiter(ManualClock())
    key = _key(rpm=2, tpm=100)
    assert lim.check(key, 100) is None
    assert lim.check(key, 50) is not None  # refused by tpm
    assert lim.check(key, 0) is None  # so one request is still left
    assert lim.check(key, 0) is not None


def test_estimate_above_a_minute_budget_is_admitted_on_a_full_bucket(make_limiter: MakeLimiter) -> None:
    lim = make_limiter(ManualClock())
    key = _key(tpm=100)
    assert lim.check(key, 5000) is None
    assert lim.check(key, 1) is not None


def test_unlimited_key_is_never_refused_and_limits_are_per_key(make_limiter: MakeLimiter) -> None:
    lim = make_limiter(ManualClock())
    free = _key()
    for _ in range(1000):
        assert lim.check(free, 10**6) is None
    a = KeyInfo("aaaaaaaaaaaa", "a", 0.0, None, 1, None)
    b = KeyInfo("bbbbbbbbbbbb", "b", 0.0, None, 1, None)
    assert lim.check(a, 1) is None
    assert lim.check(a, 1) is not None
    assert lim.check(b, 1) is None


def test_shared_table_holds_a_keys_limit_across_workers() -> None:
    clock = ManualClock()
    name = f"/tierq-test-keys-{id(clock)}"
    table = SharedKeyBuckets.create(name, 16, clock=clock)
    try:
        workers = [KeyLimiter(clock, shared=SharedKeyBuckets.attach(name, clock=clock)) for _ in range(2)]
        key = _key(rpm=5)
        served = [w.check(key, 1) is None for _ in range(5) for w in workers]
        assert served.count(True) == 5, "5 a minute in total, not 5 per worker"
        assert workers[1].check(key, 1) == pytest.approx(12.0)
        clock.advance(12.0)
        assert workers[0].check(key, 1) is None
        assert table.used() == 1
    finally:
        SharedKeyBuckets.unlink(name)


def test_full_shared_table_falls_back_to_per_process_buckets_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = ManualClock()
    lim = KeyLimiter(clock, shared=SharedKeyBuckets(1, clock=clock))
    a = KeyInfo("aaaaaaaaaaaa", "a", 0.0, None, 1, None)
    b = KeyInfo("bbbbbbbbbbbb", "b", 0.0, None, 1, None)
    assert lim.check(a, 1) is None
    with caplog.at_level("WARNING", logger="tierq.keys"):
        assert lim.check(b, 1) is None
        assert lim.check(b, 1) is not None, "the fallback bucket still limits"
    assert [r.getMessage() for r in caplog.records] == [
        "shared key table full (1 keys): key bbbbbbbbbbbb gets per-process rpm limits, "
        "so each worker allows it 1 a minute"]
    assert lim.check(a, 1) is not None
