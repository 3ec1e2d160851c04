"""Workers KV source: a namespace (the Telegram bot's) migrated, once, into tables.

A run lists the keys of every configured pattern by its literal prefix, reads their values 100 at
a time, maps each value to rows (producers/kv_mapping.py) and yields pages, one stream per page,
parents first (`users` before the tables whose rows reference it). What cannot be read, parsed or
mapped becomes a dead letter naming the key, and the run goes on.

Stores (all read-only):
- remote: Cloudflare's Workers KV REST API through the shared Cloudflare client
  (shared/cloudflare.py: envelope, retries, 429/971). Listing follows `result_info.cursor` until
  it is empty or absent; a short or empty page with a cursor is not the end (tombstones). Values
  come from `POST …/bulk/get` (`type: "text"`, so one value that is not JSON cannot fail the
  others); a key bulk get leaves out, or a bulk get refused as a whole, is read with a single
  `GET …/values/{key}`; 404 with code 10009 means the key is gone (deleted or expired).
- local: wrangler's state folder (the `_mf_entries` table of miniflare's SQLite file, plus a
  blob file per value), or a JSON export `[{"key", "value", "expiration"?, "metadata"?}]`.

One-time: the migration's state is a `source_migrations` row in the state database. The run
records the attempt and what it saw; each page's acknowledgement (after every sink committed
it) is recorded by page number; when all are in, the migration is `complete` and later runs do
nothing (unless `once = false`). A run while pages are in flight does nothing either, so
`sluice produce` twice is the same as once.
"""

from __future__ import annotations

import logging
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cached_property
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote

import orjson
import requests
from sqlalchemy import text
from sqlalchemy.engine import Connection
from sqlalchemy.exc import SQLAlchemyError

from sluice.producers.kv_mapping import MAPPERS, KvEntry, MapContext, MappingError, compile_pattern
from sluice.producers.source import SourcePage, SourceReject, SourceStatus
from sluice.shared.cloudflare import CloudflareClient
from sluice.shared.errors import KvError, SourceError, TransientSourceError
from sluice.shared.records import record_key
from sluice.shared.settings import KvSourceConfig, Settings
from sluice.shared.state import StateStore, open_state
from sluice.shared.streams import Stream
from sluice.shared.wrangler import kv_blobs_dir, kv_index_path

log = logging.getLogger("sluice.kv_source")

BULK_GET_MAX = 100  # keys per bulk get: the most the API's bulk get accepts
KEY_NOT_FOUND = 10009


@dataclass(frozen=True)
class KeyInfo:
    name: str
    expiration: int | None = None  # epoch seconds
    metadata: Any = None


# A value as read: text, bytes that are not UTF-8 text, or None when the key is gone.
@dataclass(frozen=True)
class Unreadable:
    """A listed key whose value cannot be read safely (it becomes a dead letter naming why)."""

    reason: str


RawValue = str | bytes | Unreadable | None


class KvStore(Protocol):
    def list_keys(self, prefix: str) -> Iterator[KeyInfo]: ...

    def get_values(self, keys: Sequence[str]) -> dict[str, RawValue]: ...

    def close(self) -> None: ...


# -- remote: the REST API -------------------------------------------------------------------------


class KvRestClient(CloudflareClient):
    """The Workers KV endpoints of one namespace, over the shared Cloudflare transport."""

    error_type = KvError

    def __init__(
        self,
        *,
        account_id: str,
        namespace_id: str,
        api_token: str,
        base_url: str = "https://api.cloudflare.com/client/v4",
        list_limit: int = 1000,
        max_attempts: int = 5,
        session: requests.Session | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        super().__init__(
            api_token=api_token,
            base_url=base_url,
            session=session,
            max_attempts=max_attempts,
            sleep=sleep,
        )
        self.namespace_id = namespace_id
        self.root = (
            f"{self.base_url}/accounts/{quote(account_id, safe='')}"
            f"/storage/kv/namespaces/{quote(namespace_id, safe='')}"
        )
        self.list_limit = list_limit
        self.anomalies: list[str] = []

    def list_keys(self, prefix: str) -> Iterator[KeyInfo]:
        cursor: str | None = None
        seen: set[str] = set()
        while True:
            # The prefix goes with every request: KV does not remember it in the cursor.
            params = {"limit": str(self.list_limit)}
            if prefix:
                params["prefix"] = prefix
            if cursor:
                params["cursor"] = cursor
            envelope = self.request("GET", f"{self.root}/keys", params=params)
            result = envelope.get("result")
            if not isinstance(result, list):
                raise self._shape_error(f"{self.root}/keys", "'result' is not a list of keys")
            for item in result:
                name = item.get("name") if isinstance(item, dict) else None
                if not isinstance(name, str):
                    raise self._shape_error(f"{self.root}/keys", f"key without a name: {item!r}")
                expiration = item.get("expiration")
                yield KeyInfo(
                    name,
                    int(expiration) if isinstance(expiration, int | float) else None,
                    item.get("metadata"),
                )
            info = envelope.get("result_info")
            cursor = info.get("cursor") if isinstance(info, dict) else None
            if not cursor:  # "", null or absent: the last page (short pages are not)
                return
            if cursor in seen:  # a cursor that does not advance would loop for ever
                raise KvError(
                    "list cursor repeated; the listing does not advance",
                    namespace=self.namespace_id,
                    prefix=prefix,
                )
            seen.add(cursor)

    def bulk_get(self, keys: Sequence[str]) -> dict[str, str | None]:
        envelope = self.request(
            "POST",
            f"{self.root}/bulk/get",
            body={"keys": list(keys), "type": "text", "withMetadata": True},
        )
        result = envelope.get("result")
        values = result.get("values") if isinstance(result, dict) else None
        if not isinstance(values, dict):
            raise self._shape_error(f"{self.root}/bulk/get", "'result.values' is not an object")
        out: dict[str, str | None] = {}
        for key in keys:
            item = values.get(key)
            value = item.get("value") if isinstance(item, dict) else None
            out[key] = value if isinstance(value, str) else None
        return out

    def get(self, key: str) -> RawValue:
        try:
            response = self.request("GET", f"{self.root}/values/{quote(key, safe='')}", raw=True)
        except KvError as exc:
            if exc.code == KEY_NOT_FOUND:
                return None  # deleted or expired since it was listed
            raise KvError(
                exc.message, status=exc.status, code=exc.code, transient=exc.transient, key=key
            ) from exc
        data: bytes = response.content
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            return data

    def get_values(self, keys: Sequence[str]) -> dict[str, RawValue]:
        out: dict[str, RawValue] = {}
        for i in range(0, len(keys), BULK_GET_MAX):
            chunk = keys[i : i + BULK_GET_MAX]
            try:
                got: dict[str, str | None] = self.bulk_get(chunk)
            except KvError as exc:
                if exc.transient:
                    raise
                # Refused as a whole (e.g. a binary value): read these keys one by one.
                self.anomalies.append(f"bulk get refused ({exc.message}); single reads used")
                got = {}
            for key in chunk:
                value: RawValue = got.get(key)
                out[key] = value if value is not None else self.get(key)
        return out


# -- local: a JSON export or wrangler's state folder ----------------------------------------------


def _now_s() -> float:
    return time.time()


def _sort_key(key: str) -> bytes:
    return key.encode("utf-8", "surrogatepass")  # KV lists in UTF-8 byte order


class KvJsonFile:
    """A JSON export: `[{"key", "value", "expiration"?, "metadata"?}]`. A value that is a string is
    the stored text; anything else is taken as the stored JSON itself."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @cached_property
    def _entries(self) -> dict[str, tuple[str, KeyInfo]]:
        try:
            data = orjson.loads(self.path.read_bytes())
        except FileNotFoundError:
            raise SourceError(f"KV export not found: {self.path}") from None
        except orjson.JSONDecodeError as exc:
            raise SourceError(f"KV export is not JSON: {exc}", path=str(self.path)) from None
        if not isinstance(data, list):
            raise SourceError("KV export must be a JSON array of entries", path=str(self.path))
        now = _now_s()
        out: dict[str, tuple[str, KeyInfo]] = {}
        for i, item in enumerate(data):
            if not isinstance(item, dict) or not isinstance(item.get("key"), str):
                raise SourceError(f"KV export entry {i} has no string 'key'", path=str(self.path))
            expiration = item.get("expiration")
            exp = int(expiration) if isinstance(expiration, int | float) else None
            if exp is not None and exp <= now:
                continue  # expired: KV would not return it either
            value = item.get("value")
            raw = value if isinstance(value, str) else orjson.dumps(value).decode()
            out[item["key"]] = (raw, KeyInfo(item["key"], exp, item.get("metadata")))
        return out

    def list_keys(self, prefix: str) -> Iterator[KeyInfo]:
        for key in sorted((k for k in self._entries if k.startswith(prefix)), key=_sort_key):
            yield self._entries[key][1]

    def get_values(self, keys: Sequence[str]) -> dict[str, RawValue]:
        return {k: self._entries[k][0] if k in self._entries else None for k in keys}

    def close(self) -> None:
        pass


class KvWranglerState:
    """wrangler's local KV: `_mf_entries(key, blob_id, expiration ms, metadata)` in a SQLite file,
    the value bytes in `<state>/v3/kv/<namespace_id>/blobs/<blob_id>`."""

    def __init__(self, state_dir: Path, namespace_id: str) -> None:
        self.index = kv_index_path(state_dir, namespace_id)
        self.blobs = kv_blobs_dir(state_dir, namespace_id)

    @cached_property
    def _conn(self) -> sqlite3.Connection:
        if not self.index.exists():
            raise SourceError(f"local KV namespace not found: {self.index}")
        # Read-only: the source never changes the namespace it migrates.
        return sqlite3.connect(f"file:{self.index}?mode=ro", uri=True, check_same_thread=False)

    def list_keys(self, prefix: str) -> Iterator[KeyInfo]:
        now_ms = _now_s() * 1000
        rows = self._conn.execute(
            "SELECT key, expiration, metadata FROM _mf_entries WHERE key >= ? ORDER BY key",
            (prefix,),
        )
        for key, expiration, metadata in rows:
            if not key.startswith(prefix):
                return  # sorted: past the prefix
            if expiration is not None and expiration <= now_ms:
                continue
            meta = orjson.loads(metadata) if metadata else None
            yield KeyInfo(key, int(expiration // 1000) if expiration else None, meta)

    def get_values(self, keys: Sequence[str]) -> dict[str, RawValue]:
        out: dict[str, RawValue] = {}
        for key in keys:
            row = self._conn.execute(
                "SELECT blob_id FROM _mf_entries WHERE key = ?", (key,)
            ).fetchone()
            if row is None:
                out[key] = None
                continue
            blob = self._blob_path(row[0])
            if blob is None:
                out[key] = Unreadable(f"blob id {row[0]!r} points outside the blobs folder")
                continue
            try:
                data = blob.read_bytes()
            except FileNotFoundError:
                out[key] = None
                continue
            try:
                out[key] = data.decode("utf-8")
            except UnicodeDecodeError:
                out[key] = data
        return out

    def _blob_path(self, blob_id: object) -> Path | None:
        """The blob file of an entry, or None when its id would lead outside the blobs folder
        (an absolute path, `..`): the index is data, not a place to read files from."""
        if not isinstance(blob_id, str) or not blob_id:
            return None
        root = self.blobs.resolve()
        path = (root / blob_id).resolve()
        return path if path.parent == root else None

    def close(self) -> None:
        if "_conn" in self.__dict__:
            self._conn.close()


# -- migration state ----------------------------------------------------------------------


class MigrationState:
    """The `source_migrations` row of a one-time source, and the pages acknowledged so far
    (`source_migration_pages`), in the state store."""

    def __init__(self, store: StateStore) -> None:
        self.store = store

    def get(self, source: str) -> dict[str, Any] | None:
        with self.store.read() as conn:
            row = (
                conn.execute(
                    text(
                        "SELECT m.source, m.attempt, m.status, m.keys_seen, m.keys_unmapped,"
                        " m.records, m.dead_letters, m.pages_total,"
                        " (SELECT count(*) FROM source_migration_pages p WHERE p.source ="
                        " m.source AND p.attempt = m.attempt) AS pages_acked,"
                        " m.started_at, m.enqueued_at, m.completed_at"
                        " FROM source_migrations m WHERE m.source = :s"
                    ),
                    {"s": source},
                )
                .mappings()
                .first()
            )
        return dict(row) if row else None

    def start(self, source: str, attempt: str) -> None:
        with self.store.write() as conn:
            conn.execute(
                text(
                    "INSERT INTO source_migrations (source, attempt, status, started_at) VALUES"
                    " (:s, :a, 'running', :now) ON CONFLICT (source) DO UPDATE SET attempt = :a,"
                    " status = 'running', keys_seen = 0, keys_unmapped = 0, records = 0,"
                    " dead_letters = 0, pages_total = NULL, started_at = :now,"
                    " enqueued_at = NULL, completed_at = NULL"
                ),
                {"s": source, "a": attempt, "now": self.store.now()},
            )
            conn.execute(
                text("DELETE FROM source_migration_pages WHERE source = :s AND attempt <> :a"),
                {"s": source, "a": attempt},
            )

    def enqueued(self, source: str, attempt: str, counts: Counts, pages: int) -> None:
        """Every page is on its way; complete at once if they were all acknowledged already."""
        with self.store.write() as conn:
            conn.execute(
                text(
                    "UPDATE source_migrations SET pages_total = :p, keys_seen = :k,"
                    " keys_unmapped = :u, records = :r, dead_letters = :d, enqueued_at = :now,"
                    " status = 'enqueued' WHERE source = :s AND attempt = :a"
                ),
                {
                    "s": source,
                    "a": attempt,
                    "p": pages,
                    "k": counts.keys_seen,
                    "u": counts.keys_unmapped,
                    "r": counts.records,
                    "d": counts.dead_letters,
                    "now": self.store.now(),
                },
            )
            self._complete_if_done(conn, source, attempt)

    def acknowledge(self, source: str, attempt: str, page: int) -> None:
        """Record that every sink committed `page` (and its dead letters are stored); twice is
        harmless (one row per page number)."""
        with self.store.write() as conn:
            # Lock the migration's row first, as `enqueued` does by updating it: the two then run
            # one after the other, and the second sees what the first committed. Otherwise the
            # last page's acknowledgement and `enqueued` could each miss the other, leaving a
            # migration whose pages are all in `enqueued` forever (and the next run would redo it).
            conn.execute(
                text(
                    "UPDATE source_migrations SET status = status"
                    " WHERE source = :s AND attempt = :a"
                ),
                {"s": source, "a": attempt},
            )
            conn.execute(
                text(
                    "INSERT INTO source_migration_pages (source, attempt, page)"
                    " SELECT source, attempt, :p FROM source_migrations"
                    " WHERE source = :s AND attempt = :a ON CONFLICT DO NOTHING"
                ),
                {"s": source, "a": attempt, "p": page},
            )
            self._complete_if_done(conn, source, attempt)

    def _complete_if_done(self, conn: Connection, source: str, attempt: str) -> None:
        conn.execute(
            text(
                "UPDATE source_migrations SET status = 'complete', completed_at = :now"
                " WHERE source = :s AND attempt = :a AND status = 'enqueued'"
                " AND (SELECT count(*) FROM source_migration_pages p WHERE p.source = :s"
                " AND p.attempt = :a) >= pages_total"
            ),
            {"s": source, "a": attempt, "now": self.store.now()},
        )


@dataclass(frozen=True)
class MigrationProgress:
    """A one-time migration as `sluice status` shows it: its state, what it saw, and the pages
    every sink committed out of those enqueued (`pages_total` is None until all are)."""

    status: str
    keys_seen: int
    keys_unmapped: int
    records: int
    dead_letters: int
    pages_total: int | None
    pages_acked: int
    started_at: datetime | None
    completed_at: datetime | None

    @classmethod
    def of(cls, row: dict[str, Any]) -> MigrationProgress:
        """From a `MigrationState.get` row."""
        total = row["pages_total"]
        return cls(
            status=str(row["status"]),
            keys_seen=int(row["keys_seen"]),
            keys_unmapped=int(row["keys_unmapped"]),
            records=int(row["records"]),
            dead_letters=int(row["dead_letters"]),
            pages_total=int(total) if total is not None else None,
            pages_acked=int(row["pages_acked"] or 0),
            started_at=_utc(row["started_at"]),
            completed_at=_utc(row["completed_at"]),
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "keys_seen": self.keys_seen,
            "keys_unmapped": self.keys_unmapped,
            "records": self.records,
            "dead_letters": self.dead_letters,
            "pages_total": self.pages_total,
            "pages_acked": self.pages_acked,
            "started_at": self.started_at.isoformat() if self.started_at else None,
            "completed_at": self.completed_at.isoformat() if self.completed_at else None,
        }


def _utc(value: Any) -> datetime | None:
    """A time as the state store returns it (a datetime, or ISO-8601 text in SQLite), in UTC."""
    if value is None:
        return None
    t = datetime.fromisoformat(value) if isinstance(value, str) else value
    assert isinstance(t, datetime)
    return t if t.tzinfo else t.replace(tzinfo=UTC)


@dataclass(kw_only=True)
class KvStatus(SourceStatus):
    """A KV source's own facts: its streams, mode and migration. A one-time migration has no
    lag: once complete there is nothing more to read."""

    mode: str
    streams: list[str]
    migration: MigrationProgress | None = None

    def facts(self) -> dict[str, Any]:
        return {
            "streams": self.streams,
            "mode": self.mode,
            "migration": self.migration.as_dict() if self.migration else None,
        }

    def summary(self) -> str | None:
        m = self.migration
        if m is None:
            return None
        total = m.pages_total if m.pages_total is not None else "?"
        return (
            f"migration {m.status}: {m.keys_seen} keys, {m.records} records,"
            f" {m.dead_letters} dead letters, pages {m.pages_acked}/{total}"
        )


# -- the source ----------------------------------------------------------------------

# Columns the mappers fill from the clock of the read, since the KV data holds no such time: a
# snapshot cannot know what the migration wrote there.
CLOCK_COLUMNS: dict[str, tuple[str, ...]] = {
    "users": ("created_at", "updated_at"),
    "watchlists": ("created_at",),
    "active_positions": ("created_at", "updated_at"),
}
# What a reconcile report says is skipped, per stream. A cache row's times come from the clock
# only when its value has no timestamp (updated_at) and its key no KV expiration (expires_at).
SKIPPED_COLUMNS: dict[str, str] = {
    "users": "created_at, updated_at (time of the migration)",
    "watchlists": "created_at (time of the migration)",
    "active_positions": "created_at, updated_at (time of the migration)",
    "cache": "updated_at when the value has no timestamp of its own, and expires_at when the"
    " key has no KV expiration either (both then come from the migration's clock)",
}


@dataclass
class Counts:
    keys_seen: int = 0
    keys_unmapped: int = 0
    keys_gone: int = 0
    records: int = 0
    dead_letters: int = 0


@dataclass
class Problem:
    """A key (or one item of its value) that cannot become a record."""

    key: str
    stream: str
    message: str
    value: RawValue = None
    extra: dict[str, Any] = field(default_factory=dict)


class KvSource:
    resumes_per_partition = False
    capture: str | None = None  # a KV namespace is read whole: no capture modes
    keeps_deleted = False  # a key deleted from the namespace is expected gone from the sinks
    snapshot_ms: int | None = None  # the clock of the last snapshot (`unknown_columns`)

    def __init__(
        self,
        name: str,
        cfg: KvSourceConfig,
        settings: Settings,
        store: Callable[[], KvStore],
    ) -> None:
        self.name = name
        self.cfg = cfg
        self.settings = settings
        self._open_store = store
        self.stream: Stream = settings.stream(cfg.stream)
        self.anomalies: list[str] = []
        self.counts = Counts()

    @cached_property
    def store(self) -> KvStore:
        # Opened on first read: the ack task opens this source only to record commits, and
        # needs neither the namespace nor its token.
        return self._open_store()

    @cached_property
    def state_store(self) -> StateStore:
        return open_state(self.settings)

    @cached_property
    def state(self) -> MigrationState:
        return MigrationState(self.state_store)

    # -- reading and mapping ------------------------------------------------------------------

    def records(
        self, now_ms: int, on_problem: Callable[[Problem], None]
    ) -> Iterator[tuple[Stream, list[Any]]]:
        """Every record the namespace holds, parents first, in its stream's column order."""
        keys = self.cfg.ordered_keys()
        compiled = [(compile_pattern(k.pattern), k.stream) for k in keys]
        ctx = MapContext(now_ms=now_ms, cache_ttl_ms=int(self.cfg.cache_ttl_seconds * 1000))
        listed: set[str] = set()  # prefixes may overlap: each key is counted and mapped once
        for index, ((_, prefix), stream_name) in enumerate(compiled):
            stream = self.settings.stream(stream_name)
            batch: list[tuple[KeyInfo, dict[str, str]]] = []
            for info in self.store.list_keys(prefix):
                first_seen = info.name not in listed
                if first_seen:
                    listed.add(info.name)
                    self.counts.keys_seen += 1
                owner = next(
                    (
                        (i, m)
                        for i, ((rx, _), _) in enumerate(compiled)
                        if (m := rx.match(info.name))
                    ),
                    None,
                )
                if owner is None:
                    self.counts.keys_unmapped += first_seen
                    continue
                if owner[0] != index:
                    continue  # another pattern (listed under its own prefix) maps it
                batch.append((info, owner[1].groupdict()))
                if len(batch) >= BULK_GET_MAX:
                    yield from self._map_batch(batch, stream, ctx, on_problem)
                    batch = []
            if batch:
                yield from self._map_batch(batch, stream, ctx, on_problem)
        self.anomalies.extend(getattr(self.store, "anomalies", []))

    def _map_batch(
        self,
        batch: list[tuple[KeyInfo, dict[str, str]]],
        stream: Stream,
        ctx: MapContext,
        on_problem: Callable[[Problem], None],
    ) -> Iterator[tuple[Stream, list[Any]]]:
        values = self.store.get_values([info.name for info, _ in batch])
        mapper = MAPPERS[stream.name]
        names = stream.column_names
        for info, groups in batch:
            raw = values.get(info.name)
            if raw is None:
                self.counts.keys_gone += 1  # deleted or expired between list and read
                continue
            if isinstance(raw, Unreadable):
                on_problem(Problem(info.name, stream.name, raw.reason))
                continue
            if isinstance(raw, bytes):
                on_problem(Problem(info.name, stream.name, "value is not UTF-8 text", raw))
                continue
            try:
                value = orjson.loads(raw)
            except orjson.JSONDecodeError as exc:
                on_problem(Problem(info.name, stream.name, f"value is not JSON: {exc}", raw))
                continue
            entry = KvEntry(info.name, value, info.expiration, info.metadata)
            try:
                mapped = mapper(entry, groups, ctx)
            except MappingError as exc:
                on_problem(
                    Problem(info.name, stream.name, f"cannot map to {stream.name}: {exc}", raw)
                )
                continue
            for n, message in enumerate(mapped.problems):
                key = info.name if len(mapped.problems) == 1 else f"{info.name}#{n}"
                on_problem(
                    Problem(key, stream.name, f"cannot map to {stream.name}: {message}", raw)
                )
            for row in mapped.rows:
                yield stream, [row.get(c) for c in names]

    def read_key(self, stream_name: str, key: str) -> list[list[Any]] | None:
        """The records of `stream_name` the namespace holds now for `key`, read alone (a dead
        letter's re-fetch): `key` is a KV key one of the stream's patterns maps (every record
        it maps to), or a record key (the record of the stream with that key). None when the
        namespace no longer holds it; a value that still cannot be mapped raises, naming why."""
        stream = self.settings.stream(stream_name)
        patterns = [
            compile_pattern(k.pattern) for k in self.cfg.ordered_keys() if k.stream == stream_name
        ]
        if not patterns:
            raise SourceError(
                f"no key pattern of this source maps to stream {stream_name!r}", source=self.name
            )
        ctx = MapContext(
            now_ms=int(time.time() * 1000), cache_ttl_ms=int(self.cfg.cache_ttl_seconds * 1000)
        )
        problems: list[Problem] = []
        for rx, _ in patterns:
            m = rx.match(key)
            if m is None:
                continue
            info = next((i for i in self.store.list_keys(key) if i.name == key), None)
            if info is None:
                return None
            rows = list(self._map_batch([(info, m.groupdict())], stream, ctx, problems.append))
            if problems:
                raise SourceError(problems[0].message, source=self.name, key=key)
            return [row for _, row in rows] or None
        for rx, prefix in patterns:  # a record key: find the KV key that holds the record
            for info in self.store.list_keys(prefix):
                m = rx.match(info.name)
                if m is None:
                    continue
                for _, row in self._map_batch(
                    [(info, m.groupdict())], stream, ctx, problems.append
                ):
                    if record_key(stream, row) == key:
                        return [row]
        return None

    def snapshot(self, now_ms: int | None = None) -> Iterator[tuple[str, list[Any]]]:
        """(stream, row) for every record the namespace holds, read-only: nothing is enqueued,
        no dead letter is sent, no state is written. Times the KV data does not carry (users'
        created_at, …) are `now_ms` (default: the time of this call), not of the migration;
        `sluice reconcile` passes its own to tell those values apart."""
        if now_ms is None:
            now_ms = int(time.time() * 1000)
        self.snapshot_ms = now_ms
        for stream, row in self.records(now_ms, lambda p: None):
            yield stream.name, row

    def unknown_columns(self, stream: Stream, row: Sequence[Any]) -> set[str]:
        """The columns of this row of the last snapshot that came from its clock: always those
        of CLOCK_COLUMNS; a cache row's times when they equal that clock (the value had no
        timestamp, the key no expiration)."""
        skip = set(CLOCK_COLUMNS.get(stream.name, ()))
        now_ms = self.snapshot_ms
        if stream.name == "cache" and now_ms is not None:
            names = stream.column_names
            ttl_ms = int(self.cfg.cache_ttl_seconds * 1000)
            if row[names.index("updated_at")] == now_ms:
                skip.add("updated_at")
            if row[names.index("expires_at")] == now_ms + ttl_ms:
                skip.add("expires_at")
        return skip

    def skipped_columns(self, stream: str) -> str | None:
        return SKIPPED_COLUMNS.get(stream)

    def status(self, state: StateStore | None) -> KvStatus:
        """Mode, streams, and the migration's progress (`source_migrations`) from `state`."""
        out = KvStatus(mode=self.cfg.mode, streams=list(self.cfg.streams))
        if state is not None:

            def migration() -> MigrationProgress | None:
                found = MigrationState(state).get(self.name)
                return MigrationProgress.of(found) if found is not None else None

            out.migration = out.read("migration", migration)
        m = out.migration
        if m is not None:
            # Keys not yet committed everywhere have waited since the migration started.
            out.caught_up = m.status == "complete"
            out.oldest_unprocessed = None if out.caught_up else m.started_at
        return out

    # -- the Source interface -----------------------------------------------------------------

    def pages(self, after: Any | None, max_pages: int) -> Iterator[SourcePage]:
        if after is not None:
            log.info("source %s: pages of the last run are in flight; nothing to do", self.name)
            return
        state = self._state_call(self.state.get, self.name)
        if state is not None and state["status"] == "complete" and self.cfg.once:
            log.info("source %s: migration complete; nothing to do", self.name)
            return
        attempt = uuid.uuid4().hex
        self._state_call(self.state.start, self.name, attempt)
        self.counts = Counts()
        problems: list[Problem] = []
        page_size = self.settings.pipeline.page_size
        pages = 0
        rows: list[list[Any]] = []
        current: Stream | None = None
        for stream, row in self.records(int(time.time() * 1000), problems.append):
            if current is not None and (stream is not current or len(rows) >= page_size):
                yield self._page(current, rows, attempt, pages)
                pages, rows = pages + 1, []
            current = stream
            rows.append(row)
            self.counts.records += 1
            if len(problems) >= page_size:
                yield self._letters(problems, attempt, pages)
                pages += 1
        if current is not None and rows:
            yield self._page(current, rows, attempt, pages)
            pages += 1
        if problems:
            yield self._letters(problems, attempt, pages)
            pages += 1
        if self.counts.keys_gone:
            self.anomalies.append(f"{self.counts.keys_gone} key(s) gone between list and read")
        self._state_call(self.state.enqueued, self.name, attempt, self.counts, pages)

    def _state_call(self, fn: Callable[..., Any], *args: Any) -> Any:
        try:
            return fn(*args)
        except SQLAlchemyError as exc:  # the state database is down: the next run retries
            raise TransientSourceError(
                f"migration state unavailable: {type(exc).__name__}", source=self.name
            ) from exc

    def _page(self, stream: Stream, rows: list[list[Any]], attempt: str, n: int) -> SourcePage:
        return SourcePage(
            rows=rows, ack={"attempt": attempt, "page": n}, last_key=n, stream=stream.name
        )

    def _letters(self, problems: list[Problem], attempt: str, n: int) -> SourcePage:
        """A page of the migration holding only dead letters: the keys that cannot become
        records, each with its whole value. It counts like any page: the migration is complete
        only once they are stored. `dlq replay` skips them: the fix is in the KV data, then a
        new migration run."""
        rejected = [
            SourceReject(
                key=p.key,
                item={"kv_key": p.key, "value": p.value},
                error=f"key {p.key!r}: {p.message}",
                error_class="KvMappingError",
                stream=p.stream,
            )
            for p in problems
        ]
        self.counts.dead_letters += len(problems)
        problems.clear()
        return SourcePage(
            rows=[], ack={"attempt": attempt, "page": n}, last_key=n, rejected=rejected
        )

    def acknowledge(self, ack: Any) -> None:
        try:
            self.state.acknowledge(self.name, str(ack["attempt"]), int(ack["page"]))
        except (KeyError, ValueError, TypeError) as exc:
            raise SourceError(f"malformed acknowledgement: {exc}", source=self.name) from exc
        except SQLAlchemyError as exc:  # the state database is down: retried by the ack task
            raise TransientSourceError(
                f"could not record the page: {type(exc).__name__}", source=self.name
            ) from exc

    def close(self) -> None:
        if "store" in self.__dict__:
            self.store.close()
        if "state_store" in self.__dict__:
            self.state_store.dispose()


def open_kv_source(name: str, cfg: KvSourceConfig, settings: Settings) -> KvSource:
    def open_store() -> KvStore:
        if cfg.mode == "local":
            if cfg.path:
                return KvJsonFile(Path(cfg.path))
            assert cfg.wrangler_state and cfg.namespace_id
            return KvWranglerState(Path(cfg.wrangler_state), cfg.namespace_id)
        token = settings.secret(cfg.api_token_env)
        if not token:
            raise SourceError(f"remote KV needs an API token in ${cfg.api_token_env}", source=name)
        assert cfg.account_id and cfg.namespace_id
        return KvRestClient(
            account_id=cfg.account_id,
            namespace_id=cfg.namespace_id,
            api_token=token,
            base_url=cfg.base_url,
            list_limit=cfg.list_limit,
            max_attempts=cfg.max_attempts,
        )

    return KvSource(name, cfg, settings, open_store)
