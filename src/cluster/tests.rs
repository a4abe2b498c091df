use super::*;

fn nodes() -> Vec<NodeConfig> {
    (1..=3)
        .map(|i| NodeConfig {
            name: format!("pg{i}"),
            host: "127.0.0.1".into(),
            port: 5432,
            priority: 100 - i,
            no_failover: false,
        })
        .collect()
}

fn sample(in_recovery: bool, lsn: u64) -> Sample {
    Sample {
        in_recovery,
        current_lsn: (!in_recovery).then_some(Lsn(lsn)),
        receive_lsn: in_recovery.then_some(Lsn(lsn)),
        replay_lsn: in_recovery.then_some(Lsn(lsn)),
        replay_timestamp: None,
        timeline: Some(1),
        system_id: Some("7".into()),
        streaming: in_recovery,
        started: Instant::now(),
        duration: Duration::from_millis(1),
    }
}

fn ok(s: Sample) -> Report {
    Report {
        result: Ok(s),
        healthy: true,
    }
}

#[test]
fn elects_the_reported_primary_and_bumps_the_epoch() {
    let c = Cluster::new(&nodes());
    c.report(1, ok(sample(false, 100)));
    c.report(0, ok(sample(true, 100)));
    let v = c.view();
    assert_eq!((v.primary, v.epoch), (Some(1), 1));
    // A second claimant does not displace the elected primary.
    c.report(0, ok(sample(false, 100)));
    assert_eq!(c.view().primary, Some(1));
    // Once the elected one is unhealthy, the other claimant takes over.
    c.report(
        1,
        Report {
            result: Err("refused".into()),
            healthy: false,
        },
    );
    let v = c.view();
    assert_eq!(
        (v.primary, v.epoch, v.nodes[1].role),
        (Some(0), 2, Role::Down)
    );
}

#[test]
fn a_failure_below_the_threshold_keeps_the_node() {
    let c = Cluster::new(&nodes());
    c.report(0, ok(sample(false, 1)));
    c.report(
        0,
        Report {
            result: Err("timeout".into()),
            healthy: true,
        },
    );
    let v = c.view();
    assert_eq!((v.primary, v.nodes[0].role), (Some(0), Role::Primary));
    assert_eq!(v.nodes[0].last_error.as_deref(), Some("timeout"));
}

#[test]
fn lag_is_measured_against_the_elected_primary() {
    let c = Cluster::new(&nodes());
    c.report(0, ok(sample(false, 5000)));
    c.report(1, ok(sample(true, 5000)));
    c.report(2, ok(sample(true, 1000)));
    let v = c.view();
    assert_eq!(v.nodes[1].lag_bytes, Some(0));
    assert_eq!(v.nodes[1].lag_seconds, Some(0.0));
    assert_eq!(v.nodes[2].lag_bytes, Some(4000));
    assert_eq!(v.nodes[0].lag_bytes, None);
}
