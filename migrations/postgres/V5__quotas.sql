-- Storage quotas (issue 11): the same logical schema as migrations/sqlite/V5__quotas.sql.
-- How many messages each conversation holds, bumped in the append's transaction (after the
-- recipients' user rows are locked, so appends to one conversation update it one at a time)
-- so the history quota is one key lookup. A direct pair is (0, lower user id, higher user id);
-- a group is (group id, 0, 0).
--
-- The inbox backlog quota needs no schema: users.last_seq - users.acked_seq, read from the
-- user row every append already locks.

CREATE TABLE history_sizes (
    group_id BIGINT NOT NULL,
    low_id   BIGINT NOT NULL,
    high_id  BIGINT NOT NULL,
    messages BIGINT NOT NULL,
    PRIMARY KEY (group_id, low_id, high_id)
);

INSERT INTO history_sizes (group_id, low_id, high_id, messages)
SELECT 0, LEAST(sender_id, to_user_id), GREATEST(sender_id, to_user_id), count(*)
FROM messages WHERE to_user_id IS NOT NULL
GROUP BY LEAST(sender_id, to_user_id), GREATEST(sender_id, to_user_id);

INSERT INTO history_sizes (group_id, low_id, high_id, messages)
SELECT to_group_id, 0, 0, count(*)
FROM messages WHERE to_group_id IS NOT NULL
GROUP BY to_group_id;
