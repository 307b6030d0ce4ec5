//! `mixed`: direct pairs and groups (every member sending) at once on one daemon, each
//! checked as in its own scenario.

use super::{Outcome, Params, connect_members, group_plan, pair_plan, run_messaging};

pub async fn run(params: &Params, pairs: u32, groups: u32, size: u32) -> anyhow::Result<Outcome> {
    let (members, connect) = connect_members(params, 0, pairs * 2 + groups * size).await?;
    let mut plan = pair_plan(&members, 0, pairs);
    let (group_senders, group_members) =
        group_plan(&members, pairs * 2, groups, size, size, "loadtest-mixed").await?;
    plan.extend(group_senders);
    let mut outcome = run_messaging("mixed", params, members, plan, group_members).await?;
    outcome.connect = Some(connect);
    Ok(outcome)
}
