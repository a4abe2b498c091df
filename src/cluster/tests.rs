use super::*;

fn nodes() -> Vec<NodeConfig> {
    (1..=3)
        .map(|i| NodeConfig {
            name: format!("pg{i}"),
            host: "127.0.0.1".into(),
            port: 5432,
            priority: 100 - i,
            no_failover: false,
            data_dir: None,
        })
        .collect()
}

fn sample(in_recovery: bool, lsn: u64) -> Sample {
    Sample::for_tests(in_recovery, lsn)
}

fn on_timeline(mut s: Sample, tl: u32) -> Sample {
    s.timeline = Some(tl);
    s
}

fn ok(s: Sample) -> Report {
    Report {
        result: Ok(s),
        healthy: true,
    }
}

fn failed(kind: FailureKind, healthy: bool) -> Report {
    Report {
        result: Err(ProbeError {
            kind,
            message: "refused".into(),
            started: Instant::now(),
        }),
        healthy,
    }
}

#[test]
fn elects_the_reported_primary_and_fences_a_second_claimant() {
    let c = Cluster::new(&nodes());
    c.report(1, ok(sample(false, 100)));
    c.report(0, ok(sample(true, 100)));
    assert_eq!(c.view().elected, None, "not before every node was probed");
    c.report(2, ok(sample(true, 100)));
    let v = c.view();
    assert_eq!((v.primary, v.elected, v.epoch), (Some(1), Some(1), 1));
    // A second claimant on the same timeline does not displace the elected primary: fenced.
    c.report(0, ok(sample(false, 100)));
    let v = c.view();
    assert_eq!(v.primary, Some(1));
    assert_eq!(v.nodes[0].fenced, Some(Fence::Claim));
    // The elected one going down leaves no primary; the fenced claimant is not elected.
    c.report(1, failed(FailureKind::Crash, false));
    let v = c.view();
    assert_eq!((v.primary, v.elected, v.epoch), (None, Some(1), 1));
    assert_eq!(v.nodes[1].role, Role::Down);
    assert_eq!(
        v.nodes[1].failure.as_ref().map(|f| f.kind),
        Some(FailureKind::Crash)
    );
}

#[test]
fn a_promotion_made_elsewhere_is_followed_by_its_newer_timeline() {
    let c = Cluster::new(&nodes());
    c.report(0, ok(sample(false, 100)));
    c.report(1, ok(sample(true, 100)));
    c.report(2, ok(sample(true, 100)));
    c.report(0, failed(FailureKind::Crash, false));
    c.report(1, ok(on_timeline(sample(false, 200), 2)));
    let v = c.view();
    assert_eq!((v.primary, v.epoch), (Some(1), 2));
    assert_eq!(v.nodes[0].fenced, Some(Fence::Claim));
    // The old primary restarted as-is claims its old timeline: fenced, never elected.
    c.report(0, ok(sample(false, 150)));
    let v = c.view();
    assert_eq!((v.primary, v.epoch), (Some(1), 2));
    assert_eq!(v.nodes[0].fenced, Some(Fence::Claim));
    // Rewound into a replica streaming timeline 2: unfenced.
    c.report(0, ok(on_timeline(sample(true, 200), 2)));
    assert_eq!(c.view().nodes[0].fenced, None);
}

#[test]
fn an_installed_primary_fences_the_old_one_and_pausing_hides_it() {
    let c = Cluster::new(&nodes());
    c.report(0, ok(sample(false, 100)));
    c.report(1, ok(sample(true, 100)));
    c.report(2, ok(sample(true, 100)));
    c.install_primary(1, &on_timeline(sample(false, 120), 2));
    let v = c.view();
    assert_eq!((v.primary, v.elected, v.epoch), (Some(1), Some(1), 2));
    assert_eq!(v.nodes[0].fenced, Some(Fence::Claim));
    c.set_paused(true);
    assert_eq!(c.view().primary, None);
    c.set_paused(false);
    assert_eq!(c.view().primary, Some(1));
    // An operator's fence is not lifted by streaming.
    c.set_fence(2, Some(Fence::Operator));
    c.report(2, ok(on_timeline(sample(true, 120), 2)));
    assert_eq!(c.view().nodes[2].fenced, Some(Fence::Operator));
}

#[test]
fn a_failure_below_the_threshold_keeps_the_node() {
    let c = Cluster::new(&nodes());
    c.report(0, ok(sample(false, 1)));
    c.report(1, failed(FailureKind::Crash, false));
    c.report(2, failed(FailureKind::Crash, false));
    c.report(0, failed(FailureKind::Timeout, true));
    let v = c.view();
    assert_eq!((v.primary, v.nodes[0].role), (Some(0), Role::Primary));
    assert_eq!(v.nodes[0].last_error.as_deref(), Some("refused"));
    assert!(v.nodes[0].failure.is_some());
    c.report(0, ok(sample(false, 2)));
    assert!(c.view().nodes[0].failure.is_none());
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

#[test]
fn a_replica_hears_its_primary_only_while_streaming_and_recently() {
    let mut s = sample(true, 1);
    assert!(s.hears_primary());
    s.receipt_age = Some(2.5);
    assert!(!s.hears_primary(), "older than wal_receiver_timeout");
    s.wal_receiver_timeout_ms = Some(0);
    assert!(s.hears_primary(), "no timeout: streaming is all we know");
    s.streaming = false;
    assert!(!s.hears_primary());
}

fn knowing(mut s: Sample, tl: u32) -> Sample {
    s.known_timeline = Some(tl);
    s
}

#[test]
fn a_claimant_a_replica_knows_to_be_superseded_is_never_elected() {
    // pgpilot starts with the real primary (timeline 3) down: pg1 claims the role on timeline
    // 2, pg2 followed the timeline-3 primary.
    let c = Cluster::new(&nodes());
    c.report(0, ok(on_timeline(sample(false, 500), 2)));
    assert_eq!(c.view().elected, None, "pg2 and pg3 were not probed yet");
    c.report(2, failed(FailureKind::Crash, false));
    let mut follower = knowing(sample(true, 600), 3);
    follower.timeline = None;
    follower.streaming = false;
    c.report(1, ok(follower.clone()));
    let v = c.view();
    assert_eq!((v.elected, v.primary), (None, None));
    assert_eq!(v.nodes[0].fenced, Some(Fence::Claim));
    assert_eq!(v.superseded_by(0), Some(3));
    // It keeps claiming: still never elected.
    c.report(0, ok(on_timeline(sample(false, 510), 2)));
    assert_eq!(c.view().elected, None);
    // A replica of another system proves nothing.
    let c = Cluster::new(&nodes());
    c.report(0, ok(on_timeline(sample(false, 500), 2)));
    let mut other = follower;
    other.system_id = Some("8".into());
    c.report(1, ok(other));
    c.report(2, ok(on_timeline(sample(true, 500), 2)));
    let v = c.view();
    assert_eq!((v.elected, v.nodes[0].fenced), (Some(0), None));
}
