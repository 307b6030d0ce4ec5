//! `group`: groups of `size` members spread over connections; every member (or only the
//! first `senders_per_group`) sends to its group, and every other member must get each
//! message. Completion latency is the time until the last member has a message.

use messenger_protocol::client::Recipient;

use super::{Outcome, Params, Send, connect_members, run_messaging};
use crate::checker::Target;

pub async fn run(
    params: &Params,
    groups: u32,
    size: u32,
    senders_per_group: u32,
) -> anyhow::Result<Outcome> {
    let (members, connect) = connect_members(params, 0, groups * size).await?;
    let by_index: std::collections::HashMap<u32, &crate::fleet::Member> =
        members.iter().map(|m| (m.index, m)).collect();
    let mut plan = Vec::new();
    let mut group_members = Vec::new();
    for g in 0..groups {
        let indices: Vec<u32> = (g * size..(g + 1) * size)
            .filter(|i| by_index.contains_key(i))
            .collect();
        let Some(admin) = indices.first().and_then(|i| by_index.get(i)) else {
            continue;
        };
        let others: Vec<u64> = indices[1..]
            .iter()
            .filter_map(|i| by_index.get(i).map(|m| m.user_id))
            .collect();
        let group = admin
            .client
            .conn()
            .create_group(&format!("loadtest-{g}"), &others)
            .await?;
        let owes = indices.len().saturating_sub(1) as u64;
        for &i in indices.iter().take(senders_per_group.max(1) as usize) {
            plan.push(Send {
                sender: i,
                target: Target::Group(group_members.len() as u32),
                to: Recipient::Group(group.group_id),
                owes,
            });
        }
        group_members.push(indices);
    }
    let mut outcome = run_messaging("group", params, members, plan, group_members).await?;
    outcome.connect = Some(connect);
    Ok(outcome)
}
