-- Storage quotas (issue 11). How many messages each conversation holds, kept in the append's
-- transaction so the history quota is one key lookup instead of a count over the messages.
-- A direct pair is (0, lower user id, higher user id); a group is (group id, 0, 0). Ids start
-- at 1, so the two kinds never share a key.
--
-- The inbox backlog quota needs no schema: it is a user's newest seq (the inbox's primary
-- key) minus users.acked_seq, both already read by every append.

CREATE TABLE history_sizes (
    group_id INTEGER NOT NULL,
    low_id   INTEGER NOT NULL,
    high_id  INTEGER NOT NULL,
    messages INTEGER NOT NULL,
    PRIMARY KEY (group_id, low_id, high_id)
) WITHOUT ROWID;

INSERT INTO history_sizes (group_id, low_id, high_id, messages)
SELECT 0, min(sender_id, to_user_id), max(sender_id, to_user_id), count(*)
FROM messages WHERE to_user_id IS NOT NULL
GROUP BY min(sender_id, to_user_id), max(sender_id, to_user_id);

INSERT INTO history_sizes (group_id, low_id, high_id, messages)
SELECT to_group_id, 0, 0, count(*)
FROM messages WHERE to_group_id IS NOT NULL
GROUP BY to_group_id;
