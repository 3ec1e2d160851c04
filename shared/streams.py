"""Streams: named datasets with their columns, key and conflict policy.

The catalog below mirrors the tables in schema/ (both dialects); the TOML file chooses, per stream,
which sinks it goes to and may override its conflict policy. A column's type decides how a value is
validated and normalised before any write (see shared/records.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

ColumnType = Literal["text", "int", "float", "decimal", "timestamp", "json"]
ConflictPolicy = Literal["ignore", "update", "newer"]
CONFLICT_POLICIES: tuple[ConflictPolicy, ...] = ("ignore", "update", "newer")

# PostgreSQL rejects longer index entries and D1 caps a row at 2 MB; keep text well inside both.
DEFAULT_MAX_TEXT = 65_536
DEFAULT_MAX_JSON = 1_000_000


@dataclass(frozen=True)
class Column:
    name: str
    type: ColumnType
    required: bool = True
    max_length: int | None = None  # for text/json, in characters

    @property
    def limit(self) -> int:
        if self.max_length is not None:
            return self.max_length
        return DEFAULT_MAX_JSON if self.type == "json" else DEFAULT_MAX_TEXT


@dataclass(frozen=True)
class ForeignKey:
    """`column` references `parent_table`.`parent_column` (enforced by both databases)."""

    column: str
    parent_table: str
    parent_column: str


@dataclass(frozen=True)
class Stream:
    name: str
    table: str
    columns: tuple[Column, ...]
    key: tuple[str, ...]
    conflict: ConflictPolicy = "ignore"
    version_column: str | None = None  # compared by the "newer" policy
    sinks: tuple[str, ...] = ("postgres", "sqlite")
    foreign_keys: tuple[ForeignKey, ...] = ()
    column_names: tuple[str, ...] = field(init=False)
    key_indexes: tuple[int, ...] = field(init=False)

    def __post_init__(self) -> None:
        names = tuple(c.name for c in self.columns)
        object.__setattr__(self, "column_names", names)
        object.__setattr__(self, "key_indexes", tuple(names.index(k) for k in self.key))

    def column(self, name: str) -> Column:
        return self.columns[self.column_names.index(name)]

    def with_settings(self, *, sinks: tuple[str, ...], conflict: ConflictPolicy) -> Stream:
        return replace(self, sinks=sinks, conflict=conflict)


USAGE_EVENTS = Stream(
    name="usage_events",
    table="usage_events",
    columns=(
        Column("id", "text", max_length=255),
        Column("organisation_id", "text", max_length=255),
        Column("project_id", "text", required=False, max_length=255),
        Column("idempotency_key", "text", max_length=255),
        Column("metric_name", "text", max_length=255),
        Column("metric_value", "float"),
        Column("unit", "text", required=False, max_length=64),
        Column("timestamp", "timestamp"),
        Column("metadata", "json", required=False, max_length=100_000),
    ),
    key=("idempotency_key",),
    conflict="ignore",
)

# Candles and price points from the market-data APIs (Binance, CoinGecko, CryptoCompare). One
# row per source, symbol, resolution and period start. `update`: a re-fetched period (the
# lookback buffer) replaces what an earlier fetch stored, so late corrections land. CoinGecko
# has prices without OHLC: open/high/low and the volumes are optional. Prices and volumes are
# `decimal`: the APIs send decimal strings ("819993474.31887912") that a double would round;
# PostgreSQL keeps them exactly (NUMERIC).
HISTORICAL_PRICES = Stream(
    name="historical_prices",
    table="historical_prices",
    columns=(
        Column("source", "text", max_length=32),
        Column("symbol", "text", max_length=64),
        Column("resolution", "text", max_length=16),
        Column("timestamp", "timestamp"),
        Column("open", "decimal", required=False),
        Column("high", "decimal", required=False),
        Column("low", "decimal", required=False),
        Column("close", "decimal"),
        Column("volume", "decimal", required=False),
        Column("quote_volume", "decimal", required=False),
        Column("market_cap", "decimal", required=False),
        Column("trades", "int", required=False),
    ),
    key=("source", "symbol", "resolution", "timestamp"),
    conflict="update",
)

# IoT point samples (ACE IoT). Values stay strings, as the API sends them; the table is kept like
# the service that owned it before, with INSERT OR REPLACE: a sample read again replaces the
# stored one, hence `update`.
TIMESERIES = Stream(
    name="timeseries",
    table="timeseries",
    columns=(
        Column("site", "text", max_length=255),
        Column("point_name", "text", max_length=1024),
        Column("timestamp", "timestamp"),
        Column("value", "text", required=False, max_length=4096),
    ),
    key=("point_name", "timestamp"),
    conflict="update",
)

# The scheduled-jobs service's report snapshots, keyed by date and type: a re-run of a report
# replaces its snapshot.
SCHEDULED_JOB_RESULTS = Stream(
    name="scheduled_job_results",
    table="scheduled_job_results",
    columns=(
        Column("scheduled_date", "text", max_length=64),
        Column("report_type", "text", max_length=255),
        Column("report_content", "text", required=False, max_length=1_000_000),
        Column("metadata", "json", required=False, max_length=100_000),
        Column("trigger_source", "text", required=False, max_length=255),
        Column("created_at", "timestamp", required=False),
    ),
    key=("scheduled_date", "report_type"),
    conflict="update",
)

# The Telegram bot's Workers KV data moved to tables. Times are epoch milliseconds
# (INTEGER), as the bot's Date.now() writes them. Every stream is `ignore`: the migration is
# one-time and running it twice must leave the tables as running it once did.
_CHAT_ID = ForeignKey("chat_id", "users", "chat_id")

USERS = Stream(
    name="users",
    table="users",
    columns=(
        Column("chat_id", "text", max_length=255),
        Column("subscription_status", "int"),
        Column("created_at", "int"),
        Column("updated_at", "int"),
    ),
    key=("chat_id",),
)

WATCHLISTS = Stream(
    name="watchlists",
    table="watchlists",
    columns=(
        Column("chat_id", "text", max_length=255),
        Column("ticker", "text", max_length=64),
        Column("created_at", "int"),
    ),
    key=("chat_id", "ticker"),
    foreign_keys=(_CHAT_ID,),
)

# The bot's KV data gives executions no natural key; the migration needs one to be idempotent.
# The same user, ticker, side and millisecond is the same execution (a double write in KV), so
# that is the key (UNIQUE in both schemas).
EXECUTIONS = Stream(
    name="executions",
    table="executions",
    columns=(
        Column("chat_id", "text", max_length=255),
        Column("execution_date", "int"),
        Column("ticker", "text", max_length=64),
        Column("signal_type", "text", max_length=8),
        Column("execution_price", "float"),
        Column("signal_price", "float", required=False),
        Column("created_at", "int"),
    ),
    key=("chat_id", "execution_date", "ticker", "signal_type"),
    foreign_keys=(_CHAT_ID,),
)

ACTIVE_POSITIONS = Stream(
    name="active_positions",
    table="active_positions",
    columns=(
        Column("chat_id", "text", max_length=255),
        Column("ticker", "text", max_length=64),
        Column("entry_price", "float"),
        Column("created_at", "int"),
        Column("updated_at", "int"),
    ),
    key=("chat_id", "ticker"),
    foreign_keys=(_CHAT_ID,),
)

CACHE = Stream(
    name="cache",
    table="cache",
    columns=(
        Column("cache_key", "text", max_length=512),  # a KV key is at most 512 bytes
        Column("cache_value", "json"),
        Column("expires_at", "int"),
        Column("updated_at", "int"),
    ),
    key=("cache_key",),
)

CATALOG: dict[str, Stream] = {
    s.name: s
    for s in (
        USAGE_EVENTS,
        HISTORICAL_PRICES,
        TIMESERIES,
        SCHEDULED_JOB_RESULTS,
        USERS,
        WATCHLISTS,
        EXECUTIONS,
        ACTIVE_POSITIONS,
        CACHE,
    )
}
