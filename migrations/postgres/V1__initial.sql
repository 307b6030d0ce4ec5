-- Initial schema of the PostgreSQL store: the same logical schema as migrations/sqlite.
--
-- Every hot query is keyed by the recipient's user id (inbox, sessions, memberships), so these
-- tables can later be distributed by user id (Citus or a PostgreSQL-wire distributed engine)
-- without changing the daemon. Ids are identities that are never handed out twice, so nothing
-- stamped with a deleted account's or group's id can be mistaken for a new owner's.

CREATE TABLE users (
    id            BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    username      TEXT   NOT NULL,
    -- Case-folded username: uniqueness is decided here, not on the display spelling.
    username_key  TEXT   NOT NULL UNIQUE,
    display_name  TEXT   NOT NULL,
    password_hash TEXT   NOT NULL,
    -- Highest seq any device of the user acknowledged: where a new device's cursor starts.
    acked_seq     BIGINT NOT NULL DEFAULT 0,
    -- The newest seq handed out in this user's inbox. Several daemons append concurrently, so
    -- the counter lives in the row that each appending transaction locks: whoever holds the
    -- lock hands out the next seq and commits before the next holder reads it, which makes
    -- seq order equal commit order.
    last_seq      BIGINT NOT NULL DEFAULT 0,
    created_at    BIGINT NOT NULL
);

-- One row per logged-in device; the row id is the device id and owns the cursor.
CREATE TABLE sessions (
    id          BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    user_id     BIGINT NOT NULL REFERENCES users (id),
    device_name TEXT   NOT NULL,
    -- SHA-256 of the token; the token itself is never stored.
    token_hash  BYTEA  NOT NULL UNIQUE,
    expires_at  BIGINT NOT NULL,
    acked_seq   BIGINT NOT NULL DEFAULT 0,
    created_at  BIGINT NOT NULL
);

CREATE INDEX sessions_by_user ON sessions (user_id);

-- The body is stored once; inbox rows point at it. Senders are deliberately not foreign keys:
-- messages outlive the accounts that sent or received them, and carry the sender's name as it
-- was at send time.
CREATE TABLE messages (
    id                  BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    sender_id           BIGINT NOT NULL,
    sender_username     TEXT   NOT NULL,
    sender_display_name TEXT   NOT NULL,
    to_user_id          BIGINT,
    to_group_id         BIGINT,
    client_msg_id       TEXT   NOT NULL,
    body                BYTEA  NOT NULL,
    content_type        TEXT   NOT NULL,
    server_time         BIGINT NOT NULL,
    -- The idempotency key: a retried send finds its first message here.
    UNIQUE (sender_id, client_msg_id),
    CHECK ((to_user_id IS NULL) <> (to_group_id IS NULL))
);

-- A page of history is one backward range scan: a direct conversation is keyed by its two
-- users, lower id first, so both sides' messages share one range.
CREATE INDEX messages_by_pair
    ON messages (LEAST(sender_id, to_user_id), GREATEST(sender_id, to_user_id), id)
    WHERE to_user_id IS NOT NULL;
CREATE INDEX messages_by_group ON messages (to_group_id, id) WHERE to_group_id IS NOT NULL;

-- Per-user delivery log: seq is dense per user (1, 2, 3, ...); replay after a cursor is one
-- range scan of the primary key.
CREATE TABLE inbox (
    user_id    BIGINT NOT NULL REFERENCES users (id),
    seq        BIGINT NOT NULL,
    message_id BIGINT NOT NULL REFERENCES messages (id),
    PRIMARY KEY (user_id, seq)
);

CREATE TABLE groups (
    id         BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name       TEXT   NOT NULL,
    created_at BIGINT NOT NULL
);

CREATE TABLE group_members (
    group_id  BIGINT  NOT NULL REFERENCES groups (id),
    user_id   BIGINT  NOT NULL REFERENCES users (id),
    admin     BOOLEAN NOT NULL DEFAULT FALSE,
    joined_at BIGINT  NOT NULL,
    -- Breaks ties between members who joined in the same millisecond, so "longest-standing
    -- member" is always one well-defined row (SQLite uses its rowid for this).
    joined_order BIGINT GENERATED ALWAYS AS IDENTITY,
    PRIMARY KEY (group_id, user_id)
);

CREATE INDEX group_members_by_user ON group_members (user_id);
