-- Sluice core schema for SQLite, D1-compatible: applies unchanged with
-- `wrangler d1 execute DB --local --file=schema/sqlite/0001_core.sql`
-- (no BEGIN/COMMIT, no PRAGMA outside D1's allowlist, no ATTACH, no _cf_ names).
-- Times are ISO-8601 UTC text; every statement is idempotent (IF NOT EXISTS).

CREATE TABLE IF NOT EXISTS usage_events (
    id               TEXT PRIMARY KEY,
    organisation_id  TEXT NOT NULL,
    project_id       TEXT,
    idempotency_key  TEXT NOT NULL,
    metric_name      TEXT NOT NULL,
    metric_value     REAL NOT NULL,
    unit             TEXT,
    "timestamp"      TEXT NOT NULL,
    metadata         TEXT,
    ingested_at      TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);
CREATE UNIQUE INDEX IF NOT EXISTS idx_usage_events_idempotency_key
    ON usage_events (idempotency_key);
CREATE INDEX IF NOT EXISTS idx_usage_events_org_time
    ON usage_events (organisation_id, "timestamp");

CREATE TABLE IF NOT EXISTS ingestion_runs (
    page_id       TEXT NOT NULL,
    sink          TEXT NOT NULL,
    stream        TEXT NOT NULL,
    source        TEXT NOT NULL,
    run_id        TEXT NOT NULL,
    received      INTEGER NOT NULL,
    inserted      INTEGER NOT NULL,
    duplicates    INTEGER NOT NULL,
    invalid       INTEGER NOT NULL,
    attempts      INTEGER NOT NULL DEFAULT 1,
    started_at    TEXT NOT NULL,
    committed_at  TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    PRIMARY KEY (page_id, sink)
);
CREATE INDEX IF NOT EXISTS idx_ingestion_runs_stream_time
    ON ingestion_runs (stream, committed_at);
CREATE INDEX IF NOT EXISTS idx_ingestion_runs_run ON ingestion_runs (run_id);

CREATE TABLE IF NOT EXISTS source_runs (
    run_id       TEXT PRIMARY KEY,
    source       TEXT NOT NULL,
    stream       TEXT NOT NULL,
    started_at   TEXT NOT NULL,
    finished_at  TEXT,
    status       TEXT NOT NULL,
    pages        INTEGER NOT NULL DEFAULT 0,
    records      INTEGER NOT NULL DEFAULT 0,
    error        TEXT
);
CREATE INDEX IF NOT EXISTS idx_source_runs_source_time ON source_runs (source, started_at);

CREATE TABLE IF NOT EXISTS source_progress (
    source      TEXT NOT NULL,
    partition   TEXT NOT NULL DEFAULT '',
    cursor      TEXT NOT NULL,
    updated_at  TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    PRIMARY KEY (source, partition)
);

CREATE TABLE IF NOT EXISTS failed_ingestions (
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
    UNIQUE (stream, sink, record_key)
);
CREATE INDEX IF NOT EXISTS idx_failed_ingestions_status
    ON failed_ingestions (status, stream, error_class);
