-- Consent to group additions, and an index of each user's conversations by last activity:
-- the same logical change as migrations/sqlite/V3.
--
-- `users.group_adds` is who may add the user to a group: 'anyone', 'contacts' (people the user
-- wrote to directly, or shares a group with) or 'nobody'.
--
-- The conversation list must not scan the inbox (60k entries took 117 ms). A direct
-- conversation gets one row per side in `direct_threads`, upserted by every direct message,
-- so a user's direct chats are one range scan of `direct_threads_by_activity`. A group keeps
-- its newest message id in `groups.last_message_id` (one update per send, not one per member),
-- and a member's `joined_after` is that id when they joined: the group is one of their
-- conversations once a message above it arrives. Both rows are keyed by the user or the
-- group, as the distribution rule in V1 asks.

ALTER TABLE users ADD COLUMN group_adds TEXT NOT NULL DEFAULT 'contacts'
    CHECK (group_adds IN ('anyone', 'contacts', 'nobody'));

ALTER TABLE groups ADD COLUMN last_message_id BIGINT NOT NULL DEFAULT 0;
ALTER TABLE group_members ADD COLUMN joined_after BIGINT NOT NULL DEFAULT 0;

CREATE TABLE direct_threads (
    user_id         BIGINT  NOT NULL REFERENCES users (id),
    peer_id         BIGINT  NOT NULL,
    -- The newest direct message between the two (either direction).
    last_message_id BIGINT  NOT NULL,
    -- Whether `user_id` ever wrote to `peer_id`: what makes the peer a contact of the user.
    wrote           BOOLEAN NOT NULL DEFAULT FALSE,
    PRIMARY KEY (user_id, peer_id)
);

CREATE INDEX direct_threads_by_activity ON direct_threads (user_id, last_message_id);

-- Existing data: what each user's inbox already holds.
INSERT INTO direct_threads (user_id, peer_id, last_message_id, wrote)
SELECT i.user_id,
       CASE WHEN m.sender_id = i.user_id THEN m.to_user_id ELSE m.sender_id END,
       max(m.id),
       bool_or(m.sender_id = i.user_id)
FROM inbox i JOIN messages m ON m.id = i.message_id
WHERE m.to_user_id IS NOT NULL
GROUP BY 1, 2;

UPDATE groups SET last_message_id =
    coalesce((SELECT max(m.id) FROM messages m WHERE m.to_group_id = groups.id), 0);

-- A member's first group message in their inbox marks when they joined; without one, nothing
-- reached them since they joined.
UPDATE group_members SET joined_after = coalesce(
    (SELECT min(i.message_id) - 1 FROM inbox i JOIN messages m ON m.id = i.message_id
     WHERE i.user_id = group_members.user_id AND m.to_group_id = group_members.group_id),
    (SELECT g.last_message_id FROM groups g WHERE g.id = group_members.group_id));
