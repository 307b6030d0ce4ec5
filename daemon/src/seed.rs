//! `messengerd seed`: demo users, contacts and groups for a fresh install or a load test.
//!
//! Idempotent, so it can run on every deployment: users are found by username, groups by name
//! among the groups of their creator, and the contact messages by their `client_msg_id` (the
//! store's own retry key), so a second run creates nothing and reports what already existed.
//! Works through `dyn Store`, so on either backend.

use bytes::Bytes;

use crate::auth::{self, PasswordHasher};
use crate::model::{AppendQuotas, GroupAdds, NewMessage, Recipient, User, now_millis};
use crate::store::{NewAccount, Store, StoreError};

#[derive(Debug, Clone)]
pub struct SeedOptions {
    /// Users `<prefix>1` .. `<prefix>N`.
    pub users: usize,
    /// Groups `<prefix>-group-1` .. `<prefix>-group-M`.
    pub groups: usize,
    /// Members per group, the creator included (capped at the number of users).
    pub group_size: usize,
    /// Password of every seeded user.
    pub password: String,
    pub prefix: String,
    /// The daemon's group size limit.
    pub max_group_members: usize,
}

/// What a run did; `existing_*` counts what an earlier run had already created.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SeedSummary {
    pub users_created: usize,
    pub users_existing: usize,
    pub contacts_created: usize,
    pub contacts_existing: usize,
    pub groups_created: usize,
    pub groups_existing: usize,
}

impl std::fmt::Display for SeedSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "users: {} created, {} already there; contacts: {} created, {} already there; \
             groups: {} created, {} already there",
            self.users_created,
            self.users_existing,
            self.contacts_created,
            self.contacts_existing,
            self.groups_created,
            self.groups_existing
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SeedError {
    #[error("invalid seed option: {0}")]
    Invalid(String),
    #[error("hashing a password: {0}")]
    Hash(String),
    #[error("store: {0}")]
    Store(#[from] StoreError),
}

fn username(prefix: &str, n: usize) -> String {
    format!("{prefix}{n}")
}

/// Creates whatever of the demo data is missing.
pub async fn seed(
    store: &dyn Store,
    hasher: &PasswordHasher,
    options: &SeedOptions,
    min_password_chars: usize,
) -> Result<SeedSummary, SeedError> {
    let invalid = |e: messenger_protocol::WireError| SeedError::Invalid(e.to_string());
    if options.users > 0 {
        // The longest name is the one that must fit.
        auth::username_key(&username(&options.prefix, options.users)).map_err(invalid)?;
    }
    auth::check_new_password(&options.password, min_password_chars).map_err(invalid)?;
    if options.groups > 0 && options.group_size > options.max_group_members {
        return Err(SeedError::Invalid(format!(
            "--group-size {} exceeds limits.max_group_members ({})",
            options.group_size, options.max_group_members
        )));
    }

    let mut summary = SeedSummary::default();
    // One hash for every user: the same password, and hashing thousands of times would make
    // seeding a load test take minutes.
    let mut password_hash = None;
    let mut users: Vec<User> = Vec::with_capacity(options.users);
    for n in 1..=options.users {
        let name = username(&options.prefix, n);
        let key = auth::username_key(&name).map_err(invalid)?;
        if let Some(existing) = store.account_by_username(&key).await? {
            summary.users_existing += 1;
            users.push(existing.user);
            continue;
        }
        let hash = match &password_hash {
            Some(h) => String::clone(h),
            None => {
                let h = hasher
                    .hash(&options.password, auth::Lane::Normal)
                    .await
                    .map_err(|e| SeedError::Hash(e.to_string()))?;
                password_hash = Some(h.clone());
                h
            }
        };
        let user = store
            .create_account(NewAccount {
                username: name.clone(),
                username_key: key,
                display_name: format!("Demo user {n}"),
                password_hash: hash,
                // Demo and load-test accounts: the seed and the load test put them in groups.
                group_adds: GroupAdds::Anyone,
            })
            .await?;
        summary.users_created += 1;
        users.push(user);
    }

    // Contacts: a first direct message between neighbours, so each shows up in the other's
    // conversation list.
    for pair in users.windows(2) {
        let [from, to] = pair else { continue };
        let appended = store
            .append_message(NewMessage {
                sender: from.id,
                to: Recipient::User(to.id),
                client_msg_id: format!("seed-contact-{}", to.username),
                body: Bytes::from(format!("Hi {}, this is {}.", to.username, from.username)),
                content_type: "text/plain".to_owned(),
                server_time: now_millis(),
                // The operator seeds; no user's quota applies.
                quotas: AppendQuotas::UNLIMITED,
            })
            .await?;
        if appended.duplicate {
            summary.contacts_existing += 1;
        } else {
            summary.contacts_created += 1;
        }
    }

    if !users.is_empty() {
        let size = options.group_size.clamp(1, users.len());
        for g in 1..=options.groups {
            let name = format!("{}-group-{g}", options.prefix);
            let creator = &users[(g - 1) % users.len()];
            let exists = store
                .groups_of(creator.id)
                .await?
                .iter()
                .any(|group| group.name == name);
            if exists {
                summary.groups_existing += 1;
                continue;
            }
            let members: Vec<_> = (1..size)
                .map(|k| users[(g - 1 + k) % users.len()].id)
                .collect();
            store
                .create_group(
                    creator.id,
                    &name,
                    &members,
                    options.max_group_members,
                    now_millis(),
                )
                .await?;
            summary.groups_created += 1;
        }
    }
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Passwords;
    use crate::model::{Conversation, ConversationQuery};
    use crate::store::sqlite::{SqliteOptions, SqliteStore};

    fn cheap_hasher() -> PasswordHasher {
        PasswordHasher::new(&Passwords {
            argon2_memory_kib: 1024,
            argon2_iterations: 1,
            ..Passwords::default()
        })
        .expect("hasher")
    }

    fn options() -> SeedOptions {
        SeedOptions {
            users: 5,
            groups: 2,
            group_size: 3,
            password: "demo-password".into(),
            prefix: "demo".into(),
            max_group_members: 100,
        }
    }

    #[tokio::test]
    async fn seeding_twice_creates_everything_once() {
        let dir = tempfile::TempDir::new().expect("dir");
        let store =
            SqliteStore::open(&dir.path().join("m.db"), SqliteOptions::default()).expect("open");
        let hasher = cheap_hasher();
        let first = seed(&store, &hasher, &options(), 8).await.expect("seed");
        assert_eq!(
            first,
            SeedSummary {
                users_created: 5,
                contacts_created: 4,
                groups_created: 2,
                ..SeedSummary::default()
            }
        );
        let second = seed(&store, &hasher, &options(), 8).await.expect("reseed");
        assert_eq!(
            second,
            SeedSummary {
                users_existing: 5,
                contacts_existing: 4,
                groups_existing: 2,
                ..SeedSummary::default()
            }
        );

        let demo2 = store
            .account_by_username("demo2")
            .await
            .expect("read")
            .expect("seeded");
        assert!(
            hasher
                .verify(
                    "demo-password",
                    Some(&demo2.password_hash),
                    auth::Lane::Normal
                )
                .await
                .expect("verify")
        );
        // demo2 has demo1 and demo3 as contacts, and is in both groups (1: demo1-3, 2: demo2-4).
        let page = store
            .conversation_page(
                demo2.user.id,
                ConversationQuery {
                    snapshot: None,
                    before: None,
                    limit: 100,
                },
            )
            .await
            .expect("list");
        let direct = page
            .conversations
            .iter()
            .filter(|c| matches!(c.conversation(), Conversation::Direct(_)))
            .count();
        assert_eq!(direct, 2);
        let groups = store.groups_of(demo2.user.id).await.expect("groups");
        assert_eq!(
            groups.iter().map(|g| g.name.as_str()).collect::<Vec<_>>(),
            ["demo-group-1", "demo-group-2"]
        );
        let group = store
            .group(demo2.user.id, groups[0].id)
            .await
            .expect("group");
        assert_eq!(group.members.len(), 3);
        store.close().await.expect("close");
    }

    #[tokio::test]
    async fn bad_options_are_refused_before_writing() {
        let dir = tempfile::TempDir::new().expect("dir");
        let store =
            SqliteStore::open(&dir.path().join("m.db"), SqliteOptions::default()).expect("open");
        let hasher = cheap_hasher();
        let short = SeedOptions {
            password: "short".into(),
            ..options()
        };
        assert!(matches!(
            seed(&store, &hasher, &short, 8).await,
            Err(SeedError::Invalid(_))
        ));
        let bad_prefix = SeedOptions {
            prefix: "no spaces".into(),
            ..options()
        };
        assert!(matches!(
            seed(&store, &hasher, &bad_prefix, 8).await,
            Err(SeedError::Invalid(_))
        ));
        assert!(
            store
                .account_by_username("demo1")
                .await
                .expect("read")
                .is_none()
        );
        store.close().await.expect("close");
    }
}
