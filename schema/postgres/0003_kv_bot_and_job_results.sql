-- The Telegram bot's tables migrated from Workers KV, the scheduled-jobs service's report
-- snapshots, and the state of one-time KV migrations. Idempotent (IF NOT EXISTS) so the file
-- applies twice.
-- Times of the bot's tables are epoch milliseconds (BIGINT: they overflow INTEGER).

CREATE TABLE IF NOT EXISTS users (
    chat_id              TEXT PRIMARY KEY,
    subscription_status  INTEGER NOT NULL DEFAULT 1,
    created_at           BIGINT NOT NULL,
    updated_at           BIGINT NOT NULL
);
CREATE INDEX IF NOT EXISTS idx_users_subscription_status ON users (subscription_status);

CREATE TABLE IF NOT EXISTS watchlists (
    id          BIGSERIAL PRIMARY KEY,
    chat_id     TEXT NOT NULL REFERENCES users (chat_id) ON DELETE CASCADE,
    ticker      TEXT NOT NULL,
    created_at  BIGINT NOT NULL,
    UNIQUE (chat_id, ticker)
);
CREATE INDEX IF NOT EXISTS idx_watchlists_chat_id ON watchlists (chat_id);
CREATE INDEX IF NOT EXISTS idx_watchlists_ticker ON watchlists (ticker);

-- The UNIQUE key is ours (the seed has none): it makes the migration idempotent.
CREATE TABLE IF NOT EXISTS executions (
    id               BIGSERIAL PRIMARY KEY,
    chat_id          TEXT NOT NULL REFERENCES users (chat_id) ON DELETE CASCADE,
    signal_type      TEXT NOT NULL CHECK (signal_type IN ('BUY', 'SELL')),
    ticker           TEXT NOT NULL,
    execution_price  DOUBLE PRECISION NOT NULL,
    signal_price     DOUBLE PRECISION,
    execution_date   BIGINT NOT NULL,
    created_at       BIGINT NOT NULL,
    UNIQUE (chat_id, execution_date, ticker, signal_type)
);
CREATE INDEX IF NOT EXISTS idx_executions_chat_id ON executions (chat_id);
CREATE INDEX IF NOT EXISTS idx_executions_chat_id_ticker ON executions (chat_id, ticker);
CREATE INDEX IF NOT EXISTS idx_executions_execution_date ON executions (execution_date DESC);

CREATE TABLE IF NOT EXISTS active_positions (
    id           BIGSERIAL PRIMARY KEY,
    chat_id      TEXT NOT NULL REFERENCES users (chat_id) ON DELETE CASCADE,
    ticker       TEXT NOT NULL,
    entry_price  DOUBLE PRECISION NOT NULL,
    created_at   BIGINT NOT NULL,
    updated_at   BIGINT NOT NULL,
    UNIQUE (chat_id, ticker)
);
CREATE INDEX IF NOT EXISTS idx_active_positions_chat_id ON active_positions (chat_id);
CREATE INDEX IF NOT EXISTS idx_active_positions_ticker ON active_positions (ticker);

CREATE TABLE IF NOT EXISTS cache (
    cache_key    TEXT PRIMARY KEY,
    cache_value  TEXT NOT NULL,
    expires_at   BIGINT NOT NULL,
    updated_at   BIGINT NOT NULL
);
CREATE INDEX IF NOT EXISTS idx_cache_expires_at ON cache (expires_at);

-- Report snapshots of the scheduled-jobs service, upserted by (scheduled_date, report_type).
CREATE TABLE IF NOT EXISTS scheduled_job_results (
    id              BIGSERIAL PRIMARY KEY,
    scheduled_date  TEXT NOT NULL,
    report_type     TEXT NOT NULL,
    report_content  TEXT,
    metadata        TEXT,
    trigger_source  TEXT DEFAULT 'unknown',
    created_at      TIMESTAMPTZ DEFAULT now(),
    UNIQUE (scheduled_date, report_type)
);
CREATE INDEX IF NOT EXISTS idx_scheduled_results_date
    ON scheduled_job_results (scheduled_date DESC);
CREATE INDEX IF NOT EXISTS idx_scheduled_results_type ON scheduled_job_results (report_type);
CREATE INDEX IF NOT EXISTS idx_scheduled_results_created
    ON scheduled_job_results (created_at DESC);

-- One-time sources (a KV namespace migrated to tables): which attempt ran, what it saw, and
-- whether every page it enqueued has been committed by every sink (status 'complete').
CREATE TABLE IF NOT EXISTS source_migrations (
    source         TEXT PRIMARY KEY,
    attempt        TEXT NOT NULL,
    status         TEXT NOT NULL CHECK (status IN ('running', 'enqueued', 'complete')),
    keys_seen      INTEGER NOT NULL DEFAULT 0,
    keys_unmapped  INTEGER NOT NULL DEFAULT 0,
    records        INTEGER NOT NULL DEFAULT 0,
    dead_letters   INTEGER NOT NULL DEFAULT 0,
    pages_total    INTEGER,
    pages_acked    INTEGER[] NOT NULL DEFAULT '{}',
    started_at     TIMESTAMPTZ NOT NULL DEFAULT now(),
    enqueued_at    TIMESTAMPTZ,
    completed_at   TIMESTAMPTZ
);
