-- The store's identity, as in the PostgreSQL schema: every store has one, though only a shared
-- PostgreSQL database ever names a cluster. One row at most (`singleton` can only be 1); the id
-- is 32 lowercase hex characters.

CREATE TABLE cluster_identity (
    singleton  INTEGER PRIMARY KEY DEFAULT 1 CHECK (singleton = 1),
    id         TEXT    NOT NULL UNIQUE CHECK (length(id) = 32 AND id NOT GLOB '*[^0-9a-f]*'),
    created_at TEXT    NOT NULL DEFAULT CURRENT_TIMESTAMP
);

INSERT INTO cluster_identity (id) VALUES (lower(hex(randomblob(16))));
