"""Validate and dedupe the records of a page before any write.

Validation checks each value against its column (type, required, length, NUL bytes, NaN/Infinity,
timestamps) and normalises it to what both sinks accept: timestamps become UTC ISO-8601 strings,
JSON columns become compact JSON text. A record that fails becomes a Rejected naming the field and
the rule; the rest of the page goes on. Dedupe keeps one record per key according to the stream's
conflict policy and sorts by key, so concurrent writers take row locks in the same order: two
PostgreSQL workers writing overlapping keys in different orders would deadlock.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson

from sluice.shared.streams import Column, Stream

Row = list[Any]
MAX_SAFE_INT = 2**53  # D1 passes numbers through JavaScript doubles
MAX_KEY_TEXT = 500  # record_key as text; longer keys become a digest
MAX_DECIMAL_TEXT = 100  # characters of a decimal number
# A decimal number as JSON and SQL write it: digits, an optional fraction and exponent.
DECIMAL = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")
# A fraction of a second finer than microseconds that is not all zeros: PostgreSQL keeps
# microseconds, so such a time cannot reach every sink as it was.
SUB_MICROSECOND = re.compile(r"[.,]\d{6}0*[1-9]")
# A JSON \u0000 escape (a NUL character): the backslash that starts it is not itself escaped.
JSON_NUL_ESCAPE = re.compile(r"(?<!\\)(?:\\\\)*\\u0000")
# Rows a page is split into when its values are not all plain: small enough that a bad record
# sends few good ones value by value, large enough that the column passes still pay off.
CHUNK_ROWS = 50


class InvalidValue(ValueError):
    """A value broke a column rule; the message names the rule."""


@dataclass(frozen=True)
class Rejected:
    """A record that cannot be written, and why. `index`: its place in the page's rows (None for
    a record the sink refused, which the consumer finds by its source order)."""

    row: Sequence[Any]
    field: str | None
    rule: str
    error_class: str = "ValidationError"
    index: int | None = None


def record_key(stream: Stream, row: Sequence[Any]) -> str:
    """The key as text for dead letters; a digest of the payload when the key itself is unusable."""
    try:
        parts = [row[i] for i in stream.key_indexes]
    except (IndexError, TypeError):
        parts = []
    if parts and all(
        (isinstance(p, str) and p and "\x00" not in p)
        or (isinstance(p, int) and not isinstance(p, bool))
        for p in parts
    ):
        text = "|".join(str(p) for p in parts)
        # Dead letters are unique on it in PostgreSQL: no NUL, and short enough for a btree entry.
        if len(text) <= MAX_KEY_TEXT:
            return text
    try:
        data = orjson.dumps(list(row), default=repr)
    except TypeError:  # text orjson cannot write (an unpaired surrogate)
        data = repr(list(row)).encode("utf-8", "backslashreplace")
    return f"sha1:{hashlib.sha1(data).hexdigest()}"


def _text(col: Column) -> Callable[[Any], Any]:
    limit = col.limit

    def check(v: Any) -> Any:
        if isinstance(v, str):
            if "\x00" in v:
                raise InvalidValue("contains a NUL byte (PostgreSQL rejects it)")
            if len(v) > limit:
                raise InvalidValue(f"longer than {limit} characters ({len(v)})")
            if not v and col.required:
                raise InvalidValue("is empty but required")
            return v
        if isinstance(v, int) and not isinstance(v, bool):
            return str(v)  # numeric ids from JSON APIs are still ids
        raise InvalidValue(f"expected text, got {type(v).__name__}")

    return check


def _int(col: Column) -> Callable[[Any], Any]:
    def check(v: Any) -> Any:
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise InvalidValue(f"expected an integer, got {type(v).__name__}")
        if isinstance(v, float):
            if not v.is_integer():
                raise InvalidValue(f"expected an integer, got {v!r}")
            v = int(v)
        if abs(v) > MAX_SAFE_INT:
            raise InvalidValue(f"integer {v} is outside ±2^53 (D1 would lose precision)")
        return v

    return check


def _float(col: Column) -> Callable[[Any], Any]:
    def check(v: Any) -> Any:
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise InvalidValue(f"expected a number, got {type(v).__name__}")
        f = float(v)
        if not math.isfinite(f):
            raise InvalidValue(f"{f!r} is not a finite number")
        return f

    return check


def _decimal(col: Column) -> Callable[[Any], Any]:
    """A decimal number kept as the source wrote it: PostgreSQL stores it exactly (NUMERIC), SQLite
    and D1 as a double. Numbers beyond a double's range are refused: SQLite would store them as
    infinity."""

    def check(v: Any) -> Any:
        if isinstance(v, str):
            if len(v) > MAX_DECIMAL_TEXT or not DECIMAL.fullmatch(v):
                raise InvalidValue(f"{v[:40]!r} is not a decimal number")
            if not math.isfinite(float(v)):
                raise InvalidValue(f"{v[:40]!r} is beyond the range SQLite and D1 can store")
            return v
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise InvalidValue(f"expected a decimal number, got {type(v).__name__}")
        if isinstance(v, float) and not math.isfinite(v):
            raise InvalidValue(f"{v!r} is not a finite number")
        if isinstance(v, int) and abs(v) > MAX_SAFE_INT:
            return str(v)  # exact in PostgreSQL; SQLite rounds it like any double
        return v

    return check


def _timestamp(col: Column) -> Callable[[Any], Any]:
    def check(v: Any) -> Any:
        if isinstance(v, str):
            if len(v) > 64 or "\x00" in v:
                raise InvalidValue("is not an ISO-8601 timestamp")
            if SUB_MICROSECOND.search(v):
                raise InvalidValue(
                    f"{v[:40]!r} is finer than a microsecond (PostgreSQL keeps microseconds)"
                )
            try:
                dt = datetime.fromisoformat(v)
            except ValueError:
                raise InvalidValue(f"{v[:40]!r} is not an ISO-8601 timestamp") from None
        elif isinstance(v, int | float) and not isinstance(v, bool):
            if not math.isfinite(v):
                raise InvalidValue(f"{v!r} is not a valid epoch time")
            seconds = v / 1000 if abs(v) >= 1e11 else v  # epoch milliseconds vs seconds
            try:
                dt = datetime.fromtimestamp(seconds, UTC)
            except (OverflowError, OSError, ValueError):
                raise InvalidValue(f"{v!r} is out of range for a timestamp") from None
        else:
            raise InvalidValue(f"expected a timestamp, got {type(v).__name__}")
        # Naive times are UTC by convention (ACE IoT, D1 datetime('now')).
        try:
            dt = dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt.astimezone(UTC)
        except OverflowError:  # e.g. 0001-01-01T00:00:00+01:00 is before year 1 in UTC
            raise InvalidValue(f"{str(v)[:40]!r} is out of range for a timestamp") from None
        return dt.isoformat()

    return check


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _has_surrogate(value: Any) -> bool:
    if isinstance(value, str):
        return any("\ud800" <= ch <= "\udfff" for ch in value)
    if isinstance(value, dict):
        return any(_has_surrogate(k) or _has_surrogate(v) for k, v in value.items())
    if isinstance(value, list):
        return any(map(_has_surrogate, value))
    return False


def _string_keys(value: Any) -> bool:
    if isinstance(value, dict):
        return all(isinstance(k, str) and _string_keys(v) for k, v in value.items())
    if isinstance(value, list):
        return all(map(_string_keys, value))
    return True


def check_json_text(text: str) -> None:
    """Raise InvalidValue unless `text` is JSON that every sink stores as it is (PostgreSQL's
    jsonb refuses a NUL character and an unpaired surrogate escape, and keeps numbers beyond a
    double, such as 1e400, exactly)."""
    if "\x00" in text or ("\\u0000" in text and JSON_NUL_ESCAPE.search(text)):
        raise InvalidValue("contains a NUL character (PostgreSQL jsonb rejects it)")
    try:
        orjson.loads(text)
        return
    except orjson.JSONDecodeError:
        pass  # orjson also refuses valid JSON: numbers beyond a double, lone surrogates
    try:
        parsed = json.loads(text, parse_constant=_reject_constant)
    except ValueError as exc:
        raise InvalidValue(f"is not valid JSON: {exc}") from None
    if _has_surrogate(parsed):
        raise InvalidValue("contains an unpaired surrogate escape (PostgreSQL jsonb rejects it)")


def _json(col: Column) -> Callable[[Any], Any]:
    limit = col.limit

    def check(v: Any) -> Any:
        if isinstance(v, str):
            if len(v) > limit:
                raise InvalidValue(f"JSON longer than {limit} characters ({len(v)})")
            text = v
        elif isinstance(v, dict | list):
            try:
                text = orjson.dumps(v).decode()
            except TypeError as exc:
                # Integers beyond 64 bits, which orjson cannot write, are still JSON; keys
                # that are not strings are not (json.dumps would turn them into strings).
                if not _string_keys(v):
                    raise InvalidValue(f"cannot be encoded as JSON: {exc}") from None
                try:
                    text = json.dumps(v, allow_nan=False, ensure_ascii=False)
                except (TypeError, ValueError) as exc2:
                    raise InvalidValue(f"cannot be encoded as JSON: {exc2}") from None
            if len(text) > limit:
                raise InvalidValue(f"JSON longer than {limit} characters ({len(text)})")
        else:
            raise InvalidValue(f"expected JSON text or an object, got {type(v).__name__}")
        check_json_text(text)
        return text

    return check


_CHECKERS: dict[str, Callable[[Column], Callable[[Any], Any]]] = {
    "text": _text,
    "int": _int,
    "float": _float,
    "decimal": _decimal,
    "timestamp": _timestamp,
    "json": _json,
}


class Validator:
    """Compiled per stream once; `validate` runs per page."""

    def __init__(self, stream: Stream) -> None:
        self.stream = stream
        self._checks = [(c, _CHECKERS[c.type](c)) for c in stream.columns]

    def validate(
        self,
        columns: Sequence[str],
        rows: Sequence[Any],
        orders: Sequence[int | None] | None = None,
    ) -> tuple[list[Row], list[Rejected]]:
        """The page's valid rows (normalised, in the stream's column order) and its rejected
        ones (each with its index in `rows`). With `orders` (one per row), each valid row ends
        with its source order, which the sinks store beside the columns."""
        if tuple(columns) != self.stream.column_names:
            return self._each(columns, rows, orders)
        fast = self._all_plain(rows, orders)
        if fast is not None:
            return fast, []
        # Some value needs a closer look: only the chunks that hold one go value by value, so a
        # page with one bad record costs little more than a clean one.
        good: list[Row] = []
        bad: list[Rejected] = []
        for start in range(0, len(rows), CHUNK_ROWS):
            part = rows[start : start + CHUNK_ROWS]
            part_orders = None if orders is None else orders[start : start + CHUNK_ROWS]
            plain = self._all_plain(part, part_orders)
            if plain is not None:
                good += plain
                continue
            ok, rejected = self._each(columns, part, part_orders, offset=start)
            good += ok
            bad += rejected
        return good, bad

    def _all_plain(
        self, rows: Sequence[Any], orders: Sequence[int | None] | None = None
    ) -> list[Row] | None:
        """The whole page column by column, with C-level passes (map, join, set), when every
        value is plain; None as soon as one is not, and `_each` then redoes the page value by
        value, naming each rejected record. Same output as `_each` on pages it accepts, and much
        cheaper: a per-value loop in Python is most of what validation costs."""
        if not rows:
            return []
        width = len(self._checks)
        try:
            if not set(map(type, rows)) <= {list, tuple} or set(map(len, rows)) != {width}:
                return None
            columns = list(zip(*rows, strict=True))
            out = [
                _plain_column(col, check, values)
                for (col, check), values in zip(self._checks, columns, strict=True)
            ]
        except (InvalidValue, ValueError, TypeError, OverflowError, orjson.JSONDecodeError):
            return None
        if any(o is None for o in out):
            return None
        if orders is not None:
            out.append(orders)
        return list(map(list, zip(*out, strict=True)))

    def _each(
        self,
        columns: Sequence[str],
        rows: Sequence[Any],
        orders: Sequence[int | None] | None = None,
        offset: int = 0,
    ) -> tuple[list[Row], list[Rejected]]:
        """Value by value; a rejection's index is its row's place in `rows` plus `offset`."""
        order = self._order(columns)
        width = len(columns)
        good: list[Row] = []
        bad: list[Rejected] = []
        checks = self._checks
        for index, raw in enumerate(rows):
            if not isinstance(raw, list | tuple) or len(raw) != width:
                bad.append(
                    Rejected(
                        raw if isinstance(raw, list | tuple) else [raw],
                        None,
                        f"record must be a list of {width} values",
                        index=offset + index,
                    )
                )
                continue
            row = raw if order is None else [None if i < 0 else raw[i] for i in order]
            out: Row = []
            for (col, check), value in zip(checks, row, strict=True):
                if value is None:
                    if col.required:
                        bad.append(Rejected(row, col.name, "is required", index=offset + index))
                        break
                    out.append(None)
                    continue
                try:
                    out.append(check(value))
                except InvalidValue as exc:
                    bad.append(Rejected(row, col.name, str(exc), index=offset + index))
                    break
            else:
                if orders is not None:
                    out.append(orders[index])
                good.append(out)
        return good, bad

    def check_key(self, key: Sequence[Any]) -> tuple[list[Any], str | None, str | None]:
        """A key (the stream's key columns, in order) normalised as its columns are, or the
        column and rule it breaks: (values, None, None) or ([], column, rule)."""
        out = []
        for name, value in zip(self.stream.key, key, strict=True):
            _, check = self._checks[self.stream.column_names.index(name)]
            if value is None:
                return [], name, "is required"
            try:
                out.append(check(value))
            except InvalidValue as exc:
                return [], name, str(exc)
        return out, None, None

    def _order(self, columns: Sequence[str]) -> list[int] | None:
        """None when the page's columns are the stream's; else where to find each stream column."""
        names = self.stream.column_names
        if tuple(columns) == names:
            return None
        index = {c: i for i, c in enumerate(columns)}
        return [index.get(n, -1) for n in names]


def _plain_column(
    col: Column, check: Callable[[Any], Any], values: Sequence[Any]
) -> Sequence[Any] | None:
    """One column of a page checked and normalised as `Validator._each` would, or None (or an
    exception) when some value needs a closer look. Specialised for the common shapes: a text,
    JSON or timestamp column of strings and a float column of floats, with no NULL."""
    types = set(map(type, values))
    if type(None) in types:
        if col.required:
            return None
        return [None if v is None else check(v) for v in values]
    if col.type in ("text", "json", "timestamp", "decimal") and types == {str}:
        joined = "".join(values)
        if "\x00" in joined:
            return None
        longest = max(map(len, values))
        if col.type == "text":
            if longest > col.limit or (col.required and "" in values):
                return None
            return values
        if col.type == "json":
            if longest > col.limit or "\\u0000" in joined:
                return None
            for _ in map(orjson.loads, values):  # raises on the first invalid document
                pass
            return values
        if col.type == "decimal":
            return values if all(map(check, values)) else None
        if longest > 64 or SUB_MICROSECOND.search(joined):
            return None
        parsed = list(map(datetime.fromisoformat, values))
        zones = set(d.tzinfo for d in parsed)
        if None in zones:
            return None
        if zones == {UTC}:  # already UTC (fromisoformat gives this object for Z and +00:00)
            return list(map(datetime.isoformat, parsed))
        return [d.astimezone(UTC).isoformat() for d in parsed]
    if col.type == "float" and types == {float}:
        return values if all(map(math.isfinite, values)) else None
    return [check(v) for v in values]


def dedupe(stream: Stream, rows: list[Row]) -> list[Row]:
    """One row per key (policy decides which), sorted by key."""
    idx = stream.key_indexes
    seen: dict[Any, Row] = {}
    if len(idx) == 1:
        k0 = idx[0]

        def key_of(r: Row) -> Any:
            return r[k0]
    else:

        def key_of(r: Row) -> Any:
            return tuple(r[i] for i in idx)

    if stream.conflict == "ignore":
        for r in rows:
            seen.setdefault(key_of(r), r)
    elif stream.conflict == "update":
        for r in rows:
            seen[key_of(r)] = r
    else:
        assert stream.version_column is not None
        v = stream.column_names.index(stream.version_column)
        for r in rows:
            k = key_of(r)
            old = seen.get(k)
            if old is None or (r[v] is not None and (old[v] is None or r[v] > old[v])):
                seen[k] = r
    return [seen[k] for k in sorted(seen)]
