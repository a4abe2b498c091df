use std::time::Duration;

use tokio::time::Instant;

use super::*;
use crate::cluster::{Cluster, Lsn, ProbeError, Report, Sample};
use crate::config::NodeConfig;

fn policy() -> Policy {
    Policy {
        mode: FailoverMode::Auto,
        failover_timeout: Duration::from_secs(3),
        max_failover_lag: 1000,
        synchronous: false,
        unsynced: None,
        sync_record: Default::default(),
    }
}

fn cluster() -> std::sync::Arc<Cluster> {
    cluster_at([5000, 4900, 5000])
}

/// The primary and two replicas at these WAL positions.
fn cluster_at(lsns: [u64; 3]) -> std::sync::Arc<Cluster> {
    let nodes: Vec<NodeConfig> = (1..=3)
        .map(|i| NodeConfig {
            name: format!("pg{i}"),
            host: "127.0.0.1".into(),
            port: 5432,
            priority: 100 - 10 * i,
            no_failover: false,
            data_dir: None,
        })
        .collect();
    let c = Cluster::new(&nodes);
    for (i, lsn) in lsns.into_iter().enumerate() {
        ok(&c, i, Sample::for_tests(i != 0, lsn));
    }
    c
}

fn ok(c: &Cluster, i: usize, s: Sample) {
    c.report(
        i,
        Report {
            result: Ok(s),
            healthy: true,
        },
    );
}

fn fail(c: &Cluster, i: usize, kind: FailureKind, started: Instant) {
    c.report(
        i,
        Report {
            result: Err(ProbeError {
                kind,
                message: "x".into(),
                started,
            }),
            healthy: false,
        },
    );
}

/// Replicas that lost their WAL receiver, probed after the primary's second failed probe (the
/// tests send it 100 ms after their start), both holding the same WAL (so priority decides).
fn replicas_lost_the_primary(c: &Cluster) {
    for (i, lsn) in [(1, 5000), (2, 5000), (1, 5000), (2, 5000)] {
        let mut s = Sample::for_tests(true, lsn);
        s.streaming = false;
        s.started = Instant::now() + Duration::from_millis(150);
        ok(c, i, s);
    }
}

#[test]
fn a_crash_needs_two_failures_then_fresh_evidence_then_promotes_by_priority() {
    let c = cluster();
    let t0 = Instant::now();
    fail(&c, 0, FailureKind::Crash, t0);
    assert_eq!(assess(&c.view(), &policy(), t0), Verdict::Suspect);
    fail(&c, 0, FailureKind::Crash, t0 + Duration::from_millis(100));
    // The replicas' samples predate the failure: ask for new ones.
    let v = assess(&c.view(), &policy(), t0);
    assert_eq!(
        v,
        Verdict::NeedEvidence {
            old: 0,
            stale: vec![1, 2]
        }
    );
    // Samples sent between the two failed probes may predate the crash: not evidence.
    for i in 1..3 {
        let mut s = Sample::for_tests(true, 5000);
        s.streaming = false;
        s.started = t0 + Duration::from_millis(50);
        ok(&c, i, s);
    }
    assert!(matches!(
        assess(&c.view(), &policy(), t0),
        Verdict::NeedEvidence { .. }
    ));
    replicas_lost_the_primary(&c);
    let v = assess(&c.view(), &policy(), t0);
    assert_eq!(
        v,
        Verdict::Promote {
            old: 0,
            candidate: 1,
            cause: Cause::Crash
        }
    );
}

#[test]
fn a_replica_that_still_hears_the_primary_blocks_promotion() {
    let c = cluster();
    let t0 = Instant::now();
    fail(&c, 0, FailureKind::Crash, t0);
    fail(&c, 0, FailureKind::Crash, t0 + Duration::from_millis(100));
    replicas_lost_the_primary(&c);
    let mut hears = Sample::for_tests(true, 5000);
    hears.started = Instant::now() + Duration::from_millis(150);
    ok(&c, 2, hears);
    assert_eq!(
        assess(&c.view(), &policy(), t0),
        Verdict::PrimaryAlive { old: 0, witness: 2 }
    );
}

#[test]
fn a_silent_primary_is_dead_after_failover_timeout() {
    let c = cluster();
    let t0 = Instant::now();
    fail(&c, 0, FailureKind::Timeout, t0);
    fail(&c, 0, FailureKind::Timeout, t0 + Duration::from_secs(1));
    replicas_lost_the_primary(&c);
    assert_eq!(
        assess(&c.view(), &policy(), t0 + Duration::from_secs(1)),
        Verdict::Suspect
    );
    let later = Instant::now() + Duration::from_secs(4);
    assert_eq!(
        assess(&c.view(), &policy(), later),
        Verdict::Promote {
            old: 0,
            candidate: 1,
            cause: Cause::Unresponsive
        }
    );
    let manual = Policy {
        mode: FailoverMode::Manual,
        ..policy()
    };
    assert_eq!(
        assess(&c.view(), &manual, later),
        Verdict::NotAutomatic {
            old: 0,
            cause: Cause::Unresponsive
        }
    );
}

#[test]
fn election_skips_laggards_and_no_failover_and_prefers_position() {
    let c = cluster();
    let view = c.view();
    // pg2 (higher priority) is 100 bytes behind pg3: pg3 holds writes pg2 lacks, so it wins,
    // with or without synchronous.
    assert_eq!(elect(&view, Some(0), &policy(), false), Ok(2));
    let sync = Policy {
        synchronous: true,
        ..policy()
    };
    assert_eq!(elect(&view, Some(0), &sync, false), Ok(2));
    let strict = Policy {
        max_failover_lag: 50,
        ..policy()
    };
    assert_eq!(elect(&view, Some(0), &strict, false), Ok(2));
    // Only laggards left: refused with the reasons, unless forced (then by priority).
    let c = cluster_at([5000, 4900, 100]);
    let err = elect(&c.view(), Some(0), &strict, false).unwrap_err();
    assert!(err.contains("pg2 is 100 bytes behind"), "{err}");
    assert!(err.contains("pg3 is 4900 bytes behind"), "{err}");
    assert_eq!(elect(&c.view(), Some(0), &strict, true), Ok(1));
}

#[test]
fn commits_acknowledged_without_a_standby_keep_replicas_that_lack_them_out() {
    let c = cluster();
    let view = c.view();
    // The list is empty right now: no replica is known to hold those commits.
    let open = Policy {
        unsynced: Some(Unsynced {
            primary: "pg1".into(),
            covered_by: None,
        }),
        ..policy()
    };
    let err = elect(&view, Some(0), &open, false).unwrap_err();
    assert!(err.contains("may lack commits"), "{err}");
    // Covered up to 4950: pg3 (5000) holds them, pg2 (4900) does not.
    let covered = Policy {
        unsynced: Some(Unsynced {
            primary: "pg1".into(),
            covered_by: Some(Lsn(4950)),
        }),
        ..policy()
    };
    assert_eq!(elect(&view, Some(0), &covered, false), Ok(2));
    let c = cluster_at([5000, 4900, 4940]);
    let err = elect(&c.view(), Some(0), &covered, false).unwrap_err();
    assert!(err.contains("lacks commits acknowledged"), "{err}");
    // An operator may still choose (PROMOTE), and another primary's window is irrelevant.
    assert!(elect(&c.view(), Some(0), &covered, true).is_ok());
    let elsewhere = Policy {
        unsynced: Some(Unsynced {
            primary: "pg2".into(),
            covered_by: None,
        }),
        ..policy()
    };
    assert!(elect(&c.view(), Some(0), &elsewhere, false).is_ok());
}

#[test]
fn a_replica_holds_what_it_received_even_when_its_receiver_restarts() {
    // PostgreSQL resets the receive position to a segment start when the WAL receiver
    // restarts (it keeps trying once the primary is gone); the WAL stays on disk.
    let c = cluster_at([5000, 4900, 5000]);
    let mut reset = Sample::for_tests(true, 16);
    reset.receive_lsn = Some(Lsn(16));
    reset.replay_lsn = Some(Lsn(4000));
    ok(&c, 2, reset);
    assert_eq!(c.view().nodes[2].wal_position(), Some(Lsn(5000)));
    assert_eq!(elect(&c.view(), Some(0), &policy(), false), Ok(2));
    // On another timeline nothing of the old one counts.
    let mut moved = Sample::for_tests(true, 300);
    moved.timeline = Some(2);
    ok(&c, 2, moved);
    assert_eq!(c.view().nodes[2].wal_position(), Some(Lsn(300)));
}

#[test]
fn after_a_crash_a_replica_still_replaying_is_not_evidence_yet() {
    let c = cluster();
    let t0 = Instant::now();
    fail(&c, 0, FailureKind::Crash, t0);
    fail(&c, 0, FailureKind::Crash, t0 + Duration::from_millis(100));
    // One sample each after the crash: receivers gone, but replay may still be moving.
    for i in 1..3 {
        let mut s = Sample::for_tests(true, 5000);
        s.streaming = false;
        s.started = Instant::now() + Duration::from_millis(150);
        ok(&c, i, s);
    }
    assert!(matches!(
        assess(&c.view(), &policy(), t0),
        Verdict::NeedEvidence { .. }
    ));
}

#[test]
fn a_named_standby_that_cannot_be_asked_keeps_the_others_out() {
    // pg2 died first and was dropped from the list at 4900; pg3 acknowledged alone after
    // that, then died while named; then the primary died. pg2 is back (at 4900).
    let c = cluster_at([5000, 4900, 5000]);
    let mut sync = policy();
    sync.synchronous = true;
    let all = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    sync.sync_record
        .update("pg1", &all(&["pg2", "pg3"]), Some(Lsn(4000)));
    sync.sync_record
        .update("pg1", &all(&["pg3"]), Some(Lsn(4900)));
    let t0 = Instant::now();
    fail(&c, 2, FailureKind::Crash, t0);
    fail(&c, 0, FailureKind::Crash, t0);
    fail(&c, 0, FailureKind::Crash, t0 + Duration::from_millis(100));
    let mut s = Sample::for_tests(true, 4900);
    s.streaming = false;
    s.started = t0 + Duration::from_millis(150);
    ok(&c, 1, s.clone());
    ok(&c, 1, s);
    match assess(&c.view(), &sync, t0) {
        Verdict::NoCandidate { why, .. } => {
            assert!(
                why.contains("pg3 is named synchronous and unreachable"),
                "{why}"
            )
        }
        v => panic!("pg2 may lack pg3's commits: {v:?}"),
    }
    // pg3 is back: the furthest wins.
    let mut s = Sample::for_tests(true, 5000);
    s.streaming = false;
    s.started = t0 + Duration::from_millis(150);
    ok(&c, 2, s.clone());
    ok(&c, 2, s);
    let mut s = Sample::for_tests(true, 4900);
    s.streaming = false;
    s.started = t0 + Duration::from_millis(150);
    ok(&c, 1, s.clone());
    ok(&c, 1, s);
    let v = assess(&c.view(), &sync, t0);
    assert!(matches!(v, Verdict::Promote { candidate: 2, .. }), "{v:?}");
}
