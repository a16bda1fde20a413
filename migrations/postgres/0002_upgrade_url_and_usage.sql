-- A plan's upgrade link, and the usage ledger: one row per metered request (kept for the
-- retention period, TOLLGATE_USAGE_RETENTION_DAYS) and a daily roll-up per customer and route
-- (kept for good). Both are written in one transaction per batch; the roll-up counts only the
-- events that transaction inserted.

ALTER TABLE plans ADD COLUMN upgrade_url TEXT;

CREATE TABLE usage_events (
    id          TEXT PRIMARY KEY,         -- evt_ and 32 hex digits, made by the gateway
    request_id  TEXT NOT NULL,
    customer_id TEXT NOT NULL,            -- no foreign key: usage of an unknown customer is kept
    key_id      TEXT,
    route       TEXT NOT NULL,
    method      TEXT NOT NULL,
    status      BIGINT NOT NULL,
    latency_us  BIGINT NOT NULL,
    bytes_in    BIGINT NOT NULL,
    bytes_out   BIGINT NOT NULL,
    at_ms       BIGINT NOT NULL,
    units       BIGINT NOT NULL,
    overage     BIGINT NOT NULL,
    received_at BIGINT NOT NULL
);
-- A period's sums read this index alone (it covers units and overage).
CREATE INDEX usage_events_by_customer ON usage_events (customer_id, at_ms) INCLUDE (units, overage);
-- Pruning deletes the oldest events first.
CREATE INDEX usage_events_by_time ON usage_events (at_ms);

CREATE TABLE usage_daily (
    customer_id    TEXT NOT NULL,
    day            TEXT NOT NULL,         -- YYYY-MM-DD, the UTC day of at_ms
    route          TEXT NOT NULL,
    requests       BIGINT NOT NULL,
    units          BIGINT NOT NULL,
    overage        BIGINT NOT NULL,
    errors         BIGINT NOT NULL,       -- status >= 500
    bytes_in       BIGINT NOT NULL,
    bytes_out      BIGINT NOT NULL,
    latency_us_sum BIGINT NOT NULL,
    PRIMARY KEY (customer_id, day, route)
);
