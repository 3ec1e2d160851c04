-- Sluice 0006: what dead-letter paging, run history and repairs of dead letters need.
-- Every statement is idempotent (IF NOT EXISTS): it applies twice.

-- A run is a scheduled or manual run of a source ("produce") or a backfill of a range;
-- `detail` holds a backfill's progress (windows done and total) as JSON text.
ALTER TABLE source_runs ADD COLUMN IF NOT EXISTS kind TEXT NOT NULL DEFAULT 'produce';
ALTER TABLE source_runs ADD COLUMN IF NOT EXISTS detail TEXT;

-- A dead letter repaired by hand or re-read from its source: the record as it was queued, and
-- when. `record` itself stays as it arrived, so every repair can be audited.
ALTER TABLE failed_ingestions ADD COLUMN IF NOT EXISTS fixed_record BYTEA;
ALTER TABLE failed_ingestions ADD COLUMN IF NOT EXISTS fixed_how TEXT;
ALTER TABLE failed_ingestions ADD COLUMN IF NOT EXISTS fixed_at TIMESTAMPTZ;
-- The run whose page carried the record, so a run shows every dead letter it left.
ALTER TABLE failed_ingestions ADD COLUMN IF NOT EXISTS run_id TEXT;

-- Run history newest first, keyset on (started_at, run_id): all runs, or one source's, one
-- status's, one kind's.
CREATE INDEX IF NOT EXISTS idx_source_runs_keyset ON source_runs (started_at DESC, run_id DESC);
CREATE INDEX IF NOT EXISTS idx_source_runs_source_keyset
    ON source_runs (source, started_at DESC, run_id DESC);
CREATE INDEX IF NOT EXISTS idx_source_runs_status_keyset
    ON source_runs (status, started_at DESC, run_id DESC);
CREATE INDEX IF NOT EXISTS idx_source_runs_kind_keyset
    ON source_runs (kind, started_at DESC, run_id DESC);

-- Grouped counts per error class with their first and last time, read from the index alone.
CREATE INDEX IF NOT EXISTS idx_failed_ingestions_class_times
    ON failed_ingestions (status, error_class, first_failed_at, last_failed_at);
-- A run's dead letters: by its id, or (letters stored before they carried it) by its pages.
CREATE INDEX IF NOT EXISTS idx_failed_ingestions_run ON failed_ingestions (run_id);
CREATE INDEX IF NOT EXISTS idx_failed_ingestions_page ON failed_ingestions (page_id);

-- Text search in keys and errors (`--text`): trigram indexes, where the server has pg_trgm and
-- lets this database create it; without them the search reads the letters it filters. The block
-- is a quoted string (not $$) so that statement splitters that know only quotes keep it whole.
DO '
BEGIN
    IF EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = ''pg_trgm'') THEN
        BEGIN
            CREATE EXTENSION IF NOT EXISTS pg_trgm;
        EXCEPTION WHEN insufficient_privilege THEN
            RAISE NOTICE ''pg_trgm not created (%): text search reads every letter'', SQLERRM;
        END;
    END IF;
    IF EXISTS (SELECT 1 FROM pg_extension WHERE extname = ''pg_trgm'') THEN
        CREATE INDEX IF NOT EXISTS idx_failed_ingestions_key_trgm
            ON failed_ingestions USING gin (record_key gin_trgm_ops);
        CREATE INDEX IF NOT EXISTS idx_failed_ingestions_class_trgm
            ON failed_ingestions USING gin (error_class gin_trgm_ops);
        CREATE INDEX IF NOT EXISTS idx_failed_ingestions_message_trgm
            ON failed_ingestions USING gin (error_message gin_trgm_ops);
    END IF;
END
';
