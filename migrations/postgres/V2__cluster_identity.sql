-- The cluster's identity: a cluster is defined by its database, so the id is created here, with
-- the schema, and every node sharing this database reads the same one. It names the Redis
-- keyspace and channels (`messenger:{id}:...`) and is stamped on every envelope between nodes,
-- so two clusters sharing one Redis never see each other's presence, pushes or fences.
--
-- One row at most: `singleton` can only be TRUE and is the primary key. The id is 32 lowercase
-- hex characters (a random UUID without its dashes; gen_random_uuid is core since
-- PostgreSQL 13).

CREATE TABLE cluster_identity (
    singleton  BOOLEAN     PRIMARY KEY DEFAULT TRUE CHECK (singleton),
    id         TEXT        NOT NULL UNIQUE CHECK (id ~ '^[0-9a-f]{32}$'),
    created_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

INSERT INTO cluster_identity (id) VALUES (replace(gen_random_uuid()::text, '-', ''));
