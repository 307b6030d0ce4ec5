//! Groups: create, add and remove members (admins), leave, list, info.

use std::collections::HashSet;

use messenger_protocol::WireError;
use messenger_protocol::pb::{self, server_frame::Kind as Resp};

use super::{invalid, short_name};
use crate::account_budgets;
use crate::model::{GroupId, UserId, now_millis};
use crate::session::{Handled, Session, ok};

const GROUP_NAME_MAX: usize = 64;

/// The distinct ids other than the caller's own, in first-seen order. Duplicates and the
/// caller are dropped *before* the size check: `[B, C, B, me]` is a group of three, and
/// refusing it as four would punish a client for a harmless repeat.
fn user_ids(ids: &[u64], me: UserId, max: usize) -> Result<Vec<UserId>, WireError> {
    let mut seen = HashSet::with_capacity(ids.len().min(max.saturating_add(1)));
    let mut out = Vec::new();
    for &id in ids {
        let user = UserId(id);
        if user == me || !seen.insert(user) {
            continue;
        }
        // The caller counts as one member too.
        if out.len().saturating_add(1) >= max {
            return Err(invalid(format!("at most {max} members per group")));
        }
        out.push(user);
    }
    Ok(out)
}

impl Session {
    pub(crate) async fn create_group(&mut self, r: pb::CreateGroup) -> Handled {
        let me = self.authed()?.user.id;
        let name = short_name("group name", &r.name, GROUP_NAME_MAX)?;
        let max = self.shared.config.limits.max_group_members;
        let members = user_ids(&r.member_ids, me, max)?;
        let budgets = &self.shared.budgets;
        let added = u32::try_from(members.len()).unwrap_or(u32::MAX);
        // Both budgets are checked before either is charged: a refusal takes nothing.
        budgets
            .members_added
            .check_cost(&me, added)
            .await
            .map_err(|wait| account_budgets::refused(&budgets.members_added, wait))?;
        budgets
            .groups_created
            .hit(&me)
            .await
            .map_err(|wait| account_budgets::refused(&budgets.groups_created, wait))?;
        budgets.members_added.record_cost(&me, added);
        let group = self
            .shared
            .store
            .create_group(me, &name, &members, max, now_millis())
            .await?;
        ok(Resp::Group(pb::Group::from(&group)))
    }

    pub(crate) async fn add_members(&mut self, r: pb::AddMembers) -> Handled {
        let me = self.authed()?.user.id;
        let max = self.shared.config.limits.max_group_members;
        let users = user_ids(&r.user_ids, me, max)?;
        if users.is_empty() {
            return Err(invalid("no users to add"));
        }
        let budgets = &self.shared.budgets;
        budgets
            .members_added
            .take(&me, u32::try_from(users.len()).unwrap_or(u32::MAX))
            .await
            .map_err(|wait| account_budgets::refused(&budgets.members_added, wait))?;
        let group = self
            .shared
            .store
            .add_members(me, GroupId(r.group_id), &users, max)
            .await?;
        ok(Resp::Group(pb::Group::from(&group)))
    }

    pub(crate) async fn remove_member(&mut self, r: pb::RemoveMember) -> Handled {
        let me = self.authed()?.user.id;
        if r.user_id == me.0 {
            return Err(invalid("use LeaveGroup to leave a group"));
        }
        let group = self
            .shared
            .store
            .remove_member(me, GroupId(r.group_id), UserId(r.user_id))
            .await?;
        ok(Resp::Group(pb::Group::from(&group)))
    }

    pub(crate) async fn leave_group(&mut self, r: pb::LeaveGroup) -> Handled {
        let me = self.authed()?.user.id;
        self.shared
            .store
            .leave_group(me, GroupId(r.group_id))
            .await?;
        ok(Resp::Ok(pb::Ok {}))
    }

    pub(crate) async fn list_groups(&mut self) -> Handled {
        let me = self.authed()?.user.id;
        let groups = self.shared.store.groups_of(me).await?;
        ok(Resp::GroupList(pb::GroupList {
            groups: groups.iter().map(pb::Group::from).collect(),
        }))
    }

    pub(crate) async fn get_group(&mut self, r: pb::GetGroup) -> Handled {
        let me = self.authed()?.user.id;
        let group = self.shared.store.group(me, GroupId(r.group_id)).await?;
        ok(Resp::Group(pb::Group::from(&group)))
    }
}
