//! `mixed`: direct pairs and groups at once on one daemon, each checked as in its own
//! scenario.

use messenger_protocol::client::Recipient;

use super::{Outcome, Params, Send, connect_members, run_messaging};
use crate::checker::Target;

pub async fn run(params: &Params, pairs: u32, groups: u32, size: u32) -> anyhow::Result<Outcome> {
    let total = pairs * 2 + groups * size;
    let (members, connect) = connect_members(params, 0, total).await?;
    let by_index: std::collections::HashMap<u32, &crate::fleet::Member> =
        members.iter().map(|m| (m.index, m)).collect();
    let mut plan = Vec::new();
    for i in 0..pairs * 2 {
        let partner = i ^ 1;
        if let (true, Some(p)) = (by_index.contains_key(&i), by_index.get(&partner)) {
            plan.push(Send {
                sender: i,
                target: Target::User(partner),
                to: Recipient::User(p.user_id),
                owes: 1,
            });
        }
    }
    let mut group_members = Vec::new();
    for g in 0..groups {
        let base = pairs * 2 + g * size;
        let indices: Vec<u32> = (base..base + size)
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
            .create_group(&format!("loadtest-mixed-{g}"), &others)
            .await?;
        let owes = indices.len().saturating_sub(1) as u64;
        for &i in &indices {
            plan.push(Send {
                sender: i,
                target: Target::Group(group_members.len() as u32),
                to: Recipient::Group(group.group_id),
                owes,
            });
        }
        group_members.push(indices);
    }
    let mut outcome = run_messaging("mixed", params, members, plan, group_members).await?;
    outcome.connect = Some(connect);
    Ok(outcome)
}
