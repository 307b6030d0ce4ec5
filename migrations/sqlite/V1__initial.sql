-- Initial schema of the embedded store.
--
-- Every hot query is keyed by the recipient's user id (inbox, sessions, memberships), so the same
-- shape can later be distributed by user id. Ids are AUTOINCREMENT so a deleted account's or
-- group's id is never handed out again: nothing stamped with an old id can be mistaken for a
-- new owner's.

CREATE TABLE users (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    username      TEXT    NOT NULL,
    -- Case-folded username: uniqueness is decided here, not on the display spelling.
    username_key  TEXT    NOT NULL UNIQUE,
    display_name  TEXT    NOT NULL,
    password_hash TEXT    NOT NULL,
    -- Highest seq any device of the user acknowledged. A new device (a fresh login) starts its
    -- cursor here: it receives what no device has seen yet, and reads older messages through
    -- history instead of replaying the whole inbox.
    acked_seq     INTEGER NOT NULL DEFAULT 0,
    created_at    INTEGER NOT NULL
);

-- One row per logged-in device; the row id is the device id and owns the cursor.
CREATE TABLE sessions (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    user_id     INTEGER NOT NULL REFERENCES users (id),
    device_name TEXT    NOT NULL,
    -- SHA-256 of the token; the token itself is never stored.
    token_hash  BLOB    NOT NULL UNIQUE,
    expires_at  INTEGER NOT NULL,
    acked_seq   INTEGER NOT NULL DEFAULT 0,
    created_at  INTEGER NOT NULL
);

CREATE INDEX sessions_by_user ON sessions (user_id);

-- The body is stored once; inbox rows point at it. Senders are deliberately not foreign keys:
-- messages outlive the accounts that sent or received them, and carry the sender's name as it
-- was at send time.
CREATE TABLE messages (
    id                  INTEGER PRIMARY KEY AUTOINCREMENT,
    sender_id           INTEGER NOT NULL,
    sender_username     TEXT    NOT NULL,
    sender_display_name TEXT    NOT NULL,
    to_user_id          INTEGER,
    to_group_id         INTEGER,
    client_msg_id       TEXT    NOT NULL,
    body                BLOB    NOT NULL,
    content_type        TEXT    NOT NULL,
    server_time         INTEGER NOT NULL,
    UNIQUE (sender_id, client_msg_id),
    CHECK ((to_user_id IS NULL) <> (to_group_id IS NULL))
);

-- A page of history is one range scan of one of these, newest first (every index ends with
-- the rowid, which is the message id). A direct conversation is keyed by its two users, lower
-- id first, so both sides' messages share one range; integer keys keep the entries, which
-- every append adds at a scattered place, small.
CREATE INDEX messages_by_pair ON messages (min(sender_id, to_user_id), max(sender_id, to_user_id))
    WHERE to_user_id IS NOT NULL;
CREATE INDEX messages_by_group ON messages (to_group_id) WHERE to_group_id IS NOT NULL;

-- Per-user delivery log: seq is dense per user (1, 2, 3, ...) and the primary key clusters a
-- user's entries so replay after a cursor is one range scan. The primary key is also the seq
-- counter: a user's newest seq is max(seq), one index seek, and the store's single writer hands
-- out the next ones in commit order (no counter row to rewrite on every append). So a user's
-- newest entry must never be deleted while the account exists, or its seq would be reused.
CREATE TABLE inbox (
    user_id    INTEGER NOT NULL REFERENCES users (id),
    seq        INTEGER NOT NULL,
    message_id INTEGER NOT NULL REFERENCES messages (id),
    PRIMARY KEY (user_id, seq)
) WITHOUT ROWID;

CREATE TABLE groups (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    name       TEXT    NOT NULL,
    created_at INTEGER NOT NULL
);

-- A rowid table on purpose: the rowid breaks ties between members who joined in the same
-- millisecond, so "longest-standing member" is always one well-defined row.
CREATE TABLE group_members (
    group_id  INTEGER NOT NULL REFERENCES groups (id),
    user_id   INTEGER NOT NULL REFERENCES users (id),
    admin     INTEGER NOT NULL DEFAULT 0 CHECK (admin IN (0, 1)),
    joined_at INTEGER NOT NULL,
    PRIMARY KEY (group_id, user_id)
);

CREATE INDEX group_members_by_user ON group_members (user_id);
