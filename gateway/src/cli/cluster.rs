//! `gridsense cluster status`: who holds which shard, from the store (it does not count as
//! an instance).

use std::fmt::Write as _;

use crate::cluster::View;

/// The status as printed: the database's clock against this host's, the live instances with
/// their shards, the shards nobody holds (free, or lapsed with the last holder named), and the
/// rebalances so far (every claim raises a shard's epoch).
pub fn render(view: &View, target: &str, local_now_ms: i64) -> String {
    let mut out = String::new();
    let skew = local_now_ms - view.db_now_ms;
    let _ = writeln!(
        out,
        "cluster: {} shards on {target}; this host's clock is {skew:+} ms off the database's",
        view.leases.len()
    );
    let _ = writeln!(out, "instances seen within a lease: {}", view.instances.len());
    for instance in &view.instances {
        let held: Vec<&crate::cluster::Lease> = view.held_by(instance).collect();
        let soonest = held.iter().map(|l| l.expires_in_ms).min().unwrap_or(0);
        let shards: Vec<String> = held.iter().map(|l| format!("{:02x}", l.shard)).collect();
        let _ = writeln!(
            out,
            "  {instance}: {} shards, next lease expiry in {:.1} s: {}",
            held.len(),
            soonest as f64 / 1_000.0,
            if shards.is_empty() { "-".to_owned() } else { shards.join(" ") }
        );
    }
    let unheld: Vec<String> = view
        .unheld()
        .map(|l| match &l.owner {
            Some(o) => format!(
                "{:02x} (lapsed {:.1} s ago, last {o})",
                l.shard,
                -l.expires_in_ms as f64 / 1_000.0
            ),
            None => format!("{:02x}", l.shard),
        })
        .collect();
    let _ = writeln!(
        out,
        "held by nobody: {}{}",
        unheld.len(),
        if unheld.is_empty() { String::new() } else { format!(": {}", unheld.join(", ")) }
    );
    let (claims, moved) = (view.claims(), view.rebalances());
    let most = view.leases.iter().max_by_key(|l| (l.epoch, std::cmp::Reverse(l.shard)));
    let _ = writeln!(
        out,
        "rebalances: {moved} (shard claims since the store was made: {claims}{})",
        most.filter(|l| l.epoch > 1)
            .map(|l| format!("; most claimed: {:02x}, {} times", l.shard, l.epoch))
            .unwrap_or_default()
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::Lease;

    #[test]
    fn the_status_names_holders_shards_and_what_nobody_holds() {
        let lease = |shard, owner: Option<&str>, expires_in_ms| Lease {
            shard,
            owner: owner.map(str::to_owned),
            epoch: if shard == 3 { 4 } else { 1 },
            expires_in_ms,
        };
        let view = View {
            db_now_ms: 10_000,
            instances: vec!["gw1".into(), "gw2".into()],
            leases: vec![
                lease(0, Some("gw1"), 4_200),
                lease(1, Some("gw2"), 3_100),
                lease(2, Some("gw1"), 4_900),
                lease(3, Some("gw3"), -1_500),
                lease(4, None, 0),
            ],
        };
        let text = render(&view, "postgres://app@db/gridsense", 10_012);
        assert_eq!(
            text,
            "cluster: 5 shards on postgres://app@db/gridsense; this host's clock is +12 ms off the database's\n\
             instances seen within a lease: 2\n  \
             gw1: 2 shards, next lease expiry in 4.2 s: 00 02\n  \
             gw2: 1 shards, next lease expiry in 3.1 s: 01\n\
             held by nobody: 2: 03 (lapsed 1.5 s ago, last gw3), 04\n\
             rebalances: 3 (shard claims since the store was made: 8; most claimed: 03, 4 times)\n"
        );
    }
}
