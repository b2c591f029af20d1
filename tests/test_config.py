"""Config loading, strict validation, and the catalog it resolves to."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import pytest

from tierq.catalog import builtin_prices, builtin_priority
from tierq.served import Catalog
from tierq.config import ConfigError, default_config, load_config

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "tierq.toml"


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "tierq.toml"
    p.write_text(text)
    return p


def error_of(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    message = str(info.value)
    assert "\n" not in message
    return message


def test_example_config_loads_with_every_section() -> None:
    cfg = load_config(EXAMPLE)
    assert [u.name for u in cfg.upstreams] == ["local", "deepinfra", "sim"]
    assert cfg.pricing.priority_multiplier == Decimal("1.5")
    assert cfg.pricing.flex_multiplier == Decimal("0.5")
    llama = cfg.models[0]
    assert llama.admission.written["max_concurrency"] == 8
    assert llama.admission.settings.max_wait_ms["priority"] == 60000
    assert llama.admission.written["rate"] == 100.0 and llama.admission.written["burst"] == 200
    assert cfg.keys.path == "tierq.db"
    catalog = Catalog.from_config(cfg)
    assert list(catalog) == [
        "meta-llama/Meta-Llama-3.1-8B-Instruct", "zai-org/GLM-5.2", "my-org/finetune-7b"
    ]
    assert catalog["meta-llama/Meta-Llama-3.1-8B-Instruct"].upstream_model == "llama-3.1-8b"
    assert catalog["my-org/finetune-7b"].prices.output_per_m == Decimal("0.10")


def test_default_config_serves_whole_builtin_catalog_on_in_process_sim() -> None:
    cfg = default_config()
    assert cfg.source is None
    assert cfg.ledger.url == "sqlite:///tierq.db"
    assert [(u.name, u.kind) for u in cfg.upstreams] == [("sim", "sim")]
    catalog = Catalog.from_config(cfg)
    assert len(catalog) == len(builtin_prices()) == 52
    assert {m.upstream for m in catalog.values()} == {"sim"}


def test_builtin_priority_covers_the_vllm_bulk_not_turbo_or_deepseek_671b() -> None:
    enabled = [m for m in builtin_prices() if builtin_priority(m)]
    assert len(enabled) == 37
    assert builtin_priority("meta-llama/Meta-Llama-3.1-8B-Instruct")
    assert builtin_priority("deepseek-ai/DeepSeek-R1-Distill-Llama-70B")
    assert not builtin_priority("meta-llama/Meta-Llama-3.1-8B-Instruct-Turbo")
    assert not builtin_priority("deepseek-ai/DeepSeek-V3.1")


def test_builtin_prices_match_the_seed_table() -> None:
    p = builtin_prices()["mistralai/Mistral-7B-Instruct-v0.3"]
    assert (p.input_per_m, p.output_per_m) == (Decimal("0.028"), Decimal("0.054"))


def test_config_model_overrides_builtin_price_and_flag(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, """
[[models]]
id = "meta-llama/Meta-Llama-3.1-8B-Instruct-Turbo"
priority = true
input_per_m = 0.5
"""))
    m = Catalog.from_config(cfg)["meta-llama/Meta-Llama-3.1-8B-Instruct-Turbo"]
    assert m.priority is True
    assert m.prices.input_per_m == Decimal("0.5")
    assert m.prices.output_per_m == Decimal("0.03")  # built-in
    assert m.upstream == "sim"  # the implied in-process sim


def test_single_max_wait_applies_to_every_lane(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, """
[[models]]
id = "zai-org/GLM-5.2"
[models.admission]
max_wait_ms = 500
"""))
    assert cfg.models[0].admission.settings.max_wait_ms == {"default": 500, "priority": 500, "flex": 500}


def test_priority_headroom_reaches_the_admission_and_defaults_to_none(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, """
[[models]]
id = "zai-org/GLM-5.2"
[models.admission]
max_concurrency = 64
priority_headroom = 2
[[models]]
id = "meta-llama/Meta-Llama-3.1-8B-Instruct"
"""))
    assert cfg.models[0].admission.settings.priority_headroom == 2
    assert cfg.models[1].admission.settings.priority_headroom == 0


def test_the_flex_priority_reserve_is_two_slots_on_a_priority_model_and_none_without_priority(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, """
[[models]]
id = "zai-org/GLM-5.2"
flex = true
[[models]]
id = "zai-org/GLM-5.2-b"
priority = false
flex = true
input_per_m = "1"
output_per_m = "2"
[[models]]
id = "zai-org/GLM-5.2-c"
priority = false
flex = true
input_per_m = "1"
output_per_m = "2"
[models.admission]
max_concurrency = 8
flex_priority_reserve = 3
"""))
    assert builtin_priority("zai-org/GLM-5.2")
    reserves = [m.admission.settings.flex_priority_reserve for m in cfg.models]
    # No priority to keep it for: 0, unless written.
    assert reserves == [2, 0, 3]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('[[models]]\nid = "zai-org/GLM-5.2"\n[models.admission]\nrate = "fast"\n',
         'tierq.toml: models[0].admission.rate: expected a number, got "fast"'),
        ('[server]\nprot = 80\n', "tierq.toml: server.prot: unknown key"),
        ('[server]\nport = "80"\n', 'tierq.toml: server.port: expected an integer, got "80"'),
        ('[server]\nport = 70000\n', "tierq.toml: server.port: must be between 0 and 65535, got 70000"),
        ('[server]\nmax_n = 0\n', "tierq.toml: server.max_n: must be between 1 and 1024, got 0"),
        ('[bogus]\nx = 1\n', "tierq.toml: bogus: unknown key"),
        ('[[upstreams]]\nname = "a"\nbase_url = "http://127.0.0.1:1/v1"\n'
         '[[models]]\nid = "zai-org/GLM-5.2"\nupstream = "b"\n',
         'tierq.toml: models[0].upstream: unknown upstream "b" (declared: a)'),
        ('[[upstreams]]\nname = "a"\nbase_url = "http://x/v1"\n'
         '[[upstreams]]\nname = "a"\nbase_url = "http://y/v1"\n',
         'tierq.toml: upstreams[1].name: duplicate upstream name "a" (also upstreams[0])'),
        ('[[models]]\nid = "zai-org/GLM-5.2"\n[[models]]\nid = "zai-org/GLM-5.2"\n',
         'tierq.toml: models[1].id: duplicate model id "zai-org/GLM-5.2" (also models[0])'),
        ('[[models]]\nid = "new/model"\noutput_per_m = "1"\n',
         "tierq.toml: models[0].input_per_m: required for a model not in the built-in catalog"),
        ('[[upstreams]]\nname = "a"\nbase_url = "ftp://x/v1"\n',
         'tierq.toml: upstreams[0].base_url: expected an http:// or https:// URL with a host, got "ftp://x/v1"'),
        ('[[upstreams]]\nname = "a"\nbase_url = "http://x/v1"\nkind = "tgi"\n',
         'tierq.toml: upstreams[0].kind: expected one of "openai", "vllm", "sglang", "trtllm", "sim", got "tgi"'),
        ('[[upstreams]]\nname = "a"\nbase_url = "http://u:p@x/v1"\n',
         "tierq.toml: upstreams[0].base_url: must not carry credentials (use api_key_env)"),
        ('[pricing]\npriority_multiplier = "abc"\n',
         'tierq.toml: pricing.priority_multiplier: not a decimal number: "abc"'),
        ('[pricing]\npriority_multiplier = true\n',
         'tierq.toml: pricing.priority_multiplier: expected a decimal string such as "1.5", got true'),
        ('[[models]]\nid = "new/model"\ninput_per_m = "0.0000000001"\noutput_per_m = "1"\n',
         "tierq.toml: models[0].input_per_m: 0.0000000001 x 1.5 USD per 1M tokens is not a whole "
         "number of femto-USD (1e-15) per token: use at most 9 decimals per 1M tokens"),
        ('[pricing]\npriority_multiplier = "1.0000000001"\n',
         "tierq.toml: pricing.priority_multiplier: zai-org/GLM-5.2: 1.4 x 1.0000000001 USD per 1M "
         "tokens is not a whole number of femto-USD (1e-15) per token: use at most 9 decimals per 1M tokens"),
        # Flex: its multiplier above 0 and at most 1, exact; its headroom a share.
        ('[pricing]\nflex_multiplier = "-0.5"\n',
         'tierq.toml: pricing.flex_multiplier: must be a finite amount >= 0, got "-0.5"'),
        ('[pricing]\nflex_multiplier = "half"\n',
         'tierq.toml: pricing.flex_multiplier: not a decimal number: "half"'),
        ('[pricing]\nflex_multiplier = "0"\n',
         'tierq.toml: pricing.flex_multiplier: must be above 0 and at most 1, got "0"'),
        ('[pricing]\nflex_multiplier = "1.5"\n',
         'tierq.toml: pricing.flex_multiplier: must be above 0 and at most 1, got "1.5"'),
        ('[pricing]\nflex_multiplier = "0.5000000001"\n',
         "tierq.toml: pricing.flex_multiplier: zai-org/GLM-5.2: 1.4 x 0.5000000001 USD per 1M "
         "tokens is not a whole number of femto-USD (1e-15) per token: use at most 9 decimals per 1M tokens"),
        ('[pricing]\nflex_multiplier = "0.3333333333"\n[[models]]\nid = "new/model"\nflex = true\n'
         'input_per_m = "0.1"\noutput_per_m = "1"\n',
         "tierq.toml: models[0].input_per_m: 0.1 x 0.3333333333 USD per 1M tokens is not a whole "
         "number of femto-USD (1e-15) per token: use at most 9 decimals per 1M tokens"),
        ('[[models]]\nid = "zai-org/GLM-5.2"\nflex = 1\n',
         'tierq.toml: models[0].flex: expected true or false, got 1'),
        ('[[models]]\nid = "zai-org/GLM-5.2"\n[models.admission]\nflex_headroom = 0.6\n',
         'tierq.toml: models[0].admission.flex_headroom: must be between 0 and 0.5 (a share of the limit), got 0.6'),
        ('[[models]]\nid = "zai-org/GLM-5.2"\n[models.admission]\nflex_headroom = -0.1\n',
         'tierq.toml: models[0].admission.flex_headroom: must be between 0 and 0.5 (a share of the limit), got -0.1'),
        ('[[models]]\nid = "zai-org/GLM-5.2"\n[models.admission]\nmax_wait_ms = { flex = -1 }\n',
         'tierq.toml: models[0].admission.max_wait_ms.flex: must be between 0 and 86400000 ms, got -1'),
        ('[[models]]\nid = "zai-org/GLM-5.2"\npriority = "yes"\n',
         'tierq.toml: models[0].priority: expected true or false, got "yes"'),
        ('[[models]]\nid = "zai-org/GLM-5.2"\n[models.admission]\nmax_wait_ms = { default = 1, lowest = 2 }\n',
         'tierq.toml: models[0].admission.max_wait_ms: unknown lane "lowest" (lanes are "default", "flex" and "priority")'),
        ('[[models]]\nid = "zai-org/GLM-5.2"\n[models.admission]\nburst = 5\n',
         "tierq.toml: models[0].admission.burst: needs rate (burst is the token bucket's size)"),
        ('[[models]]\nid = "zai-org/GLM-5.2"\n[models.admission]\nmax_concurrency = 4\npriority_headroom = 4\n',
         "tierq.toml: models[0].admission.priority_headroom: must be at least 0 and below max_concurrency (4): "
         "defaults need a slot, got 4"),
        ('[[models]]\nupstream = "sim"\n', "tierq.toml: models[0].id: required"),
        ('models = 3\n', "tierq.toml: models: expected an array of tables ([[models]]), got 3"),
        ('[ledger]\nurl = "mysql://x"\n',
         "tierq.toml: ledger.url: ledger url scheme 'mysql' is not supported; "
         "use sqlite:///relative.db, sqlite:////absolute/path.db or "
         "postgresql://user@host:port/database"),
        ('[ledger]\nurl = "postgresql://u:hunter2@db:5432"\n',
         "tierq.toml: ledger.url: postgresql url needs one database name as its path (.../database)"),
        ('[ledger]\nurl = "postgresql://db:5432/tierq"\n',
         "tierq.toml: ledger.url: postgresql url needs a user (postgresql://user@host:port/database)"),
        ('[ledger]\nurl = "postgresql://u:hunter2@db/tierq?options=x"\n',
         "tierq.toml: ledger.url: postgresql url parameter 'options' is not supported (only sslmode)"),
        ('[ledger]\nurl = "postgresql://u:hunter2@db/tierq"\npassword_env = "PGPW"\n',
         "tierq.toml: ledger.password_env: the url carries a password already; give one or the other"),
        ('[ledger]\npassword_env = "PGPW"\n',
         "tierq.toml: ledger.password_env: only for a postgresql:// url"),
        ('[ledger]\nspool = "s.db"\n',
         "tierq.toml: ledger.spool: only for a postgresql:// url (the spool holds its rows while "
         "PostgreSQL is unreachable)"),
        ('[keys]\npath = "k.db"\nurl = "postgresql://u@db/tierq"\n',
         "tierq.toml: keys.url: give path (a SQLite file) or url, not both"),
        ('[keys]\nurl = "redis://db/0"\n',
         "tierq.toml: keys.url: ledger url scheme 'redis' is not supported; use "
         "sqlite:///relative.db, sqlite:////absolute/path.db or postgresql://user@host:port/database"),
        ('[ledger]\ndurability = "normal"\n',
         'tierq.toml: ledger.durability: expected "process" or "power", got "normal"'),
    ],
)
def test_config_errors_are_one_line_naming_file_and_key(tmp_path: Path, text: str, expected: str) -> None:
    assert error_of(tmp_path, text).replace(str(tmp_path) + "/", "") == expected
    assert "hunter2" not in expected


def test_postgresql_ledger_and_keys_urls_are_accepted(tmp_path: Path) -> None:
    f = tmp_path / "tierq.toml"
    f.write_text('[ledger]\nurl = "postgresql://tierq@db.internal:5433/billing?sslmode=require"\n'
                 'password_env = "TIERQ_PG_PASSWORD"\nspool = "/var/lib/tierq/spool.db"\n'
                 '[keys]\nurl = "postgresql://tierq:pw@db.internal/billing"\nrefresh_s = 1.5\n')
    cfg = load_config(f)
    assert cfg.ledger.url == "postgresql://tierq@db.internal:5433/billing?sslmode=require"
    assert (cfg.ledger.password_env, cfg.ledger.spool) == ("TIERQ_PG_PASSWORD", "/var/lib/tierq/spool.db")
    assert (cfg.keys.path, cfg.keys.refresh_s) == ("postgresql://tierq:pw@db.internal/billing", 1.5)
    assert load_config(tmp_path / "tierq.toml").ledger.durability == "process"
    f.write_text('[ledger]\nurl = "postgres://tierq@db/billing"\n')
    assert load_config(f).ledger.spool == "tierq-spool.db", "spool defaults beside the working dir"


def test_toml_syntax_error_names_the_file(tmp_path: Path) -> None:
    message = error_of(tmp_path, "[server\n")
    assert message.startswith(str(tmp_path / "tierq.toml") + ": invalid TOML:")


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "nope.toml")


def test_prices_keep_toml_floats_exact(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, '[[models]]\nid = "x/y"\ninput_per_m = 0.1\noutput_per_m = 0.30\n'))
    assert cfg.models[0].input_per_m == Decimal("0.1")
    assert cfg.models[0].output_per_m == Decimal("0.30")


_BUCKET_MODEL = """
[[upstreams]]
name = "sim"
kind = "sim"
[[models]]
id = "meta-llama/Meta-Llama-3.1-8B-Instruct"
[models.admission]
"""


def test_bucket_the_core_refuses_is_a_config_error_not_a_startup_traceback(tmp_path: Path) -> None:
    # A burst whose refill time overflows the core's clock (found by the fuzzer).
    msg = error_of(tmp_path, _BUCKET_MODEL + "rate = 0.001\nburst = 1000000000\n")
    assert "models[0].admission.burst" in msg and "1e9 s" in msg and "\n" not in msg


def test_priority_reserve_of_one_is_a_config_error(tmp_path: Path) -> None:
    msg = error_of(tmp_path, _BUCKET_MODEL + "rate = 10.0\npriority_reserve = 1.0\n")
    assert "models[0].admission.priority_reserve" in msg and "below 1" in msg


def test_upstream_health_settings_default_to_the_stated_rule_and_are_read(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, """
[[upstreams]]
name = "a"
base_url = "http://127.0.0.1:9001/v1"
[[upstreams]]
name = "b"
base_url = "http://127.0.0.1:9002/v1"
[upstreams.health]
consecutive_failures = 3
base_ejection_s = 600
max_ejection_percent = 25
slow_start_s = 0
probe_interval_s = 0.5
"""))
    a, b = cfg.upstreams
    assert (a.health.consecutive_failures, a.health.base_ejection_s, a.health.max_ejection_s,
            a.health.max_ejection_percent, a.health.slow_start_s, a.health.probe_interval_s) == \
        (5, 30.0, 300.0, 50, 10.0, 1.0)
    # A base above the default cap raises the cap with it.
    assert (b.health.consecutive_failures, b.health.base_ejection_s, b.health.max_ejection_s,
            b.health.max_ejection_percent, b.health.slow_start_s, b.health.probe_interval_s) == \
        (3, 600.0, 600.0, 25, 0.0, 0.5)


@pytest.mark.parametrize(("text", "expected"), [
    ("consecutive_failures = 0",
     "upstreams[0].health.consecutive_failures: must be between 1 and 1000, got 0"),
    ("max_ejection_percent = 101",
     "upstreams[0].health.max_ejection_percent: must be between 0 and 100, got 101"),
    ("base_ejection_s = 60\nmax_ejection_s = 30",
     "upstreams[0].health.max_ejection_s: must be at least base_ejection_s (60.0), got 30.0"),
    ("probe_interval_s = 0",
     "upstreams[0].health.probe_interval_s: must be greater than 0 and at most 3600, got 0"),
    ("ejection = 1", "upstreams[0].health.ejection: unknown key"),
])
def test_upstream_health_errors_are_one_line_naming_the_key(tmp_path: Path, text: str, expected: str) -> None:
    message = error_of(tmp_path, '[[upstreams]]\nname = "a"\nbase_url = "http://127.0.0.1:1/v1"\n'
                                 f"[upstreams.health]\n{text}\n")
    assert message.replace(str(tmp_path) + "/", "") == f"tierq.toml: {expected}"
