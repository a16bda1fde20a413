-- Plans, customers, keys, admins, the audit log, the change log gateways are fed from, and
-- remembered idempotent responses.

CREATE TABLE plans (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL UNIQUE,
    rate_limits TEXT NOT NULL,            -- JSON array of {requests, window_seconds}
    quota       TEXT,                     -- JSON {requests, hard} or NULL
    price       TEXT,                     -- JSON {currency, unit_amount_micros} or NULL
    status      TEXT NOT NULL,            -- active | archived
    created_at  BIGINT NOT NULL,
    updated_at  BIGINT NOT NULL
);
CREATE INDEX plans_by_status ON plans (status, id);

CREATE TABLE customers (
    id           TEXT PRIMARY KEY,
    name         TEXT NOT NULL,
    email        TEXT NOT NULL UNIQUE,
    plan_id      TEXT NOT NULL REFERENCES plans (id),
    status       TEXT NOT NULL,           -- active | suspended
    period_start BIGINT,
    period_end   BIGINT,
    created_at   BIGINT NOT NULL,
    updated_at   BIGINT NOT NULL
);
CREATE INDEX customers_by_plan ON customers (plan_id);

CREATE TABLE api_keys (
    id            TEXT PRIMARY KEY,
    customer_id   TEXT NOT NULL REFERENCES customers (id),
    name          TEXT NOT NULL,
    hash          TEXT NOT NULL UNIQUE,   -- hex SHA-256 of the key
    display_start TEXT NOT NULL,
    scopes        TEXT,                   -- JSON array of route names or NULL
    expires_at    BIGINT,
    revoked_at    BIGINT,
    grace_until   BIGINT,
    created_at    BIGINT NOT NULL
);
CREATE INDEX api_keys_by_customer ON api_keys (customer_id, id);

CREATE TABLE admin_tokens (
    id         TEXT PRIMARY KEY,
    name       TEXT NOT NULL,
    role       TEXT NOT NULL,             -- admin | viewer
    hash       TEXT NOT NULL UNIQUE,      -- hex SHA-256 of the token
    created_at BIGINT NOT NULL
);

CREATE TABLE audit_log (
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,
    at          BIGINT NOT NULL,
    actor       TEXT NOT NULL,
    action      TEXT NOT NULL,
    target_type TEXT NOT NULL,
    target_id   TEXT NOT NULL,
    before_json TEXT,
    after_json  TEXT,
    request_id  TEXT
);
CREATE INDEX audit_log_by_target ON audit_log (target_type, target_id);

CREATE TABLE change_log (
    version   INTEGER PRIMARY KEY AUTOINCREMENT,
    at        BIGINT NOT NULL,
    kind      TEXT NOT NULL,
    entity_id TEXT NOT NULL
);

CREATE TABLE idempotency_keys (
    actor        TEXT NOT NULL,
    key          TEXT NOT NULL,
    path         TEXT NOT NULL,
    request_hash TEXT NOT NULL,
    status       BIGINT NOT NULL,
    response     TEXT NOT NULL,
    created_at   BIGINT NOT NULL,
    PRIMARY KEY (actor, key)
);
