-- The Telegram bot's tables migrated from Workers KV and the scheduled-jobs service's report
-- snapshots, D1-compatible: no BEGIN/COMMIT, no PRAGMA, no ATTACH; IF NOT EXISTS everywhere so
-- applying twice is harmless. D1 enforces foreign keys by default; our connections turn them on.
-- Times of the bot's tables are epoch milliseconds (the bot's Date.now()).

CREATE TABLE IF NOT EXISTS users (
    chat_id TEXT PRIMARY KEY,
    subscription_status INTEGER NOT NULL DEFAULT 1,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS idx_users_subscription_status ON users(subscription_status);

CREATE TABLE IF NOT EXISTS watchlists (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    chat_id TEXT NOT NULL,
    ticker TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    FOREIGN KEY(chat_id) REFERENCES users(chat_id) ON DELETE CASCADE,
    UNIQUE(chat_id, ticker)
);
CREATE INDEX IF NOT EXISTS idx_watchlists_chat_id ON watchlists(chat_id);
CREATE INDEX IF NOT EXISTS idx_watchlists_ticker ON watchlists(ticker);

-- The UNIQUE key is ours (the seed has none): it makes the migration idempotent.
CREATE TABLE IF NOT EXISTS executions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    chat_id TEXT NOT NULL,
    signal_type TEXT NOT NULL CHECK(signal_type IN ('BUY', 'SELL')),
    ticker TEXT NOT NULL,
    execution_price REAL NOT NULL,
    signal_price REAL,
    execution_date INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    FOREIGN KEY(chat_id) REFERENCES users(chat_id) ON DELETE CASCADE,
    UNIQUE(chat_id, execution_date, ticker, signal_type)
);
CREATE INDEX IF NOT EXISTS idx_executions_chat_id ON executions(chat_id);
CREATE INDEX IF NOT EXISTS idx_executions_chat_id_ticker ON executions(chat_id, ticker);
CREATE INDEX IF NOT EXISTS idx_executions_execution_date ON executions(execution_date DESC);

CREATE TABLE IF NOT EXISTS active_positions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    chat_id TEXT NOT NULL,
    ticker TEXT NOT NULL,
    entry_price REAL NOT NULL,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    FOREIGN KEY(chat_id) REFERENCES users(chat_id) ON DELETE CASCADE,
    UNIQUE(chat_id, ticker)
);
CREATE INDEX IF NOT EXISTS idx_active_positions_chat_id ON active_positions(chat_id);
CREATE INDEX IF NOT EXISTS idx_active_positions_ticker ON active_positions(ticker);

CREATE TABLE IF NOT EXISTS cache (
    cache_key TEXT PRIMARY KEY,
    cache_value TEXT NOT NULL,
    expires_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS idx_cache_expires_at ON cache(expires_at);

-- Report snapshots of the scheduled-jobs service, upserted by (scheduled_date, report_type).
CREATE TABLE IF NOT EXISTS scheduled_job_results (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    scheduled_date TEXT NOT NULL,
    report_type TEXT NOT NULL,
    report_content TEXT,
    metadata TEXT,
    trigger_source TEXT DEFAULT 'unknown',
    created_at TEXT DEFAULT (datetime('now')),
    UNIQUE(scheduled_date, report_type)
);
CREATE INDEX IF NOT EXISTS idx_scheduled_results_date
    ON scheduled_job_results(scheduled_date DESC);
CREATE INDEX IF NOT EXISTS idx_scheduled_results_type ON scheduled_job_results(report_type);
CREATE INDEX IF NOT EXISTS idx_scheduled_results_created
    ON scheduled_job_results(created_at DESC);
