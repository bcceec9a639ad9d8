"""Typed, strict reading of operator-written TOML.

Every accessor knows the file and the dotted key it reads, so a mistake is reported
as `policies/city-bank.toml: grants[0].min_group_size: must be an integer >= 2, got 'ten'`.
Unknown keys are errors too: a misspelt key silently ignored could widen access.
"""

from __future__ import annotations

import difflib
import math
import re
import tomllib
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import EllipsisType
from typing import Any, Literal, TypeVar, overload

from dataops.errors import LoadError


def read_toml(path: Path, error: type[LoadError]) -> Table:
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except tomllib.TOMLDecodeError as exc:
        raise error(f"{path}: not valid TOML: {exc}") from None
    except OSError as exc:
        raise error(f"{path}: cannot be read: {exc.strerror}") from None
    return Table(data, path, "", error)


# `default=...` (Ellipsis) means "required": None is a real default ("absent means unset").
_D = TypeVar("_D")


class Table:
    """One TOML table, read key by key: each accessor checks the value's type and says where it was."""

    def __init__(self, data: dict[str, Any], path: Path, prefix: str, error: type[LoadError]):
        self.data = data
        self.path = path
        self.prefix = prefix
        self.error = error
        self._read: set[str] = set()

    def key(self, key: str) -> str:
        return f"{self.prefix}{key}"

    def fail(self, key: str, message: str) -> LoadError:
        where = self.key(key) if key else (self.prefix.rstrip(".") or "(top level)")
        return self.error(f"{self.path}: {where}: {message}")

    def has(self, key: str) -> bool:
        return key in self.data

    def raw(self, key: str, default: Any = ...) -> Any:
        """The value as TOML gave it (any type), or `default`; the caller checks it."""
        self._read.add(key)
        if key not in self.data:
            if default is not ...:
                return default
            # A misspelt key is the mistake to report, not the missing one it was meant to be.
            for near in difflib.get_close_matches(
                key, [k for k in self.data if k not in self._read], 1, 0.75
            ):
                raise self.fail(near, f"unknown key, did you mean {key!r}?")
            raise self.fail(key, "is required")
        return self.data[key]

    @overload
    def string(self, key: str, *, pattern: re.Pattern[str] | None = None) -> str: ...
    @overload
    def string(self, key: str, default: _D, *, pattern: re.Pattern[str] | None = None) -> str | _D: ...
    def string(self, key: str, default: Any = ..., *, pattern: re.Pattern[str] | None = None) -> Any:
        """A non-empty string (matching `pattern`, if given)."""
        value = self.raw(key, default)
        if value is default and default is not ...:
            return value
        if not isinstance(value, str) or not value.strip():
            raise self.fail(key, f"must be a non-empty string, got {value!r}")
        if pattern is not None and not pattern.fullmatch(value):
            raise self.fail(key, f"{value!r} must match {pattern.pattern}")
        return value

    @overload
    def integer(self, key: str, *, minimum: int | None = None, maximum: int | None = None) -> int: ...
    @overload
    def integer(
        self, key: str, default: _D, *, minimum: int | None = None, maximum: int | None = None
    ) -> int | _D: ...
    def integer(
        self, key: str, default: Any = ..., *, minimum: int | None = None, maximum: int | None = None
    ) -> Any:
        """An integer (never a bool), at least `minimum` and at most `maximum` if given."""
        value = self.raw(key, default)
        if value is default and default is not ...:
            return value
        if (
            isinstance(value, bool)
            or not isinstance(value, int)
            or (minimum is not None and value < minimum)
            or (maximum is not None and value > maximum)
        ):
            if minimum is not None and maximum is not None:
                span = f" from {minimum} to {maximum}"
            elif minimum is not None:
                span = f" >= {minimum}"
            else:
                span = f" <= {maximum}" if maximum is not None else ""
            raise self.fail(key, f"must be an integer{span}, got {value!r}")
        return value

    @overload
    def number(self, key: str, *, minimum: float | None = None) -> float: ...
    @overload
    def number(self, key: str, default: _D, *, minimum: float | None = None) -> float | _D: ...
    def number(self, key: str, default: Any = ..., *, minimum: float | None = None) -> Any:
        """A finite number (an integer is taken as a float), at least `minimum` if given."""
        value = self.raw(key, default)
        if value is default and default is not ...:
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise self.fail(key, f"must be a finite number, got {value!r}")
        if minimum is not None and value < minimum:
            raise self.fail(key, f"must be >= {minimum}, got {value!r}")
        return float(value)

    def boolean(self, key: str, default: bool | EllipsisType = ...) -> bool:
        """true or false (a default, if given, is a bool too)."""
        value = self.raw(key, default)
        if not isinstance(value, bool):
            raise self.fail(key, f"must be true or false, got {value!r}")
        return value

    @overload
    def array(self, key: str) -> list[Any]: ...
    @overload
    def array(self, key: str, default: _D) -> list[Any] | _D: ...
    def array(self, key: str, default: Any = ...) -> Any:
        """A TOML array; its items are the caller's to check (each with its own message)."""
        value = self.raw(key, default)
        if value is default and default is not ...:
            return value
        if not isinstance(value, list):
            raise self.fail(key, f"must be a list, got {value!r}")
        return value

    @overload
    def table(self, key: str, *, required: Literal[True] = True) -> Table: ...
    @overload
    def table(self, key: str, *, required: bool) -> Table | None: ...
    def table(self, key: str, *, required: bool = True) -> Table | None:
        """A sub-table; when not `required`, None if absent."""
        value = self.raw(key, None if not required else ...)
        if value is None:
            return None
        if not isinstance(value, dict):
            raise self.fail(key, f"must be a table, got {value!r}")
        return Table(value, self.path, f"{self.key(key)}.", self.error)

    def tables(self, key: str) -> Iterator[Table]:
        """An array of tables, e.g. [[grants]]."""
        value = self.raw(key, [])
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            raise self.fail(key, "must be an array of tables ([[" + key + "]])")
        for i, item in enumerate(value):
            yield Table(item, self.path, f"{self.key(key)}[{i}].", self.error)

    def items(self) -> Iterator[tuple[str, Any]]:
        self._read.update(self.data)
        return iter(self.data.items())

    def reject_unknown(self, expected: Sequence[str] = ()) -> None:
        """Call after reading: any key not read is a typo or an unsupported setting.

        `expected`, if given, is listed after each unknown key (every key the table takes).
        """
        unknown = sorted(set(self.data) - self._read)
        if unknown:
            # Every unknown key of this table at once, each with the nearest known key.
            raise self.error(
                "\n".join(
                    f"{self.path}: {self.key(k)}: {unknown_key(k, self._read, expected)}" for k in unknown
                )
            )


def unknown_key(key: str, known: set[str] | list[str], expected: Sequence[str] = ()) -> str:
    """'unknown key, did you mean ...?' or 'unknown key (misspelt, or not supported here)';
    with `expected`, every key the table takes follows."""
    near = difflib.get_close_matches(key, sorted(known), 1, 0.6)
    listed = f" Expected one of: {', '.join(expected)}." if expected else ""
    if near:
        return f"unknown key, did you mean {near[0]!r}?{listed}"
    if expected:
        return f"unknown key.{listed}"
    return "unknown key (misspelt, or not supported here)"
