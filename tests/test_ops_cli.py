"""`tierq usage` from a config's ledger in every format, `tierq models --json`, progress."""

from __future__ import annotations

import csv
import io
import threading
import time
from decimal import Decimal
from pathlib import Path

import aiohttp
import orjson
import pytest

from conftest import PRIORITY_MODEL, GatewayFactory
from tierq.cli import main
from tierq.config import Config, LedgerConfig, UpstreamConfig
from tierq.progress import progress


async def test_usage_reads_the_ledger_named_in_the_config_as_table_csv_and_json(
    make_gateway: GatewayFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    gw = await make_gateway(config=Config(ledger=LedgerConfig(url=f"sqlite:///{tmp_path / 'x.db'}"),
                                          upstreams=(UpstreamConfig("sim", "", "sim"),)))
    # The fixture's gateway records into its own ledger file: name it in a config.
    toml = tmp_path / "tierq.toml"
    toml.write_text(f'[ledger]\nurl = "sqlite:///{gw.ledger.path}"\n')

    async with aiohttp.ClientSession() as s:
        for tier in ("priority", "default"):
            body = {"model": PRIORITY_MODEL, "service_tier": tier, "max_tokens": 3,
                    "messages": [{"role": "user", "content": "hello there"}]}
            async with s.post(gw.url + "/chat/completions", data=orjson.dumps(body),
                              headers={"Content-Type": "application/json"}) as r:
                assert r.status == 200
    await gw.ledger.flush()

    assert main(["usage", "--config", str(toml), "--since", "1h"]) == 0
    table = capsys.readouterr().out
    assert "priority" in table and "default" in table and "TOTAL" in table

    assert main(["usage", "--config", str(toml), "--format", "json",
                 "--model", PRIORITY_MODEL, "--key", "local"]) == 0
    data = orjson.loads(capsys.readouterr().out)
    tiers = {line["applied_tier"]: line for line in data["lines"]}
    assert set(tiers) == {"priority", "default"} and data["total"]["served"] == 2
    # Same tokens, priority billed 1.5x: exact strings.
    assert Decimal(tiers["priority"]["cost"]) == Decimal(tiers["default"]["cost"]) * Decimal("1.5")

    assert main(["usage", "--config", str(toml), "--format", "csv", "--model", "nope"]) == 0
    rows = list(csv.reader(io.StringIO(capsys.readouterr().out)))
    assert rows[0][:3] == ["key_id", "model", "applied_tier"] and len(rows) == 1

    assert main(["usage", "--config", str(toml), "--format", "csv", "--json"]) == 2
    assert "contradicts" in capsys.readouterr().err


def test_usage_config_error_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    toml = tmp_path / "bad.toml"
    toml.write_text('[ledger]\nurl = "mysql://x"\n')
    assert main(["usage", "--config", str(toml)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "ledger.url" in err


def test_models_json_is_what_v1_models_returns(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "--json"]) == 0
    data = orjson.loads(capsys.readouterr().out)
    m = next(x for x in data["data"] if x["id"] == PRIORITY_MODEL)
    assert m["priority"] is True and m["pricing"]["priority_input"] == 0.045
    assert main(["models"]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines()
                if ln.startswith(PRIORITY_MODEL + " "))
    assert "$0.045 / $0.075" in line


def test_progress_shows_a_spinner_only_for_slow_work_and_erases_it() -> None:
    out = io.StringIO()
    with progress("quick", delay=5.0, stream=out, force=True):
        pass
    assert out.getvalue() == ""
    with progress("summing", delay=0.0, stream=out, force=True):
        deadline = time.monotonic() + 30.0  # polled: the spinner's first frame is drawn
        while "summing (" not in out.getvalue():
            assert time.monotonic() < deadline, "no spinner frame"
            time.sleep(0.005)
    text = out.getvalue()
    assert "summing (" in text and text.endswith("\r\033[K")
    quiet = io.StringIO()  # not a terminal, not forced: nothing at all
    with progress("summing", delay=0.0, stream=quiet):
        # No spinner thread was started at all, so nothing can be drawn later.
        assert not [t for t in threading.enumerate() if t.name == "tierq-progress"]
    assert quiet.getvalue() == ""
