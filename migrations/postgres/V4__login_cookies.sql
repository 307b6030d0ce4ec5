-- Login cookies (the "device cookie" defence against lockout): a successful Login hands the
-- device an opaque random cookie; its later Logins of the same account present it and get a
-- failed-login budget of their own, so an attacker exhausting the account's shared budget
-- cannot lock out the owner's known devices. Only the SHA-256 of a cookie is stored. Keyed by
-- the user first, like every hot table (distributable by user id): the Login that checks a
-- cookie already knows the account. The daemon keeps a bounded number per user (the most
-- recently used) and deletes them with the account and on a password change.

CREATE TABLE login_cookies (
    user_id      BIGINT      NOT NULL REFERENCES users (id),
    cookie_hash  BYTEA       NOT NULL CHECK (length(cookie_hash) = 32),
    created_at   BIGINT      NOT NULL,
    last_used_at BIGINT      NOT NULL,
    PRIMARY KEY (user_id, cookie_hash)
);

CREATE INDEX login_cookies_by_use ON login_cookies (user_id, last_used_at);
