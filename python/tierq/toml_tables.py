"""A TOML file read as tables whose every read names its key path, so a bad value
is one line, `file: key.path: problem` (ConfigError). Generic: it knows TOML's
types, not tierq's settings (tierq.config reads those through it).
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Mapping
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

__all__ = ["ConfigError", "Table", "read_toml", "show"]


class ConfigError(ValueError):
    """A bad configuration; str(e) is `file: key.path: problem` on one line."""

    def __init__(self, file: str, key: str, problem: str) -> None:
        self.file = file
        self.key = key
        self.problem = problem
        where = f"{file}: {key}: " if key else f"{file}: "
        super().__init__((where + problem).replace("\n", " "))


def read_toml(path: str | Path, text: str | None = None) -> Table:
    """The file's top table (`text`: its contents, already read); ConfigError
    if it cannot be read or is not TOML."""
    file = str(path)
    try:
        raw = Path(path).read_text("utf-8") if text is None else text
    except OSError as e:
        raise ConfigError(file, "", f"cannot read: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise ConfigError(file, "", "not UTF-8 text") from None
    try:
        # parse_float=Decimal keeps prices exactly as written.
        data = tomllib.loads(raw, parse_float=Decimal)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(file, "", f"invalid TOML: {e}") from None
    return Table(file, data, "")


def show(value: object) -> str:
    """How a bad value is quoted in an error: as it would read in TOML."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        escaped = value.replace("\\", "\\\\").replace('"', '\\"')
        text = f'"{escaped}"'
        return text if len(text) <= 60 else text[:57] + '..."'
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    return str(value)


class Table:
    """One TOML table being validated; every read names its key path."""

    def __init__(self, file: str, data: Mapping[str, Any], path: str) -> None:
        self.file = file
        self.data = data
        self.path = path
        self.used: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def fail(self, name: str, problem: str) -> ConfigError:
        return ConfigError(self.file, self.key(name), problem)

    def get(self, name: str) -> Any:
        self.used.add(name)
        return self.data.get(name)

    def has(self, name: str) -> bool:
        return name in self.data

    def done(self) -> None:
        for name in self.data:
            if name not in self.used:
                raise self.fail(name, "unknown key")

    def string(self, name: str, default: str | None = None, *, required: bool = False) -> str | None:
        v = self.get(name)
        if v is None:
            if required:
                raise self.fail(name, "required")
            return default
        if not isinstance(v, str):
            raise self.fail(name, f"expected a string, got {show(v)}")
        if not v:
            raise self.fail(name, "must not be empty")
        return v

    def boolean(self, name: str, default: bool | None) -> bool | None:
        v = self.get(name)
        if v is None:
            return default
        if not isinstance(v, bool):
            raise self.fail(name, f"expected true or false, got {show(v)}")
        return v

    def integer(self, name: str, default: int | None, lo: int | None = None, hi: int | None = None) -> int | None:
        """An integer; checked against [lo, hi] when given (admission keys are
        range-checked by the core instead, in one place)."""
        v = self.get(name)
        if v is None:
            return default
        if isinstance(v, bool) or not isinstance(v, int):
            raise self.fail(name, f"expected an integer, got {show(v)}")
        if lo is not None and hi is not None and not lo <= v <= hi:
            raise self.fail(name, f"must be between {lo} and {hi}, got {v}")
        return v

    def number(
        self, name: str, default: float | None, lo: float | None = None, hi: float | None = None,
        *, lo_open: bool = False
    ) -> float | None:
        v = self.get(name)
        if v is None:
            return default
        if isinstance(v, bool) or not isinstance(v, (int, Decimal)):
            raise self.fail(name, f"expected a number, got {show(v)}")
        f = float(v)
        if lo is None or hi is None:
            return f
        if not math.isfinite(f) or f < lo or f > hi or (lo_open and f == lo):
            bound = f"greater than {lo:g}" if lo_open else f"at least {lo:g}"
            raise self.fail(name, f"must be {bound} and at most {hi:g}, got {v}")
        return f

    def amount(self, name: str) -> Decimal | None:
        """A price or multiplier: a string ("1.5") or a number, kept exact."""
        v = self.get(name)
        if v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, (str, int, Decimal)):
            raise self.fail(name, f'expected a decimal string such as "1.5", got {show(v)}')
        try:
            d = Decimal(v) if not isinstance(v, str) else Decimal(v.strip())
        except InvalidOperation:
            raise self.fail(name, f"not a decimal number: {show(v)}") from None
        if not d.is_finite() or d < 0:
            raise self.fail(name, f"must be a finite amount >= 0, got {show(v)}")
        return d

    def table(self, name: str) -> Table:
        v = self.get(name)
        if v is None:
            v = {}
        if not isinstance(v, dict):
            raise self.fail(name, f"expected a table, got {show(v)}")
        return Table(self.file, v, self.key(name))

    def array_of_tables(self, name: str) -> list[Table]:
        v = self.get(name)
        if v is None:
            return []
        if not isinstance(v, list):
            raise self.fail(name, f"expected an array of tables ([[{name}]]), got {show(v)}")
        out = []
        for i, item in enumerate(v):
            where = f"{self.key(name)}[{i}]"
            if not isinstance(item, dict):
                raise ConfigError(self.file, where, f"expected a table, got {show(item)}")
            out.append(Table(self.file, item, where))
        return out
