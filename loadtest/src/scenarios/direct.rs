//! `direct`: users in pairs, each sending to its partner.

use messenger_protocol::client::Recipient;

use super::{Outcome, Params, Send, connect_members, run_messaging};
use crate::checker::Target;

pub async fn run(params: &Params, pairs: u32) -> anyhow::Result<Outcome> {
    let (members, connect) = connect_members(params, 0, pairs * 2).await?;
    let ids: std::collections::HashMap<u32, u64> =
        members.iter().map(|m| (m.index, m.user_id)).collect();
    let mut plan = Vec::new();
    for m in &members {
        let partner = m.index ^ 1;
        if let Some(&partner_id) = ids.get(&partner) {
            plan.push(Send {
                sender: m.index,
                target: Target::User(partner),
                to: Recipient::User(partner_id),
                owes: 1,
            });
        }
    }
    let mut outcome = run_messaging("direct", params, members, plan, Vec::new()).await?;
    outcome.connect = Some(connect);
    Ok(outcome)
}
