-- Sluice core schema for PostgreSQL: usage_events (from D1) and the pipeline's state tables.
-- Every statement is idempotent (IF NOT EXISTS) so the file can be applied twice.

CREATE TABLE IF NOT EXISTS usage_events (
    id               TEXT PRIMARY KEY,
    organisation_id  TEXT NOT NULL,
    project_id       TEXT,
    idempotency_key  TEXT NOT NULL,
    metric_name      TEXT NOT NULL,
    metric_value     DOUBLE PRECISION NOT NULL,
    unit             TEXT,
    "timestamp"      TIMESTAMPTZ NOT NULL,
    metadata         JSONB,
    ingested_at      TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX IF NOT EXISTS idx_usage_events_idempotency_key
    ON usage_events (idempotency_key);
CREATE INDEX IF NOT EXISTS idx_usage_events_org_time
    ON usage_events (organisation_id, "timestamp");

-- One row per page per sink, written in the same transaction as the page's records, so the
-- counts are exact even when a page is delivered twice (the second delivery finds the row).
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
    started_at    TIMESTAMPTZ NOT NULL,
    committed_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (page_id, sink)
);
CREATE INDEX IF NOT EXISTS idx_ingestion_runs_stream_time
    ON ingestion_runs (stream, committed_at);
CREATE INDEX IF NOT EXISTS idx_ingestion_runs_run ON ingestion_runs (run_id);

-- One row per producer run of a source.
CREATE TABLE IF NOT EXISTS source_runs (
    run_id       TEXT PRIMARY KEY,
    source       TEXT NOT NULL,
    stream       TEXT NOT NULL,
    started_at   TIMESTAMPTZ NOT NULL,
    finished_at  TIMESTAMPTZ,
    status       TEXT NOT NULL,
    pages        INTEGER NOT NULL DEFAULT 0,
    records      INTEGER NOT NULL DEFAULT 0,
    error        TEXT
);
CREATE INDEX IF NOT EXISTS idx_source_runs_source_time ON source_runs (source, started_at);

-- Incremental cursors of HTTP sources, per source and partition (symbol, point).
CREATE TABLE IF NOT EXISTS source_progress (
    source      TEXT NOT NULL,
    partition   TEXT NOT NULL DEFAULT '',
    cursor      TEXT NOT NULL,
    updated_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (source, partition)
);

-- Dead letters: records that could not be written, one row per (stream, sink, record key).
CREATE TABLE IF NOT EXISTS failed_ingestions (
    id               BIGSERIAL PRIMARY KEY,
    stream           TEXT NOT NULL,
    sink             TEXT NOT NULL,
    record_key       TEXT NOT NULL,
    source           TEXT NOT NULL,
    page_id          TEXT NOT NULL,
    payload          JSONB NOT NULL,
    error_class      TEXT NOT NULL,
    error_message    TEXT NOT NULL,
    attempts         INTEGER NOT NULL DEFAULT 1,
    status           TEXT NOT NULL DEFAULT 'pending'
                     CHECK (status IN ('pending', 'replayed', 'discarded')),
    replay_count     INTEGER NOT NULL DEFAULT 0,
    first_failed_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    last_failed_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    UNIQUE (stream, sink, record_key)
);
CREATE INDEX IF NOT EXISTS idx_failed_ingestions_status
    ON failed_ingestions (status, stream, error_class);
