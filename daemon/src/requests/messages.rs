//! Sending, acknowledging, looking up users and reading history.

use messenger_protocol::pb::{self, server_frame::Kind as Resp};
use messenger_protocol::{ErrorCode, WireError};
use prost::Message as _;

use super::conversation_cursor::Cursor;
use super::invalid;
use crate::account_budgets;
use crate::auth;
use crate::delivery;
use crate::model::{
    AppendQuotas, Conversation, ConversationQuery, ConversationSummary, ConversationWith, GroupId,
    MessageId, NewMessage, Recipient, Seq, UserId, now_millis,
};
use crate::session::{After, Handled, Session, ok};
use crate::store::{INBOX_FULL, StoreError};

pub const CLIENT_MSG_ID_MAX: usize = 64;
pub const CONTENT_TYPE_MAX: usize = 64;
pub const DEFAULT_CONTENT_TYPE: &str = "text/plain";
/// Most conversations in one `ConversationList` page (and the size of a page asked with 0).
pub const CONVERSATION_PAGE_MAX: usize = 100;

fn summary(found: &ConversationSummary) -> pb::ConversationSummary {
    let with = match &found.with {
        ConversationWith::Group(group) => pb::conversation_summary::With::Group(group.into()),
        ConversationWith::Direct(_, Some(user)) => {
            pb::conversation_summary::With::User(user.into())
        }
        // A deleted account: the name stamped on its last message if it sent it.
        ConversationWith::Direct(peer, None) if found.last.sender.id == *peer => {
            pb::conversation_summary::With::User((&found.last.sender).into())
        }
        ConversationWith::Direct(peer, None) => pb::conversation_summary::With::User(pb::User {
            user_id: peer.0,
            username: format!("deleted-{peer}"),
            display_name: format!("deleted-{peer}"),
        }),
    };
    pb::ConversationSummary {
        with: Some(with),
        last_message: Some(pb::Message::from(&found.last)),
    }
}

impl Session {
    pub(crate) async fn lookup_user(&mut self, r: pb::LookupUser) -> Handled {
        let account = match r.by {
            Some(pb::lookup_user::By::Username(name)) => {
                let key = auth::username_key(&name)
                    .map_err(|_| WireError::new(ErrorCode::NotFound, "no such user"))?;
                self.shared.store.account_by_username(&key).await?
            }
            Some(pb::lookup_user::By::UserId(id)) => {
                self.shared.store.account_by_id(UserId(id)).await?
            }
            None => return Err(invalid("lookup needs a username or a user_id")),
        };
        let account = account.ok_or_else(|| WireError::new(ErrorCode::NotFound, "no such user"))?;
        ok(Resp::User(pb::User::from(&account.user)))
    }

    pub(crate) async fn send_message(&mut self, r: pb::SendMessage) -> Handled {
        let sender = self.authed()?.user.id;
        let to = match r.to {
            Some(pb::send_message::To::UserId(u)) => Recipient::User(UserId(u)),
            Some(pb::send_message::To::GroupId(g)) => Recipient::Group(GroupId(g)),
            None => return Err(invalid("message needs a recipient (user_id or group_id)")),
        };
        if r.client_msg_id.is_empty() || r.client_msg_id.len() > CLIENT_MSG_ID_MAX {
            return Err(invalid(format!(
                "client_msg_id must be 1 to {CLIENT_MSG_ID_MAX} bytes"
            )));
        }
        let max_body = self.shared.config.limits.max_body_bytes;
        if r.body.len() > max_body {
            return Err(WireError::new(
                ErrorCode::TooLarge,
                format!(
                    "body of {} bytes exceeds the limit of {max_body} bytes",
                    r.body.len()
                ),
            ));
        }
        if r.body.is_empty() {
            return Err(invalid("message body is empty"));
        }
        if r.content_type.len() > CONTENT_TYPE_MAX || r.content_type.chars().any(char::is_control) {
            return Err(invalid(format!(
                "content_type must be at most {CONTENT_TYPE_MAX} bytes without control characters"
            )));
        }
        // The fan-out budget is checked first and charged once the message is stored (a group's
        // size is known only then); the message budget is taken now. Refused sends take
        // nothing from either.
        let budgets = &self.shared.budgets;
        budgets
            .recipients
            .check(&sender)
            .await
            .map_err(|wait| account_budgets::refused(&budgets.recipients, wait))?;
        let body_bytes = u32::try_from(r.body.len()).unwrap_or(u32::MAX);
        budgets
            .send_bytes
            .check_cost(&sender, body_bytes)
            .await
            .map_err(|wait| account_budgets::refused(&budgets.send_bytes, wait))?;
        budgets
            .sends
            .hit(&sender)
            .await
            .map_err(|wait| account_budgets::refused(&budgets.sends, wait))?;
        budgets.send_bytes.record_cost(&sender, body_bytes);
        let limits = &self.shared.config.limits;
        let quotas = AppendQuotas {
            inbox_backlog: limits.max_inbox_backlog,
            history: limits.max_conversation_messages,
        };
        let content_type = if r.content_type.is_empty() {
            DEFAULT_CONTENT_TYPE.to_string()
        } else {
            r.content_type
        };
        let appended = delivery::accept(
            &self.shared,
            NewMessage {
                sender,
                to,
                client_msg_id: r.client_msg_id,
                body: r.body,
                content_type,
                server_time: now_millis(),
                quotas,
            },
        )
        .await
        .inspect_err(|e| {
            if let StoreError::QuotaExceeded(which) = e {
                crate::metrics::quota_refused(if *which == INBOX_FULL {
                    "inbox_backlog"
                } else {
                    "history"
                });
            }
        })?;
        if !appended.duplicate {
            let rows = u32::try_from(appended.entries.len()).unwrap_or(u32::MAX);
            budgets.recipients.record_cost(&sender, rows);
        }
        ok(Resp::Sent(pb::Sent {
            message_id: appended.message.id.0,
            server_time_ms: appended.message.server_time,
            duplicate: appended.duplicate,
        }))
    }

    pub(crate) async fn ack(&mut self, r: pb::Ack) -> Handled {
        let device = self.authed()?.device;
        self.shared.store.ack(device, Seq(r.up_to_seq)).await?;
        Ok((Resp::Ok(pb::Ok {}), After::NoReply))
    }

    pub(crate) async fn list_conversations(&mut self, r: pb::ListConversations) -> Handled {
        let reader = self.authed()?.user.id;
        let cursor = Cursor::decode(&r.cursor)?;
        let limit = match r.limit as usize {
            0 => CONVERSATION_PAGE_MAX,
            n => n.min(CONVERSATION_PAGE_MAX),
        };
        // One more than asked: whether it exists says if there is a next page.
        let page = self
            .shared
            .store
            .conversation_page(
                reader,
                ConversationQuery {
                    snapshot: cursor.map(|c| c.snapshot),
                    before: cursor.map(|c| c.after),
                    limit: limit + 1,
                },
            )
            .await?;
        let mut more = page.conversations.len() > limit;
        // Keep the page inside one frame: stop early rather than fail on big last messages
        // (four 64 KiB bodies used to make the whole list fail).
        let budget = self
            .shared
            .config
            .limits
            .max_frame_bytes
            .saturating_sub(1024);
        let mut used = 0;
        let mut conversations = Vec::with_capacity(limit);
        let mut last_key = None;
        for found in page.conversations.iter().take(limit) {
            let summary = summary(found);
            used += summary.encoded_len() + 8;
            if used > budget && !conversations.is_empty() {
                more = true;
                break;
            }
            last_key = Some(found.last.id);
            conversations.push(summary);
        }
        let next_cursor = match (more, last_key) {
            (true, Some(after)) => Cursor {
                snapshot: page.snapshot,
                after,
            }
            .encode(),
            _ => Vec::new(),
        };
        ok(Resp::ConversationList(pb::ConversationList {
            conversations,
            next_cursor: next_cursor.into(),
        }))
    }

    pub(crate) async fn history(&mut self, r: pb::GetHistory) -> Handled {
        let reader = self.authed()?.user.id;
        let conversation = match r.conversation {
            Some(pb::get_history::Conversation::UserId(u)) => Conversation::Direct(UserId(u)),
            Some(pb::get_history::Conversation::GroupId(g)) => Conversation::Group(GroupId(g)),
            None => {
                return Err(invalid(
                    "history needs a conversation (user_id or group_id)",
                ));
            }
        };
        let cap = self.shared.config.limits.max_history_page;
        let limit = match r.limit as usize {
            0 => cap,
            n => n.min(cap),
        };
        let before = (r.before_message_id != 0).then_some(MessageId(r.before_message_id));
        let mut messages = self
            .shared
            .store
            .history(reader, conversation, before, limit + 1)
            .await?;
        let mut has_more = messages.len() > limit;
        messages.truncate(limit);
        // Keep the page inside one frame: stop early (has_more) rather than fail on big bodies.
        let budget = self
            .shared
            .config
            .limits
            .max_frame_bytes
            .saturating_sub(1024);
        let mut used = 0;
        let mut page = Vec::with_capacity(messages.len());
        for m in &messages {
            let m = pb::Message::from(m);
            used += m.encoded_len() + 8;
            if used > budget && !page.is_empty() {
                has_more = true;
                break;
            }
            page.push(m);
        }
        ok(Resp::HistoryPage(pb::HistoryPage {
            messages: page,
            has_more,
        }))
    }
}
