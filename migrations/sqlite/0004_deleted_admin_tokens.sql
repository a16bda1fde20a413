-- The hashes of admin tokens deleted through the API, so that `TOLLGATE_ADMIN_TOKEN` still set to
-- one of them does not register it again at the next start.
CREATE TABLE deleted_admin_tokens (
    hash       TEXT PRIMARY KEY,          -- hex SHA-256 of the token
    deleted_at BIGINT NOT NULL
);
