-- Sluice 0005 for SQLite, D1-compatible: what the operator's console and `sluice runs` and
-- `sluice source` need.
-- Every statement is idempotent (IF NOT EXISTS): it applies twice. No BEGIN, PRAGMA or ATTACH.

-- Sources an operator paused: beat and `sluice produce` skip them (and say so) until resumed.
CREATE TABLE IF NOT EXISTS source_controls (
    source      TEXT PRIMARY KEY,
    paused      INTEGER NOT NULL DEFAULT 0,
    reason      TEXT,
    changed_at  TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);

-- Run history, newest first: all runs, one source's, one status's (keyset pages on started_at).
CREATE INDEX IF NOT EXISTS idx_source_runs_time ON source_runs (started_at DESC, run_id);
CREATE INDEX IF NOT EXISTS idx_source_runs_status_time ON source_runs (status, started_at DESC);
CREATE INDEX IF NOT EXISTS idx_source_runs_source_status_time
    ON source_runs (source, status, started_at DESC);

-- Dead letters, newest first by id (keyset pages), filtered by status and one more field.
CREATE INDEX IF NOT EXISTS idx_failed_ingestions_status_id ON failed_ingestions (status, id DESC);
CREATE INDEX IF NOT EXISTS idx_failed_ingestions_class_id
    ON failed_ingestions (status, error_class, id DESC);
CREATE INDEX IF NOT EXISTS idx_failed_ingestions_source_id
    ON failed_ingestions (status, source, id DESC);
CREATE INDEX IF NOT EXISTS idx_failed_ingestions_stream_id
    ON failed_ingestions (status, stream, id DESC);
