"""KV keys → table rows (the Telegram bot's data model), one named mapper per stream.

A configured pattern such as `watchlist:{chatId}` picks the keys a mapper gets; `{chatId}` is
passed to it. A mapper turns one parsed JSON value into rows (dicts of the stream's columns) and
reports what it cannot map (`problems`: one dead letter each, naming the key) without stopping
the rest. Values are checked against the columns later, by the consumer's validation, like any
other record: the mappers only pick fields and fill what the bot's repositories would
(subscription_status = 1, times in epoch milliseconds).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

Row = dict[str, Any]


@dataclass
class KvEntry:
    key: str
    value: Any  # parsed JSON
    expiration: int | None = None  # epoch seconds (KV's unit)
    metadata: Any = None


@dataclass
class Mapped:
    rows: list[Row] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # each becomes a dead letter for the key


@dataclass(frozen=True)
class MapContext:
    now_ms: int  # one value per run: rows without a time of their own get it
    cache_ttl_ms: int


Mapper = Callable[[KvEntry, dict[str, str], MapContext], Mapped]


class MappingError(ValueError):
    """The value as a whole cannot be mapped (wrong JSON type); the message says why."""


def compile_pattern(pattern: str) -> tuple[re.Pattern[str], str]:
    """The pattern as an anchored regex (`{name}` → a named group of 1+ characters) and the
    literal prefix before the first placeholder, which is what KV can list by."""
    parts = re.split(r"\{(\w+)\}", pattern)
    regex = "".join(
        re.escape(part) if i % 2 == 0 else f"(?P<{part}>.+)" for i, part in enumerate(parts)
    )
    return re.compile(regex + r"\Z", re.S), parts[0]


def _ms(value: Any) -> int | None:
    """Epoch milliseconds from a number in seconds or milliseconds; None if not a number."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return int(value * 1000) if abs(value) < 1e11 else int(value)


def _chat_id(value: Any) -> str | None:
    # Chat ids come as strings or as numbers (Telegram ids are integers); both mean the same.
    if isinstance(value, str) and value:
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return None


def _expect(value: Any, kind: type, what: str) -> None:
    if not isinstance(value, kind):
        raise MappingError(f"expected {what}, got {type(value).__name__}")


def map_users(entry: KvEntry, groups: dict[str, str], ctx: MapContext) -> Mapped:
    """`chat_ids`: a JSON array of chat ids → one subscribed user each."""
    _expect(entry.value, list, "a JSON array of chat ids")
    out = Mapped()
    for i, item in enumerate(entry.value):
        chat_id = _chat_id(item)
        if chat_id is None:
            out.problems.append(f"item {i}: chat id must be a string or an integer, got {item!r}")
            continue
        out.rows.append(
            {
                "chat_id": chat_id,
                "subscription_status": 1,
                "created_at": ctx.now_ms,
                "updated_at": ctx.now_ms,
            }
        )
    return out


def map_watchlists(entry: KvEntry, groups: dict[str, str], ctx: MapContext) -> Mapped:
    """`watchlist:{chatId}`: a JSON array of tickers → one row per ticker."""
    _expect(entry.value, list, "a JSON array of tickers")
    out = Mapped()
    for i, ticker in enumerate(entry.value):
        if not isinstance(ticker, str):
            out.problems.append(f"item {i}: ticker must be a string, got {ticker!r}")
            continue
        out.rows.append({"chat_id": groups["chatId"], "ticker": ticker, "created_at": ctx.now_ms})
    return out


def map_executions(entry: KvEntry, groups: dict[str, str], ctx: MapContext) -> Mapped:
    """`execution_history:{chatId}`: a JSON array of SignalExecution objects → one row each."""
    _expect(entry.value, list, "a JSON array of executions")
    out = Mapped()
    for i, item in enumerate(entry.value):
        if not isinstance(item, dict):
            out.problems.append(f"item {i}: execution must be an object, got {item!r}"[:500])
            continue
        date = item.get("executionDate")
        out.rows.append(
            {
                "chat_id": groups["chatId"],
                "execution_date": date,
                "ticker": item.get("ticker"),
                "signal_type": item.get("signalType"),
                "execution_price": item.get("executionPrice"),
                "signal_price": item.get("signalPrice"),
                "created_at": date,  # when it happened is when the bot recorded it
            }
        )
    return out


def map_active_positions(entry: KvEntry, groups: dict[str, str], ctx: MapContext) -> Mapped:
    """`active_position:{chatId}`: an ActivePosition object → one row (null: no position)."""
    if entry.value is None:
        return Mapped()
    _expect(entry.value, dict, "an object with ticker and entryPrice")
    return Mapped(
        rows=[
            {
                "chat_id": groups["chatId"],
                "ticker": entry.value.get("ticker"),
                "entry_price": entry.value.get("entryPrice"),
                "created_at": ctx.now_ms,
                "updated_at": ctx.now_ms,
            }
        ]
    )


def map_cache(entry: KvEntry, groups: dict[str, str], ctx: MapContext) -> Mapped:
    """A cached value → one row. Expiry: the KV expiration when the key has one, else the
    value's own `timestamp` (or now) plus the configured TTL."""
    stamp = _ms(entry.value.get("timestamp")) if isinstance(entry.value, dict) else None
    updated = stamp if stamp is not None else ctx.now_ms
    if entry.expiration is not None:
        expires = int(entry.expiration) * 1000
    else:
        expires = updated + ctx.cache_ttl_ms
    return Mapped(
        rows=[
            {
                "cache_key": entry.key,
                "cache_value": orjson.dumps(entry.value).decode(),
                "expires_at": expires,
                "updated_at": updated,
            }
        ]
    )


MAPPERS: dict[str, Mapper] = {
    "users": map_users,
    "watchlists": map_watchlists,
    "executions": map_executions,
    "active_positions": map_active_positions,
    "cache": map_cache,
}
