-- Sluice 0004 for SQLite, D1-compatible: what it takes to lose nothing and alter nothing.
-- sluice: applies once
-- SQLite has no ADD COLUMN IF NOT EXISTS, so this file changes tables once: `sluice migrate`
-- (or `wrangler d1 migrations apply`) records it as applied in the same transaction and never
-- runs it again. No BEGIN/COMMIT, no PRAGMA, no ATTACH.

-- Source order of the row each table holds: when two reads of one key race through the queue,
-- every sink keeps the same one (the first read under `ignore`, the last under `update`).
-- Rows written before this column existed have NULL and are treated as the oldest.
ALTER TABLE usage_events ADD COLUMN sluice_order INTEGER;
ALTER TABLE historical_prices ADD COLUMN sluice_order INTEGER;
ALTER TABLE timeseries ADD COLUMN sluice_order INTEGER;
ALTER TABLE scheduled_job_results ADD COLUMN sluice_order INTEGER;
ALTER TABLE users ADD COLUMN sluice_order INTEGER;
ALTER TABLE watchlists ADD COLUMN sluice_order INTEGER;
ALTER TABLE executions ADD COLUMN sluice_order INTEGER;
ALTER TABLE active_positions ADD COLUMN sluice_order INTEGER;
ALTER TABLE cache ADD COLUMN sluice_order INTEGER;

-- A re-fetched row that changed is `updated`; one equal to what the table holds, `unchanged`.
ALTER TABLE ingestion_runs ADD COLUMN updated INTEGER NOT NULL DEFAULT 0;
ALTER TABLE ingestion_runs ADD COLUMN unchanged INTEGER NOT NULL DEFAULT 0;
ALTER TABLE ingestion_runs ADD COLUMN deleted INTEGER NOT NULL DEFAULT 0;

-- Dead letters: one per rejected record, not per key (two different rows sharing a key are two
-- letters). `record` is the record exactly as it arrived (msgpack: every byte, NUL and escape
-- kept; replay sends it); `payload` shows it as JSON where JSON can hold it. `failed_at` is the
-- time of the latest failure. Rebuilt: SQLite cannot drop the old UNIQUE (stream, sink, key).
CREATE TABLE failed_ingestions_0004 (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    stream           TEXT NOT NULL,
    sink             TEXT NOT NULL,
    record_key       TEXT NOT NULL,
    source           TEXT NOT NULL,
    page_id          TEXT NOT NULL,
    payload          TEXT NOT NULL,
    error_class      TEXT NOT NULL,
    error_message    TEXT NOT NULL,
    attempts         INTEGER NOT NULL DEFAULT 1,
    status           TEXT NOT NULL DEFAULT 'pending'
                     CHECK (status IN ('pending', 'replayed', 'discarded')),
    replay_count     INTEGER NOT NULL DEFAULT 0,
    first_failed_at  TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    last_failed_at   TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    record           BLOB,
    record_hash      TEXT NOT NULL,
    record_order     INTEGER,
    failed_at        TEXT GENERATED ALWAYS AS (last_failed_at) VIRTUAL
);
INSERT INTO failed_ingestions_0004 (id, stream, sink, record_key, source, page_id, payload,
    error_class, error_message, attempts, status, replay_count, first_failed_at, last_failed_at,
    record_hash)
SELECT id, stream, sink, record_key, source, page_id, payload, error_class, error_message,
    attempts, status, replay_count, first_failed_at, last_failed_at, 'legacy:' || id
FROM failed_ingestions;
DROP TABLE failed_ingestions;
ALTER TABLE failed_ingestions_0004 RENAME TO failed_ingestions;
CREATE UNIQUE INDEX IF NOT EXISTS idx_failed_ingestions_record
    ON failed_ingestions (stream, sink, record_hash);
CREATE INDEX IF NOT EXISTS idx_failed_ingestions_status
    ON failed_ingestions (status, stream, error_class);
CREATE INDEX IF NOT EXISTS idx_failed_ingestions_key ON failed_ingestions (record_key);
CREATE INDEX IF NOT EXISTS idx_failed_ingestions_failed_at ON failed_ingestions (last_failed_at);

-- One-time sources (a KV namespace migrated to tables), when this file is the state store.
CREATE TABLE IF NOT EXISTS source_migrations (
    source         TEXT PRIMARY KEY,
    attempt        TEXT NOT NULL,
    status         TEXT NOT NULL CHECK (status IN ('running', 'enqueued', 'complete')),
    keys_seen      INTEGER NOT NULL DEFAULT 0,
    keys_unmapped  INTEGER NOT NULL DEFAULT 0,
    records        INTEGER NOT NULL DEFAULT 0,
    dead_letters   INTEGER NOT NULL DEFAULT 0,
    pages_total    INTEGER,
    started_at     TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    enqueued_at    TEXT,
    completed_at   TEXT
);
CREATE TABLE IF NOT EXISTS source_migration_pages (
    source   TEXT NOT NULL,
    attempt  TEXT NOT NULL,
    page     INTEGER NOT NULL,
    PRIMARY KEY (source, attempt, page)
);

-- What a D1 source in `snapshot` mode last delivered: a content hash per key.
CREATE TABLE IF NOT EXISTS source_snapshots (
    source  TEXT NOT NULL,
    key     TEXT NOT NULL,
    hash    TEXT NOT NULL,
    PRIMARY KEY (source, key)
);
