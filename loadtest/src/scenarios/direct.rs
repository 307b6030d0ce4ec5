//! `direct`: users in pairs, each sending to its partner.

use super::{Outcome, Params, connect_members, pair_plan, run_messaging};

pub async fn run(params: &Params, pairs: u32) -> anyhow::Result<Outcome> {
    let (members, connect) = connect_members(params, 0, pairs * 2).await?;
    let plan = pair_plan(&members, 0, pairs);
    let mut outcome = run_messaging("direct", params, members, plan, Vec::new()).await?;
    outcome.connect = Some(connect);
    Ok(outcome)
}
