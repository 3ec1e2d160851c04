"""One settings object, read once from the environment and the TOML file, then passed down.

URLs and secrets come from the environment only (never from the committed TOML): SLUICE_BROKER_URL,
SLUICE_POSTGRES_URL, SLUICE_SQLITE_PATH, SLUICE_DATA_DIR, SLUICE_CONFIG, and per source (and for
the remote D1 sink) the variable its `api_token_env` names. An unset broker or PostgreSQL URL means
the embedded server kept in the data folder (shared/embedded.py).
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from sluice.shared.errors import ConfigError
from sluice.shared.streams import CATALOG, ConflictPolicy, Stream

SinkName = Literal["postgres", "sqlite", "d1"]
SINK_NAMES: tuple[SinkName, ...] = ("postgres", "sqlite", "d1")
# A stream with no `sinks` goes to the two local sinks; a remote D1 must be asked for.
DEFAULT_SINKS: tuple[SinkName, ...] = ("postgres", "sqlite")


class _Model(BaseModel):
    # strict: a TOML string or boolean is not silently taken for a number (`batch_size = true`).
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class Schedule(_Model):
    """Either `every` (seconds) or `cron` (five crontab fields, UTC)."""

    every: Annotated[float, Field(gt=0)] | None = None
    cron: str | None = None

    @model_validator(mode="after")
    def _one_of(self) -> Schedule:
        if (self.every is None) == (self.cron is None):
            raise ValueError("set exactly one of 'every' (seconds) or 'cron' (crontab string)")
        if self.cron is not None and len(self.cron.split()) != 5:
            raise ValueError(
                f"cron must have 5 fields (minute hour day month weekday): {self.cron!r}"
            )
        return self


class D1SourceConfig(_Model):
    """A D1 table, in pages: local (a SQLite file or wrangler's state) or remote (REST).

    `capture` is how changes are found:
    - "mark": rows with `processed_at IS NULL`, marked processed once every sink has them (needs
      write access and that column). `order`: "rowid" reads in arrival order (needs an index on
      `processed_at` alone), "key" in key order (index on `(processed_at, key)`), "auto" picks
      rowid when the table's indexes serve it without a sort.
    - "watermark": read-only; rows after a cursor on an increasing column (`watermark_column`:
      "rowid", an integer id, or a timestamp, with `lookback_seconds` for late times), ties
      broken by `key_column`. Catches inserts and INSERT OR REPLACE (a new rowid).
    - "snapshot": read-only, for small tables; every run reads the whole table and sends only
      the rows whose content changed since the last run, and with `deletes` the keys that are
      gone, deleted from every sink."""

    kind: Literal["d1"]
    stream: str
    mode: Literal["local", "remote"] = "local"
    capture: Literal["mark", "watermark", "snapshot"] = "mark"
    watermark_column: str = "rowid"
    lookback_seconds: Annotated[float, Field(ge=0)] = 0.0
    deletes: bool = False
    path: str | None = None
    wrangler_state: str | None = None
    database_id: str | None = None
    account_id: str | None = None
    api_token_env: str = "CLOUDFLARE_API_TOKEN"
    base_url: str = "https://api.cloudflare.com/client/v4"
    table: str | None = None
    key_column: str = "id"
    order: Literal["auto", "rowid", "key"] = "auto"
    batch_size: Annotated[int, Field(ge=1, le=100_000)] = 1000
    max_batches: Annotated[int, Field(ge=1)] = 10
    schedule: Schedule | None = None

    @model_validator(mode="after")
    def _mode_fields(self) -> D1SourceConfig:
        if self.mode == "local" and not (self.path or (self.wrangler_state and self.database_id)):
            raise ValueError("local mode needs 'path', or 'wrangler_state' with 'database_id'")
        if self.mode == "remote" and not (self.account_id and self.database_id):
            raise ValueError("remote mode needs 'account_id' and 'database_id'")
        return self

    @property
    def streams(self) -> list[str]:
        return [self.stream]

    def describe(self) -> str:
        return f"{self.kind} {self.mode}, {self.capture}"

    def resolved(self, base: Path) -> D1SourceConfig:
        return self.model_copy(update=_resolved_paths(self, base))


# Streams a KV key can be mapped to: each has one mapper in producers/kv_mapping.py.
KV_STREAMS = ("users", "watchlists", "executions", "active_positions", "cache")


class KvKeyConfig(_Model):
    """KV keys matching `pattern` become records of `stream`. `{chatId}` (any `{name}`) matches
    one or more characters and is handed to the stream's mapper; the rest matches literally."""

    pattern: Annotated[str, Field(min_length=1, max_length=512)]
    stream: str

    @model_validator(mode="after")
    def _known(self) -> KvKeyConfig:
        if self.stream not in KV_STREAMS:
            expected = ", ".join(KV_STREAMS)
            raise ValueError(
                f"stream {self.stream!r} has no KV mapper (expected one of: {expected})"
            )
        if self.stream in ("watchlists", "executions", "active_positions") and (
            "{chatId}" not in self.pattern
        ):
            raise ValueError(f"pattern for {self.stream} must contain {{chatId}}: {self.pattern!r}")
        return self


def _seed_kv_keys() -> list[KvKeyConfig]:
    """The Telegram bot's keys and the tables they map to, used when `keys` is not given."""
    return [
        KvKeyConfig(pattern="chat_ids", stream="users"),
        KvKeyConfig(pattern="watchlist:{chatId}", stream="watchlists"),
        KvKeyConfig(pattern="execution_history:{chatId}", stream="executions"),
        KvKeyConfig(pattern="active_position:{chatId}", stream="active_positions"),
        KvKeyConfig(pattern="fear_greed_cache", stream="cache"),
    ]


class KvSourceConfig(_Model):
    """A Workers KV namespace migrated to tables: remote (REST API) or local (wrangler's state
    folder, or a JSON export). One-time by default: once every page is committed the migration
    is complete and later runs do nothing."""

    kind: Literal["kv"]
    mode: Literal["local", "remote"] = "remote"
    account_id: str | None = None
    namespace_id: str | None = None
    api_token_env: str = "CLOUDFLARE_API_TOKEN"
    base_url: str = "https://api.cloudflare.com/client/v4"
    path: str | None = None  # local: a JSON export [{"key","value","expiration"?,"metadata"?}]
    wrangler_state: str | None = None  # local: wrangler's .wrangler/state (with namespace_id)
    keys: Annotated[list[KvKeyConfig], Field(min_length=1)] = Field(default_factory=_seed_kv_keys)
    once: bool = True
    # Expiry of a cache entry without a KV expiration: its own timestamp (or now) plus this.
    cache_ttl_seconds: Annotated[float, Field(ge=0)] = 3600.0
    list_limit: Annotated[int, Field(ge=10, le=1000)] = 1000
    max_attempts: Annotated[int, Field(ge=1, le=20)] = 5
    # Not used to cut a run short: a migration enqueues the whole namespace in one run.
    max_batches: Annotated[int, Field(ge=1)] = 1_000_000
    schedule: Schedule | None = None

    @property
    def stream(self) -> str:
        """The first stream (parents first: the users); a KV source feeds every `keys` stream."""
        return self.ordered_keys()[0].stream

    @property
    def streams(self) -> list[str]:
        return list(dict.fromkeys(k.stream for k in self.ordered_keys()))

    def ordered_keys(self) -> list[KvKeyConfig]:
        """Parent streams first (users has no foreign key), otherwise in the configured order."""
        return sorted(
            self.keys, key=lambda k: k.stream in ("watchlists", "executions", "active_positions")
        )

    @model_validator(mode="after")
    def _mode_fields(self) -> KvSourceConfig:
        if self.mode == "local" and not (self.path or (self.wrangler_state and self.namespace_id)):
            raise ValueError("local mode needs 'path', or 'wrangler_state' with 'namespace_id'")
        if self.mode == "remote" and not (self.account_id and self.namespace_id):
            raise ValueError("remote mode needs 'account_id' and 'namespace_id'")
        return self

    def describe(self) -> str:
        return f"{self.kind} {self.mode}"

    def resolved(self, base: Path) -> KvSourceConfig:
        return self.model_copy(update=_resolved_paths(self, base))


class RateLimitConfig(_Model):
    """A budget shared by every process on every machine (kept in Redis): at most `limit` units
    (requests, or Binance weight) in any rolling `per` seconds."""

    limit: Annotated[int, Field(ge=1)]
    per: Annotated[float, Field(gt=0)] = 60.0


class _HttpSourceConfig(_Model):
    """What every HTTP API source has: where, how fast, from when, how much per run."""

    stream: str
    base_url: str
    api_key_env: str | None = None  # the environment variable holding the key (never the key)
    # Re-read this much before the cursor on every run, so late or corrected data is picked up.
    lookback_seconds: Annotated[float, Field(ge=0)] = 600.0
    # Where a partition without a cursor starts (ISO-8601, UTC if naive). Unset: `initial_days`
    # before now.
    start: str | None = None
    initial_days: Annotated[float, Field(gt=0)] = 1.0
    max_batches: Annotated[int, Field(ge=1)] = 10  # windows (pages) per run
    connect_timeout: Annotated[float, Field(gt=0)] = 5.0
    read_timeout: Annotated[float, Field(gt=0)] = 30.0  # the longest silence while reading
    # One call's whole deadline (connect, headers and body): a server trickling its answer is cut
    # off and the call retried like a timeout.
    total_timeout: Annotated[float, Field(gt=0)] = 60.0
    # The largest answer read (bytes, after decompression); a larger one is refused unread (the
    # whole body would sit in memory, several times over once parsed).
    max_response_bytes: Annotated[int, Field(ge=1024)] = 16 * 1024 * 1024
    # What one run may do, empty windows included; a run that reaches either stops early (not a
    # failure) and the next one continues from the cursors.
    max_calls_per_run: Annotated[int, Field(ge=1)] = 1000
    max_run_seconds: Annotated[float, Field(gt=0)] = 300.0
    max_attempts: Annotated[int, Field(ge=1, le=20)] = 5
    # The longest server-requested wait (Retry-After, rate-limit reset) a run sleeps through;
    # longer waits end the run with a transient error and the next run tries again.
    max_wait_seconds: Annotated[float, Field(ge=0)] = 120.0
    # Wait after a 429 that says nothing about when to come back (CoinGecko sends no header).
    rate_limit_fallback_seconds: Annotated[float, Field(ge=0)] = 60.0
    rate_limits: list[RateLimitConfig] = Field(default_factory=list)
    schedule: Schedule | None = None

    @property
    def streams(self) -> list[str]:
        return [self.stream]

    def describe(self) -> str:
        return str(getattr(self, "kind", "http"))

    def resolved(self, base: Path) -> Self:
        return self  # no local paths

    @model_validator(mode="after")
    def _start_parses(self) -> _HttpSourceConfig:
        if self.start is not None:
            from datetime import datetime

            try:
                datetime.fromisoformat(self.start)
            except ValueError:
                raise ValueError(f"start must be an ISO-8601 time: {self.start!r}") from None
        return self


BINANCE_INTERVALS = Literal[
    "1s", "1m", "3m", "5m", "15m", "30m", "1h", "2h", "4h", "6h", "8h", "12h", "1d", "3d", "1w"
]


class BinanceSourceConfig(_HttpSourceConfig):
    """`GET /api/v3/klines` per symbol. Binance charges weight 2 per call and allows 6000 per
    minute per IP (producers/binance.py)."""

    kind: Literal["binance"]
    stream: str = "historical_prices"
    base_url: str = "https://data-api.binance.vision"
    symbols: Annotated[list[str], Field(min_length=1)]
    interval: BINANCE_INTERVALS = "1h"
    limit: Annotated[int, Field(ge=1, le=1000)] = 1000
    # Below the published 6000 so other clients on the same IP keep some room.
    rate_limits: list[RateLimitConfig] = Field(
        default_factory=lambda: [RateLimitConfig(limit=4800, per=60)]
    )


class CoinGeckoSourceConfig(_HttpSourceConfig):
    """`GET /coins/{id}/market_chart/range` per coin; no pagination, and windows of at most 90
    days keep hourly points (a longer range comes back daily)."""

    kind: Literal["coingecko"]
    stream: str = "historical_prices"
    base_url: str = "https://api.coingecko.com/api/v3"
    api_key_env: str | None = "COINGECKO_API_KEY"
    plan: Literal["demo", "pro"] = "demo"
    coins: Annotated[list[str], Field(min_length=1)]
    vs_currency: str = "usd"
    window_days: Annotated[float, Field(gt=0, le=90)] = 30.0
    rate_limits: list[RateLimitConfig] = Field(
        default_factory=lambda: [RateLimitConfig(limit=30, per=60)]
    )


class CryptoCompareSourceConfig(_HttpSourceConfig):
    """`GET /data/v2/histohour|histominute` per pair, paging backwards with toTs."""

    kind: Literal["cryptocompare"]
    stream: str = "historical_prices"
    base_url: str = "https://min-api.cryptocompare.com"
    api_key_env: str | None = "CRYPTOCOMPARE_API_KEY"
    pairs: Annotated[list[str], Field(min_length=1)]  # "BTC/USD"
    endpoint: Literal["histohour", "histominute"] = "histohour"
    limit: Annotated[int, Field(ge=1, le=2000)] = 2000
    exchange: str | None = None  # `e`; unset: CCCAGG
    rate_limits: list[RateLimitConfig] = Field(
        default_factory=lambda: [
            RateLimitConfig(limit=20, per=1),
            RateLimitConfig(limit=300, per=60),
        ]
    )

    @model_validator(mode="after")
    def _pairs(self) -> CryptoCompareSourceConfig:
        for pair in self.pairs:
            parts = pair.split("/")
            if len(parts) != 2 or not all(0 < len(p) <= 10 for p in parts):
                raise ValueError(f"pairs: expected 'FROM/TO' (each 1-10 chars), got {pair!r}")
        return self


class AceIotSourceConfig(_HttpSourceConfig):
    """`GET /sites/{site}/timeseries/paginated` per site, a window at a time, each window
    paged with `next_cursor`."""

    kind: Literal["aceiot"]
    stream: str = "timeseries"
    base_url: str = "https://flightdeck.aceiot.cloud/api"
    api_key_env: str | None = "ACEIOT_API_KEY"
    site: str
    points: list[str] = Field(default_factory=list)  # keep only these names; empty: all
    window_seconds: Annotated[float, Field(gt=0)] = 3600.0
    page_size: Literal[3, 10, 50, 100, 500, 1000, 5000, 10000, 50000, 100000, 300000, 500000] = (
        10000
    )
    raw_data: bool = False
    max_pages_per_window: Annotated[int, Field(ge=1)] = 1000
    rate_limits: list[RateLimitConfig] = Field(
        default_factory=lambda: [RateLimitConfig(limit=10, per=1)]
    )


HttpSourceConfig = (
    BinanceSourceConfig | CoinGeckoSourceConfig | CryptoCompareSourceConfig | AceIotSourceConfig
)
AnySource = D1SourceConfig | HttpSourceConfig | KvSourceConfig
SOURCE_KINDS = ("d1", "binance", "coingecko", "cryptocompare", "aceiot", "kv")
AnySourceConfig = Annotated[
    D1SourceConfig
    | KvSourceConfig
    | BinanceSourceConfig
    | CoinGeckoSourceConfig
    | CryptoCompareSourceConfig
    | AceIotSourceConfig,
    Field(discriminator="kind"),
]


class D1SinkConfig(_Model):
    """A remote D1 database written through the REST API (shared/sinks/d1.py). The token is read
    from the environment variable `api_token_env` names, never from this file."""

    account_id: Annotated[str, Field(min_length=1, max_length=32)]
    database_id: Annotated[str, Field(min_length=1)]
    api_token_env: str = "CLOUDFLARE_API_TOKEN"
    base_url: str = "https://api.cloudflare.com/client/v4"
    connect_timeout: Annotated[float, Field(gt=0)] = 5.0
    # D1 caps a whole batch at 30 s; past that the answer is not coming.
    read_timeout: Annotated[float, Field(gt=0)] = 60.0
    # Attempts per request inside the worker (429, 5xx, connection errors); after them the page
    # goes back to the task's own retries with backoff, which do not hold the worker.
    max_attempts: Annotated[int, Field(ge=1, le=10)] = 3

    @model_validator(mode="after")
    def _url(self) -> D1SinkConfig:
        if not self.base_url.startswith(("https://", "http://")):
            raise ValueError(f"base_url must be an http(s) URL: {self.base_url!r}")
        return self


class SinksConfig(_Model):
    d1: D1SinkConfig | None = None


class StreamConfig(_Model):
    sinks: list[SinkName] = Field(default_factory=lambda: list(DEFAULT_SINKS))
    conflict: ConflictPolicy | None = None


class PipelineConfig(_Model):
    page_size: Annotated[int, Field(ge=1, le=100_000)] = 1000
    data_dir: str | None = None
    # How long after a worker's last heartbeat the pages it took go back to their queue: the
    # worker renews them every sixth of this while it is alive, however long a page takes.
    visibility_timeout: Annotated[int, Field(ge=5)] = 60
    # A page in flight longer than this is presumed lost and its rows are read again.
    inflight_lease: Annotated[float, Field(gt=0)] = 4 * 3600
    max_retries: Annotated[int, Field(ge=0, le=100)] = 8
    # A child record whose parent is missing (a foreign key) waits for the parent's page this
    # many times, `fk_retry_seconds` doubling each time, before it becomes a dead letter.
    fk_retries: Annotated[int, Field(ge=0, le=20)] = 4
    fk_retry_seconds: Annotated[float, Field(gt=0)] = 1.0
    sqlite_busy_timeout_ms: Annotated[int, Field(ge=0)] = 30_000
    # The SQLite sink's page cache, per writer process: most of its memory, and what keeps the
    # indexes' random inserts off the disk. Raise it for tables far beyond a few million rows.
    sqlite_cache_mib: Annotated[int, Field(ge=2, le=65_536)] = 64
    # Where runs, cursors and dead letters are kept (shared/state.py): "auto" is PostgreSQL when
    # one is configured or a stream writes there, else the SQLite sink's file.
    state: Literal["auto", "postgres", "sqlite"] = "auto"


class RetentionConfig(_Model):
    """What `sluice prune` deletes, and when beat runs it. A number of days of 0 (the default)
    keeps that kind of row forever.

    - `d1_days`: processed rows of mark-capture D1 sources older than this (by `processed_at`),
      and only those whose key every sink of the stream holds; `sources` overrides it per
      source (`{ events = 14 }`; 0 keeps that source's rows).
    - `letters_days`: dead letters replayed or discarded, by the time of their latest failure.
    - `runs_days`: `source_runs` and the sinks' `ingestion_runs`, rolled up into daily totals
      first (metrics and history keep the long view).
    - `cache_days`: rows of the `cache` table expired this long ago."""

    d1_days: Annotated[int, Field(ge=0)] = 0
    sources: dict[str, Annotated[int, Field(ge=0)]] = Field(default_factory=dict)
    letters_days: Annotated[int, Field(ge=0)] = 0
    runs_days: Annotated[int, Field(ge=0)] = 0
    cache_days: Annotated[int, Field(ge=0)] = 0
    # Rows per batch: each D1 batch is read, checked against every sink and deleted in one go.
    batch_size: Annotated[int, Field(ge=1, le=10_000)] = 1000
    # How long a sink may take to answer whether it holds a batch's keys (a locked table waits
    # this long); past it the batch is kept and the prune says why.
    sink_timeout_seconds: Annotated[float, Field(gt=0)] = 30.0
    schedule: Schedule = Field(default_factory=lambda: Schedule(cron="30 3 * * *"))

    def days_for(self, source: str) -> int:
        """Days a D1 source's processed rows are kept (0: forever)."""
        return self.sources.get(source, self.d1_days)

    @property
    def enabled(self) -> bool:
        """Whether anything is ever pruned (beat schedules a prune only then)."""
        days = [self.d1_days, self.letters_days, self.runs_days, self.cache_days]
        return any(days) or any(self.sources.values())


class BrokerConfig(_Model):
    # With a sentinel:// broker URL (or SLUICE_REDIS_URL): the name the sentinels monitor the
    # master under. SLUICE_BROKER_MASTER overrides it.
    master_name: str | None = None


class FileConfig(_Model):
    pipeline: PipelineConfig = Field(default_factory=PipelineConfig)
    broker: BrokerConfig = Field(default_factory=BrokerConfig)
    streams: dict[str, StreamConfig] = Field(default_factory=dict)
    sources: dict[str, AnySourceConfig] = Field(default_factory=dict)
    sinks: SinksConfig = Field(default_factory=SinksConfig)
    retention: RetentionConfig = Field(default_factory=RetentionConfig)


@dataclass(frozen=True)
class Settings:
    config_path: Path | None
    data_dir: Path
    broker_url: str | None  # None: the embedded Redis in data_dir
    postgres_url: str | None  # None: the embedded PostgreSQL in data_dir
    sqlite_path: Path
    pipeline: PipelineConfig
    streams: dict[str, Stream]
    sources: dict[str, AnySource]  # every configured source, of every kind, by name
    env: Mapping[str, str] = field(repr=False, default_factory=dict)
    d1_sink: D1SinkConfig | None = None  # [sinks.d1]: the remote D1 sink, when configured
    retention: RetentionConfig = field(default_factory=lambda: RetentionConfig())
    broker_master: str | None = None  # the Sentinel master's name, for sentinel:// URLs

    @property
    def sinks_used(self) -> tuple[str, ...]:
        """Sinks at least one stream writes to, in SINK_NAMES order."""
        used = {s for st in self.streams.values() for s in st.sinks}
        return tuple(s for s in SINK_NAMES if s in used)

    @property
    def sinks_fed(self) -> tuple[str, ...]:
        """Sinks the configured sources' streams write to (every stream's when no source is
        configured), in SINK_NAMES order."""
        names = {n for cfg in self.sources.values() for n in cfg.streams}
        streams = [self.streams[n] for n in names if n in self.streams] or self.streams.values()
        used = {s for st in streams for s in st.sinks}
        return tuple(s for s in SINK_NAMES if s in used)

    def source(self, name: str) -> AnySource:
        """The configuration of the source of that name; an unknown name is an error naming
        the known ones."""
        from sluice.shared.errors import SourceError

        cfg = self.sources.get(name)
        if cfg is None:
            known = ", ".join(sorted(self.sources)) or "none configured"
            raise SourceError(f"unknown source {name!r} (known: {known})", source=name)
        return cfg

    @classmethod
    def load(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = dict(os.environ if env is None else env)
        path_text = env.get("SLUICE_CONFIG")
        if path_text:
            path: Path | None = Path(path_text)
        elif Path("sluice.toml").exists():
            path = Path("sluice.toml")
        else:
            path = None
        raw = _read_toml(path) if path else {}
        cfg = parse_config(raw, str(path) if path else "<defaults>")
        base = path.parent if path else Path.cwd()
        data_dir = Path(env.get("SLUICE_DATA_DIR") or cfg.pipeline.data_dir or ".sluice")
        if not data_dir.is_absolute():
            data_dir = (
                base if cfg.pipeline.data_dir and not env.get("SLUICE_DATA_DIR") else Path.cwd()
            ) / data_dir
        sqlite_text = env.get("SLUICE_SQLITE_PATH")
        sqlite_path = Path(sqlite_text) if sqlite_text else data_dir / "sluice.sqlite"
        streams: dict[str, Stream] = {}
        for name, stream in CATALOG.items():
            sc = cfg.streams.get(name, StreamConfig())
            streams[name] = stream.with_settings(
                sinks=tuple(sc.sinks), conflict=sc.conflict or stream.conflict
            )
        sources = {name: src.resolved(base) for name, src in cfg.sources.items()}
        return cls(
            config_path=path,
            data_dir=data_dir.resolve(),
            broker_url=env.get("SLUICE_BROKER_URL") or None,
            postgres_url=env.get("SLUICE_POSTGRES_URL") or None,
            sqlite_path=sqlite_path.resolve(),
            pipeline=cfg.pipeline,
            streams=streams,
            sources=sources,
            env=env,
            d1_sink=cfg.sinks.d1,
            retention=cfg.retention,
            broker_master=env.get("SLUICE_BROKER_MASTER") or cfg.broker.master_name,
        )

    def stream(self, name: str) -> Stream:
        from sluice.shared.errors import UnknownStreamError

        try:
            return self.streams[name]
        except KeyError:
            raise UnknownStreamError(
                f"unknown stream {name!r}; known: {', '.join(sorted(self.streams))}", stream=name
            ) from None

    def secret(self, variable: str) -> str | None:
        return self.env.get(variable) or None


def _resolved_paths(src: BaseModel, base: Path) -> dict[str, Any]:
    """A local source's file paths made absolute against the config file's folder."""
    out: dict[str, Any] = {}
    for attr in ("path", "wrangler_state"):
        value = getattr(src, attr)
        if value and not Path(value).is_absolute():
            out[attr] = str((base / value).resolve())
    return out


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError([f"file not found: {path}"], str(path)) from None
    except IsADirectoryError:
        # What Docker leaves when it bind-mounts a file that does not exist on the host.
        raise ConfigError(
            [
                f"{path} is a directory, not a TOML file (with Docker Compose: create"
                " ./sluice.toml before `docker compose up`, e.g. cp sluice.example.toml"
                " sluice.toml, then remove the directory Docker made in its place)"
            ],
            str(path),
        ) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"not valid TOML: {exc}"], str(path)) from None


def parse_config(raw: dict[str, Any], file: str) -> FileConfig:
    """Validate the TOML document; every mistake is reported with its key and what was expected."""
    problems: list[str] = []
    cfg: FileConfig | None = None
    try:
        cfg = FileConfig.model_validate(raw)
    except ValidationError as exc:
        for err in exc.errors():
            parts = [str(p) for p in err["loc"] if not str(p).startswith("function-after")]
            if len(parts) > 2 and parts[0] == "sources" and parts[2] in SOURCE_KINDS:
                del parts[2]  # the union's tag: the user wrote `kind`, not a nested table
            if err["type"] in ("union_tag_not_found", "union_tag_invalid"):
                parts.append("kind")
            loc = ".".join(parts)
            got = err.get("input")
            shown = "" if isinstance(got, dict) else f" (got {got!r})"
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "union_tag_not_found":
                msg = f"Field required (expected one of: {', '.join(SOURCE_KINDS)})"
            problems.append(f"{loc or '<top>'}: {msg}{shown}")
    # Checked on the raw document so they are reported alongside the errors above.
    sources = raw.get("sources")
    for name, src in sources.items() if isinstance(sources, dict) else ():
        stream = src.get("stream") if isinstance(src, dict) else None
        if isinstance(stream, str) and stream not in CATALOG:
            problems.append(
                f"sources.{name}.stream: unknown stream {stream!r}"
                f" (expected one of: {', '.join(sorted(CATALOG))})"
            )
    streams = raw.get("streams")
    for name, sc in streams.items() if isinstance(streams, dict) else ():
        if name not in CATALOG:
            problems.append(
                f"streams.{name}: unknown stream (expected one of: {', '.join(sorted(CATALOG))})"
            )
        elif (
            isinstance(sc, dict)
            and sc.get("conflict") == "newer"
            and CATALOG[name].version_column is None
        ):
            problems.append(
                f"streams.{name}.conflict: 'newer' needs a version column and {name} has none"
                " (expected 'ignore' or 'update')"
            )
    sinks = raw.get("sinks")
    has_d1 = isinstance(sinks, dict) and isinstance(sinks.get("d1"), dict)
    for name, sc in streams.items() if isinstance(streams, dict) else ():
        listed = sc.get("sinks") if isinstance(sc, dict) else None
        if isinstance(listed, list) and "d1" in listed and not has_d1:
            problems.append(
                f"streams.{name}.sinks: 'd1' needs a [sinks.d1] table"
                " (account_id, database_id, api_token_env)"
            )
    retention = raw.get("retention")
    kept = retention.get("sources") if isinstance(retention, dict) else None
    for name in kept if isinstance(kept, dict) else ():
        src = sources.get(name) if isinstance(sources, dict) else None
        if not (isinstance(src, dict) and src.get("kind") == "d1"):
            d1 = sorted(
                n
                for n, v in (sources or {}).items()
                if isinstance(v, dict) and v.get("kind") == "d1"
            )
            problems.append(
                f"retention.sources.{name}: not a configured D1 source"
                f" (D1 sources: {', '.join(d1) or 'none'})"
            )
    if problems or cfg is None:
        raise ConfigError(problems, file)
    return cfg
