-- Sluice 0004: what it takes to lose nothing and alter nothing.
-- Every statement is idempotent (IF NOT EXISTS, IF EXISTS, guarded blocks): it applies twice.

-- Source order of the row each table holds: when two reads of one key race through the queue,
-- every sink keeps the same one (the first read under `ignore`, the last under `update`).
-- Rows written before this column existed have NULL and are treated as the oldest.
ALTER TABLE usage_events ADD COLUMN IF NOT EXISTS sluice_order BIGINT;
ALTER TABLE historical_prices ADD COLUMN IF NOT EXISTS sluice_order BIGINT;
ALTER TABLE timeseries ADD COLUMN IF NOT EXISTS sluice_order BIGINT;
ALTER TABLE scheduled_job_results ADD COLUMN IF NOT EXISTS sluice_order BIGINT;
ALTER TABLE users ADD COLUMN IF NOT EXISTS sluice_order BIGINT;
ALTER TABLE watchlists ADD COLUMN IF NOT EXISTS sluice_order BIGINT;
ALTER TABLE executions ADD COLUMN IF NOT EXISTS sluice_order BIGINT;
ALTER TABLE active_positions ADD COLUMN IF NOT EXISTS sluice_order BIGINT;
ALTER TABLE cache ADD COLUMN IF NOT EXISTS sluice_order BIGINT;

-- A re-fetched row that changed is `updated`; one equal to what the table holds, `unchanged`.
ALTER TABLE ingestion_runs ADD COLUMN IF NOT EXISTS updated INTEGER NOT NULL DEFAULT 0;
ALTER TABLE ingestion_runs ADD COLUMN IF NOT EXISTS unchanged INTEGER NOT NULL DEFAULT 0;
ALTER TABLE ingestion_runs ADD COLUMN IF NOT EXISTS deleted INTEGER NOT NULL DEFAULT 0;

-- Prices and volumes exactly as the APIs send them ("819993474.31887912"), not as doubles.
DROP VIEW IF EXISTS latest_prices;
ALTER TABLE historical_prices
    ALTER COLUMN open TYPE NUMERIC,
    ALTER COLUMN high TYPE NUMERIC,
    ALTER COLUMN low TYPE NUMERIC,
    ALTER COLUMN close TYPE NUMERIC,
    ALTER COLUMN volume TYPE NUMERIC,
    ALTER COLUMN quote_volume TYPE NUMERIC,
    ALTER COLUMN market_cap TYPE NUMERIC;
CREATE VIEW latest_prices AS
SELECT p.source, p.symbol, p.resolution, p.close AS price, p."timestamp" AS latest_timestamp
FROM historical_prices p
JOIN (
    SELECT source, symbol, resolution, max("timestamp") AS newest
    FROM historical_prices GROUP BY source, symbol, resolution
) m ON m.source = p.source AND m.symbol = p.symbol AND m.resolution = p.resolution
   AND m.newest = p."timestamp";

-- Dead letters: one per rejected record, not per key (two different rows sharing a key are two
-- letters). `record` is the record exactly as it arrived (msgpack: every byte, NUL and escape
-- kept; replay sends it); `payload` shows it as JSON where JSON can hold it. `failed_at` is the
-- time of the latest failure.
ALTER TABLE failed_ingestions ADD COLUMN IF NOT EXISTS record BYTEA;
ALTER TABLE failed_ingestions ADD COLUMN IF NOT EXISTS record_hash TEXT;
ALTER TABLE failed_ingestions ADD COLUMN IF NOT EXISTS record_order BIGINT;
ALTER TABLE failed_ingestions ADD COLUMN IF NOT EXISTS failed_at TIMESTAMPTZ
    GENERATED ALWAYS AS (last_failed_at) STORED;
UPDATE failed_ingestions SET record_hash = 'legacy:' || id WHERE record_hash IS NULL;
ALTER TABLE failed_ingestions ALTER COLUMN record_hash SET NOT NULL;
ALTER TABLE failed_ingestions DROP CONSTRAINT IF EXISTS failed_ingestions_stream_sink_record_key_key;
CREATE UNIQUE INDEX IF NOT EXISTS idx_failed_ingestions_record
    ON failed_ingestions (stream, sink, record_hash);
CREATE INDEX IF NOT EXISTS idx_failed_ingestions_key ON failed_ingestions (record_key);
CREATE INDEX IF NOT EXISTS idx_failed_ingestions_failed_at ON failed_ingestions (failed_at);

-- The pages of a one-time (KV) migration acknowledged so far, one row each.
CREATE TABLE IF NOT EXISTS source_migration_pages (
    source   TEXT NOT NULL,
    attempt  TEXT NOT NULL,
    page     INTEGER NOT NULL,
    PRIMARY KEY (source, attempt, page)
);
-- Copied from the array that held them before; that column is no longer written.
INSERT INTO source_migration_pages (source, attempt, page)
SELECT source, attempt, unnest(pages_acked) FROM source_migrations
ON CONFLICT DO NOTHING;

-- What a D1 source in `snapshot` mode last delivered: a content hash per key.
CREATE TABLE IF NOT EXISTS source_snapshots (
    source  TEXT NOT NULL,
    key     TEXT NOT NULL,
    hash    TEXT NOT NULL,
    PRIMARY KEY (source, key)
);
