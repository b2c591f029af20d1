"""The admission settings are declared once, in the core (`PoolSettings.FIELDS`,
core/settings.rs). The stub, docs/configuration.md and examples/tierq.toml are
read here and checked against that declaration, so a setting added in the core
and forgotten in one of them (or the other way round) fails CI."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from tierq import PoolSettings, SettingsError
from tierq._core import SettingField
from tierq.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]
FIELDS = PoolSettings.FIELDS
TOML_KEYS = [f.name for f in FIELDS if f.toml]

# How each kind is typed as a keyword of PoolSettings in the stub.
STUB_TYPE = {
    "int": "int | None",
    "number": "float | None",
    "int_or_auto": "int | Literal['auto'] | None",
    "lane_ms": "float | Mapping[str, float] | None",
    "choice": "str | None",
    "bool": "bool | None",
}
# A value of the wrong type for each kind, as a TOML value.
WRONG_TYPE = {"int": '"2"', "number": '"fast"', "int_or_auto": '"many"', "lane_ms": '"soon"', "choice": '"fast"', "bool": '"no"'}


def test_the_core_declares_each_setting_once_with_its_kind_default_range_and_doc() -> None:
    names = [f.name for f in FIELDS]
    assert len(names) == len(set(names)) and len(names) >= 12
    for f in FIELDS:
        assert f.kind in STUB_TYPE, f.name
        assert f.default and f.range and f.doc, f.name
        PoolSettings(**{f.name: None})  # type: ignore[misc]  # None: the default


def test_an_unknown_keyword_is_a_type_error_as_for_any_python_call() -> None:
    with pytest.raises(TypeError, match="unexpected keyword argument 'max_concurency'"):
        PoolSettings(max_concurency=4)  # type: ignore[call-arg]


def test_the_stub_types_every_declared_setting_in_order() -> None:
    stub = ast.parse((ROOT / "python" / "tierq" / "_core.pyi").read_text())
    kwargs = next(n for n in stub.body if isinstance(n, ast.ClassDef) and n.name == "_SettingsKwargs")
    typed = [(s.target.id, ast.unparse(s.annotation)) for s in kwargs.body
             if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name)]
    assert typed == [(f.name, STUB_TYPE[f.kind]) for f in FIELDS]


def _docs_rows() -> list[list[str]]:
    text = (ROOT / "docs" / "configuration.md").read_text()
    section = text.split("### `[models.admission]`", 1)[1].split("\n#", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    return [[cell.strip() for cell in row.strip("|").split(" | ")] for row in rows]


def test_the_docs_list_every_key_with_the_cores_default_and_range() -> None:
    rows = _docs_rows()
    assert [row[0] for row in rows] == [f"`{k}`" for k in TOML_KEYS]
    for (_, default, allowed, meaning), f in zip(rows, (f for f in FIELDS if f.toml)):
        assert f.default in default, f"{f.name}: docs say {default!r}, the core {f.default!r}"
        assert allowed == f.range, f"{f.name}: docs say {allowed!r}, the core {f.range!r}"
        assert meaning


def test_the_example_config_shows_every_key_of_models_admission() -> None:
    text = (ROOT / "examples" / "tierq.toml").read_text()
    section = text.split("[models.admission]\n", 1)[1].split("\n[", 1)[0]
    shown = re.findall(r"^#? ?(\w+) = ", section, flags=re.M)
    assert shown == TOML_KEYS


@pytest.mark.parametrize("f", [f for f in FIELDS if f.toml], ids=lambda f: f.name)
def test_config_passes_each_key_through_and_the_cores_type_check_names_it(tmp_path: Path, f: SettingField) -> None:
    name, kind = f.name, f.kind
    p = tmp_path / "tierq.toml"
    p.write_text(f'[[models]]\nid = "zai-org/GLM-5.2"\n[models.admission]\n{name} = {WRONG_TYPE[kind]}\n')
    with pytest.raises(ConfigError) as info:
        load_config(p)
    with pytest.raises(SettingsError) as core:
        PoolSettings(**{name: WRONG_TYPE[kind].strip('"')})  # type: ignore[misc]
    assert str(info.value) == f"{p}: models[0].admission.{name}: {core.value.reason}"
    assert "expected" in core.value.reason and "\n" not in str(info.value)


def test_a_key_the_core_derives_is_not_a_toml_key(tmp_path: Path) -> None:
    derived = [f.name for f in FIELDS if not f.toml]
    assert derived == ["engine_interval_ms"]
    p = tmp_path / "tierq.toml"
    p.write_text('[[models]]\nid = "zai-org/GLM-5.2"\n[models.admission]\nengine_interval_ms = 50\n')
    with pytest.raises(ConfigError, match=r"models\[0\]\.admission\.engine_interval_ms: unknown key"):
        load_config(p)
