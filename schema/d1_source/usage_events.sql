-- The D1-side usage_events table that the D1 source reads: the hot store where usage events
-- land first. Repeated idempotency keys are allowed here (the sinks dedupe them); processed_at is
-- set by Sluice only after every sink has committed the row. D1-compatible.

CREATE TABLE IF NOT EXISTS usage_events (
    id               TEXT PRIMARY KEY,
    organisation_id  TEXT,
    project_id       TEXT,
    idempotency_key  TEXT,
    metric_name      TEXT,
    metric_value     REAL,
    unit             TEXT,
    "timestamp"      TEXT,
    metadata         TEXT,
    created_at       TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    processed_at     TEXT
);
-- processed_at alone: its entries for NULL are in rowid order, so the source reads unprocessed
-- rows in arrival order without a sort, and a page's rows sit on neighbouring table pages
-- (marking them rewrites a few pages, not one per random id).
CREATE INDEX IF NOT EXISTS idx_usage_events_unprocessed
    ON usage_events (processed_at);
