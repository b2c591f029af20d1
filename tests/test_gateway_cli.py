"""The `tierq` command: refusals and config errors as one line and exit 2 (a missing
extra too, before anything listens), a key store unreachable at start as one line
and exit 1, `models`."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tierq.cli import main


def test_config_error_prints_one_line_and_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "tierq.toml"
    bad.write_text('[[models]]\nid = "zai-org/GLM-5.2"\n[models.admission]\nrate = "fast"\n')
    assert main(["serve", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err == f'{bad}: models[0].admission.rate: expected a number, got "fast"\n'


def test_serve_refuses_non_loopback_host_without_keys(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--host", "0.0.0.0"]) == 2
    assert "no API keys configured" in capsys.readouterr().err


def test_serve_refuses_fewer_than_one_worker(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--workers", "0"]) == 2
    assert "at least 1" in capsys.readouterr().err


def test_models_lists_catalog_with_prices_and_priority_tag(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    line = next(l for l in out.splitlines() if l.startswith("meta-llama/Meta-Llama-3.1-8B-Instruct "))
    assert "$0.03" in line and "$0.05" in line and "priority (1.5x)" in line
    turbo = next(l for l in out.splitlines() if l.startswith("meta-llama/Meta-Llama-3.1-8B-Instruct-Turbo"))
    assert "priority" not in turbo
    assert "52 models, 37 priority-enabled" in out


def test_usage_and_keys_are_delegated_with_their_own_help(capsys: pytest.CaptureFixture[str]) -> None:
    for command in ("usage", "keys"):
        with pytest.raises(SystemExit) as info:
            main([command, "--help"])
        assert info.value.code == 0
        assert f"tierq {command}" in capsys.readouterr().out


def _held_port() -> socket.socket:
    """A loopback port bound and listened on by the test: a `tierq serve` that
    tried to listen on it first would fail there, not with the line under test."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    return s


def _serve(tmp_path: Path, config: str, *args: str, env: dict[str, str] | None = None,
           ) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "tierq.toml"
    path.write_text(config)
    return subprocess.run([sys.executable, "-m", "tierq", "serve", "--config", str(path), *args],
                          cwd=tmp_path, env={**os.environ, **(env or {})}, capture_output=True,
                          text=True, timeout=60)


PG_URL = "postgresql://tierq:s3cret@127.0.0.1:{port}/tierq"


@pytest.mark.parametrize("workers", ["1", "2"])
@pytest.mark.parametrize(
    ("package", "config", "expected"),
    [
        ("redis", '[cluster]\nredis_url = "redis://127.0.0.1:1/0"\n',
         "tierq serve: [cluster] needs the redis package: pip install 'tierq[cluster]'"),
        ("asyncpg", f'[ledger]\nurl = "{PG_URL.format(port=1)}"\n',
         "tierq serve: [ledger] url postgresql://tierq:***@127.0.0.1:1/tierq: a postgresql:// "
         "url needs asyncpg"),
        ("asyncpg", f'[keys]\nurl = "{PG_URL.format(port=1)}"\n',
         "tierq serve: [keys] url postgresql://tierq:***@127.0.0.1:1/tierq: a postgresql:// "
         "url needs asyncpg"),
    ],
)
def test_a_config_needing_a_missing_extra_is_refused_in_one_line_before_listening(
    tmp_path: Path, package: str, config: str, expected: str, workers: str
) -> None:
    # The package made unimportable as on a machine without the extra: a module
    # of its name first on the path that fails as a missing one does.
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / f"{package}.py").write_text(
        f"raise ModuleNotFoundError(\"No module named '{package}'\", name={package!r})\n")
    with _held_port() as held:
        port = str(held.getsockname()[1])
        done = _serve(tmp_path, config, "--port", port, "--workers", workers,
                      env={"PYTHONPATH": str(shim)})
    assert done.returncode == 2, done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(expected), done.stderr
    assert "s3cret" not in done.stderr and done.stdout == ""


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_postgres_key_store_unreachable_at_start_is_one_line_and_exit_1(
    tmp_path: Path, workers: str
) -> None:
    # A bound port nobody listens on: PostgreSQL's connect is refused there.
    with socket.socket() as closed, _held_port() as held:
        closed.bind(("127.0.0.1", 0))
        url = PG_URL.format(port=closed.getsockname()[1])
        done = _serve(tmp_path, f'[keys]\nurl = "{url}"\n', "--port",
                      str(held.getsockname()[1]), "--workers", workers, "--log-format", "text")
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr and "s3cret" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if "ERROR" in line]
    assert len(errors) == 1, done.stderr
    assert (f"[keys] url {url.replace('s3cret', '***')}: could not read the key table at start "
            "([Errno 111] Connection refused); not serving without it") in errors[0]
    assert "listening on" not in done.stderr
