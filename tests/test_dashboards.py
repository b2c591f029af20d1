"""The shipped dashboard and alert rules, checked against a real Prometheus.

examples/prometheus/alerts.yml passes `promtool check rules` and its unit tests
(`promtool test rules` on alerts_test.yml); every name the rules and
examples/grafana/tierq.json use is a tierq.metrics family; and a real
Prometheus (Debian's, on a free loopback port, data in a temporary folder)
scrapes a real `tierq serve` under load (priority streams, default requests,
429s), loads the rules, and answers every query of every dashboard panel with
data.

Outside CI the tests skip when prometheus is not installed; in CI (CI set) a
missing binary is a failure (`.ci/run` installs it: scripts/system-deps.sh
prometheus).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import orjson
import pytest
from openai import AsyncOpenAI

from tierq.metrics import METRIC_NAMES
from ports import free_port

ROOT = Path(__file__).resolve().parent.parent
ALERTS = ROOT / "examples" / "prometheus" / "alerts.yml"
ALERT_TESTS = ROOT / "examples" / "prometheus" / "alerts_test.yml"
DASHBOARD = ROOT / "examples" / "grafana" / "tierq.json"
MODEL = "meta-llama/Meta-Llama-3.1-8B-Instruct"
# A histogram family's series carry one of these after its name.
_SERIES_SUFFIX = re.compile(r"_(bucket|sum|count)$")


def _binary(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is not installed (CI must run the dashboard tests)")
        pytest.skip(f"{name} is not installed (bash scripts/system-deps.sh prometheus)")
    return found


def _panels() -> list[dict[str, Any]]:
    """Every panel of the dashboard that queries (rows hold none)."""
    board = orjson.loads(DASHBOARD.read_bytes())
    return [p for p in board["panels"] if p["type"] != "row"]


def _dashboard_exprs() -> list[tuple[str, str]]:
    return [(p["title"], t["expr"]) for p in _panels() for t in p["targets"]]


def _alert_names() -> list[str]:
    return re.findall(r"- alert: (\w+)", ALERTS.read_text())


def test_the_alert_rules_pass_promtool_check_and_their_unit_tests() -> None:
    promtool = _binary("promtool")
    check = subprocess.run([promtool, "check", "rules", str(ALERTS)],
                           capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "SUCCESS: 5 rules found" in check.stdout, check.stdout
    unit = subprocess.run([promtool, "test", "rules", ALERT_TESTS.name], cwd=ALERT_TESTS.parent,
                          capture_output=True, text=True, timeout=60)
    assert unit.returncode == 0, unit.stdout + unit.stderr
    assert "SUCCESS" in unit.stdout, unit.stdout


def test_the_unit_tests_fail_when_an_alert_does_not_fire(tmp_path: Path) -> None:
    """The rule tests can fail: with the TTFT objective raised past what the
    slow series shows, the test expecting it to fire does."""
    (tmp_path / "alerts.yml").write_text(ALERTS.read_text().replace(") > 2\n", ") > 10\n"))
    shutil.copy(ALERT_TESTS, tmp_path / ALERT_TESTS.name)
    unit = subprocess.run([_binary("promtool"), "test", "rules", ALERT_TESTS.name], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert unit.returncode != 0
    assert "TierqPriorityTTFTHigh" in unit.stdout + unit.stderr


def test_every_name_in_the_dashboard_and_the_alerts_is_a_tierq_metric() -> None:
    assert _alert_names() == [
        "TierqPriorityTTFTHigh", "TierqShedRateHigh", "TierqLedgerSpooling",
        "TierqRedisUnavailable", "TierqLimitPinnedAtFloor"]
    # the rules' text whole (their descriptions name metrics too) and each panel's queries
    exprs = [ALERTS.read_text()] + [e for _, e in _dashboard_exprs()]
    used = {_SERIES_SUFFIX.sub("", m) for e in exprs for m in re.findall(r"\btierq_\w+", e)}
    assert used, "the queries name tierq's metrics"
    assert used <= set(METRIC_NAMES), sorted(used - set(METRIC_NAMES))
    titles = [p["title"] for p in _panels()]
    assert len(titles) == len(set(titles)) and len(titles) >= 8
    ids = [p["id"] for p in orjson.loads(DASHBOARD.read_bytes())["panels"]]
    assert len(ids) == len(set(ids)), "panel ids are unique"


# ---- a real Prometheus scraping a real `tierq serve` ----------------------------


@contextlib.contextmanager
def _process(cmd: list[str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


async def _until_up(url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    async with aiohttp.ClientSession() as s:
        for _ in range(600):
            assert proc.poll() is None, log.read_text()
            with contextlib.suppress(aiohttp.ClientError):
                async with s.get(url) as r:
                    if r.status == 200:
                        return
            await asyncio.sleep(0.05)
    raise AssertionError(f"{url} never answered: {log.read_text()}")


@pytest.fixture
async def scraped(tmp_path: Path) -> AsyncIterator[tuple[str, str]]:
    """(tierq's /v1 root, Prometheus' root): tierq serve with an adaptive pool on
    the sim, a queue small enough to shed, scraped every second."""
    prometheus = _binary("prometheus")
    cfg = tmp_path / "tierq.toml"
    cfg.write_text(f"""
[ledger]
url = "sqlite:///{tmp_path / 'tierq.db'}"
[[upstreams]]
name = "sim"
kind = "sim"
[upstreams.sim]
slots = 4
ttft_ms = 20
tokens_per_s = 400
[[models]]
id = "{MODEL}"
priority = true
[models.admission]
min_concurrency = 1
initial_concurrency = 2
max_concurrency_limit = 4
queue_depth = 4
""")
    port, prom_port = free_port(), free_port()
    (tmp_path / "prometheus.yml").write_text(f"""
global:
  scrape_interval: 1s
  evaluation_interval: 1s
rule_files:
  - {ALERTS}
scrape_configs:
  - job_name: tierq
    static_configs:
      - targets: ["127.0.0.1:{port}"]
""")
    with _process([sys.executable, "-m", "tierq", "serve", "--config", str(cfg), "--port", str(port),
                   "--no-access-log", "--log-level", "warning"], tmp_path / "serve.log") as serve, \
         _process([prometheus, f"--config.file={tmp_path / 'prometheus.yml'}",
                   f"--storage.tsdb.path={tmp_path / 'data'}",
                   f"--web.listen-address=127.0.0.1:{prom_port}"], tmp_path / "prometheus.log") as prom:
        await _until_up(f"http://127.0.0.1:{port}/status.json", serve, tmp_path / "serve.log")
        await _until_up(f"http://127.0.0.1:{prom_port}/-/ready", prom, tmp_path / "prometheus.log")
        yield f"http://127.0.0.1:{port}/v1", f"http://127.0.0.1:{prom_port}"


async def _one(client: AsyncOpenAI, i: int) -> str:
    """A priority stream or a default answer; its outcome: served or a 429's code."""
    messages: list[Any] = [{"role": "user", "content": f"hello {i}"}]
    try:
        if i % 2:
            stream = await client.chat.completions.create(
                model=MODEL, messages=messages, max_tokens=4, stream=True, service_tier="priority")
            async for _ in stream:
                pass
        else:
            await client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4)
    except openai.RateLimitError as e:
        body = e.body if isinstance(e.body, dict) else {}
        return str(body.get("code"))
    return "served"


async def _query(s: aiohttp.ClientSession, prom: str, expr: str) -> list[Any]:
    async with s.get(prom + "/api/v1/query", params={"query": expr}) as r:
        body = await r.json()
        assert body["status"] == "success", (expr, body)
        result: list[Any] = body["data"]["result"]
        return result


def _finite(result: list[Any]) -> bool:
    return any(math.isfinite(float(series["value"][1])) for series in result)


@pytest.mark.timeout(150)
async def test_every_dashboard_query_has_data_from_a_real_scrape_of_tierq_under_load(
        scraped: tuple[str, str]) -> None:
    api, prom = scraped
    client = AsyncOpenAI(base_url=api, api_key="unused-on-loopback", max_retries=0)
    exprs = _dashboard_exprs()
    missing = exprs
    outcomes: set[str] = set()
    async with aiohttp.ClientSession() as s:
        # Bursts of 24 at once against 1-4 slots and a queue of 4: served
        # streams and answers in both tiers, and 429s. Until every panel's every
        # query answers with a number (Prometheus needs two scrapes for a rate).
        for burst in range(90):
            outcomes |= set(await asyncio.gather(*(_one(client, burst * 24 + i) for i in range(24))))
            missing = [(title, e) for title, e in exprs if not _finite(await _query(s, prom, e))]
            if not missing and burst >= 2:
                break
            await asyncio.sleep(0.5)
        assert "served" in outcomes and "server_overloaded" in outcomes, outcomes
        assert not missing, missing

        tiers = {series["metric"]["tier"] for series in await _query(
            s, prom, "sum by (tier) (rate(tierq_cost_usd_total[5m]))")}
        assert tiers == {"priority", "default"}, "both tiers billed"
        codes = {series["metric"]["code"] for series in await _query(
            s, prom, "sum by (code) (rate(tierq_shed_total[5m]))")}
        assert "server_overloaded" in codes

        # The alert rules, loaded by the same Prometheus, evaluate without error
        # on tierq's real series (none fires on this short run but may: health only).
        for _ in range(100):
            async with s.get(prom + "/api/v1/rules") as r:
                groups = (await r.json())["data"]["groups"]
            rules = [rule for g in groups for rule in g["rules"]]
            if rules and all(rule.get("lastEvaluation", "").startswith("20") for rule in rules):
                break
            await asyncio.sleep(0.2)
        assert [rule["name"] for rule in rules] == _alert_names()
        assert all(rule["health"] == "ok" for rule in rules), rules
        for rule in rules:  # each rule's query, as Prometheus parsed it, runs on the real series
            await _query(s, prom, rule["query"])
    await client.close()
