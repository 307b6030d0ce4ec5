//! `group`: groups of `size` members spread over connections; the first `senders` members of
//! each send to it, and every other member must get each message. Completion latency is the
//! time until the last member has a message.

use super::{Outcome, Params, connect_members, group_plan, run_messaging};

pub async fn run(params: &Params, groups: u32, size: u32, senders: u32) -> anyhow::Result<Outcome> {
    let (members, connect) = connect_members(params, 0, groups * size).await?;
    let (plan, group_members) = group_plan(&members, 0, groups, size, senders, "loadtest").await?;
    let mut outcome = run_messaging("group", params, members, plan, group_members).await?;
    outcome.connect = Some(connect);
    Ok(outcome)
}
