-- Answers remembered for `Idempotency-Key` are now kept sealed with a key only the caller holds.
-- Earlier versions kept them in plaintext, and those of the paths that create a key or an admin
-- token held that secret, which is otherwise never stored: they are dropped (a retry of such a
-- request under its old key makes a new key or token).
DELETE FROM idempotency_keys
WHERE path = '/v1/admin-tokens'
   OR (path LIKE '/v1/customers/%/keys')
   OR (path LIKE '/v1/keys/%/rotate');
