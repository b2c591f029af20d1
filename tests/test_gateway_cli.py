"""The `tierq` command: refusals and config errors as one line and exit 2, `models`."""

from __future__ import annotations

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


def test_serve_says_more_than_one_worker_is_not_supported_yet(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--workers", "4"]) == 2
    assert "not supported yet" in capsys.readouterr().err


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
